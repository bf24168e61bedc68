"""Shared fixtures: a temporary MLOPS_HOME and DAGSTER_HOME, real resources on them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from resources import default_resources
from resources.files import land_month

# Joining the local Ray head points these at the head's temp dir (Ray reads them in the driver);
# that dir goes away with its test module, so later modules must not inherit them.
_RAY_DRIVER_ENV = ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED", "RAY_TMPDIR", "TMPDIR")


@pytest.fixture(autouse=True, scope="module")
def _restore_ray_driver_environment() -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in _RAY_DRIVER_ENV}
    saved_tempdir = tempfile.tempdir
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = saved_tempdir


@pytest.fixture
def mlops_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "mlops"
    monkeypatch.setenv("MLOPS_HOME", str(home))
    for name in ("MLOPS_REFERENCE_DB_URL", "MLOPS_WEATHER_API_URL", "MLOPS_WEATHER_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def resources(mlops_home: Path) -> dict[str, Any]:
    return default_resources()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A real, persistent Dagster instance in a temporary DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


@pytest.fixture
def landed(mlops_home: Path) -> list[str]:
    """Two real months of flights landed, as `mlops land` would."""
    months = ["2013-01", "2013-02"]
    for month in months:
        land_month(month, mlops_home / "landing")
    return months
