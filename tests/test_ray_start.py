"""Starting the local Ray head on a loaded machine: Ray's fixed raylet wait is retried."""

from __future__ import annotations

import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlops_assets.serve import ray_runtime
from mlops_assets.serve.ray_runtime import LocalRayError, local_ray, start_local_ray, stop_local_ray

REAL_RAY = str(Path(sys.executable).parent / "ray")
OVERLOADED = (
    "Exception: The current node timed out during startup. This could happen because some of "
    "the raylet failed to startup or the GCS has become overloaded."
)


def _flaky_ray(tmp_path: Path, failures: int, message: str) -> tuple[Path, Path]:
    """A `ray` that fails its first ``failures`` calls with ``message``, then runs the real one."""
    counter = tmp_path / "attempts"
    script = tmp_path / "flaky-ray"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{counter}"\n'
        f'if [ "$n" -le {failures} ]; then echo "{message}"; exit 1; fi\n'
        f'exec "{REAL_RAY}" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, counter


@pytest.fixture
def short_temp() -> Iterator[Path]:
    """Ray's socket paths need a short temp dir; pytest's are too long."""
    folder = Path(tempfile.mkdtemp(prefix="mlrs", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_head_that_times_out_registering_is_started_again(
    tmp_path: Path, short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, counter = _flaky_ray(tmp_path, 1, OVERLOADED)
    monkeypatch.setattr(ray_runtime, "_ray_cli", lambda: str(script))
    state = tmp_path / "ray"
    try:
        address = start_local_ray(state, num_cpus=1, temp_dir=short_temp)
        assert counter.read_text().strip() == "2"
        head = local_ray(state)
        assert head is not None and head.address == address
    finally:
        stopped = stop_local_ray(state)
    assert stopped and local_ray(state) is None


def test_other_start_failures_are_not_retried(
    tmp_path: Path, short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, counter = _flaky_ray(tmp_path, 5, "ValueError: --num-cpus must be positive")
    monkeypatch.setattr(ray_runtime, "_ray_cli", lambda: str(script))
    with pytest.raises(LocalRayError, match=r"exited with code 1(.|\n)*num-cpus must be positive"):
        start_local_ray(tmp_path / "ray", num_cpus=1, temp_dir=short_temp)
    assert counter.read_text().strip() == "1"


def test_a_head_that_never_registers_fails_after_the_last_attempt(
    tmp_path: Path, short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, counter = _flaky_ray(tmp_path, 99, OVERLOADED)
    monkeypatch.setattr(ray_runtime, "_ray_cli", lambda: str(script))
    with pytest.raises(LocalRayError, match="timed out during startup"):
        start_local_ray(tmp_path / "ray", num_cpus=1, temp_dir=short_temp)
    assert counter.read_text().strip() == str(ray_runtime.START_ATTEMPTS)
    assert local_ray(tmp_path / "ray") is None
