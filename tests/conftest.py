"""Shared fixtures: a temporary MLOPS_HOME and DAGSTER_HOME, real resources on them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from resources import default_resources
from resources.files import land_month


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
