"""notebooks/explore.ipynb executed by a real Jupyter kernel (ipykernel from the venv, nbclient)
against a temp Dagster instance and MLOPS_HOME holding a real materialized slice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import lightgbm as lgb
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from mlops_assets.definitions import defs
from resources.files import land_month

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explore.ipynb"
REFERENCE = ["raw_planes", "raw_airports", "raw_airlines", "planes", "airports", "airlines"]
MONTHLY = ["raw_flights", "raw_weather", "flights", "weather", "flight_features"]
pytestmark = pytest.mark.timeout(600)


def execute_notebook(dagster_home: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every cell in a fresh kernel (the environment is the kernel's); the text it showed."""
    monkeypatch.setenv("DAGSTER_HOME", dagster_home)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) on any error
    texts: list[str] = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output["output_type"] == "stream":
                texts.append(output["text"])
            elif "data" in output:
                texts.append(output["data"].get("text/plain", ""))
    return "\n".join(texts)


def test_the_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    assert all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_explores_the_latest_materialized_slice(
    mlops_home: Path,
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    land_month("2013-01", mlops_home / "landing")
    assets = list(defs.assets)
    run = {"resources": resources, "instance": instance}
    assert dg.materialize(assets, selection=REFERENCE, **run).success
    assert dg.materialize(assets, selection=MONTHLY, partition_key="2013-01", **run).success
    # A champion in the real registry: a small LightGBM model on the stored features.
    features = resources["warehouse"].read("flight_features", ["2013-01"])
    x = features.select("dep_hour", "distance", "weekday").to_numpy().astype(np.float64)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1, "seed": 1},
        lgb.Dataset(x, features["delayed"].to_numpy().astype(np.float64)),
        num_boost_round=5,
    )
    registry = resources["registry"]
    version = registry.register(
        booster.model_to_string(),
        "{}",
        {"metrics": {"valid_auc": 0.6125}, "training": {"months": {"train": ["2013-01"]}}},
    )["version"]
    registry.promote(version, "notebook test")

    shown = execute_notebook(instance.root_directory, monkeypatch)

    assert f"{len(REFERENCE) + len(MONTHLY)} materialized assets" in shown
    assert "flight_features partitions: 2013-01" in shown
    rate = features["delayed"].mean()
    assert f"delay rate 2013-01: {rate:.3f} ({features.height} flights)" in shown
    assert "shape: (5, " in shown  # the features' head
    assert f"champion: {version}" in shown
    assert "valid_auc: 0.6125" in shown
    assert "train: 2013-01" in shown


def test_notebook_on_an_empty_instance_says_so_instead_of_failing(
    mlops_home: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = execute_notebook(instance.root_directory, monkeypatch)

    assert "0 materialized assets" in shown
    assert "flight_features partitions: none yet" in shown
    assert "delay rate" not in shown
    assert "champion: none yet" in shown
