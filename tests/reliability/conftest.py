"""The reliability suite's switch: tests marked ``reliability_full`` are slow (minutes of real
daemon time) and are skipped unless ``MLOPS_RELIABILITY=full`` is set; the rest run in the default
``pytest``. Also the module-scoped owner of the pipeline tests' daemons (``harness_factory``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.reliability.pipeline_harness import Harness

FULL = os.environ.get("MLOPS_RELIABILITY") == "full"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("reliability_full") and not FULL:
        pytest.skip("slow reliability test: set MLOPS_RELIABILITY=full to run it")


@pytest.fixture(scope="module")
def harness_factory() -> Iterator[list[Harness]]:
    """Holds the harnesses a module builds (``make_harness``) and stops them all afterwards."""
    made: list[Harness] = []
    saved = dict(os.environ)
    try:
        yield made
    finally:
        for harness in made:
            harness.stop_everything()
            harness.instance.dispose()
        os.environ.clear()
        os.environ.update(saved)
