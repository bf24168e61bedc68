"""The optional MLflow mirror on a real local SQLite tracking store: each challenger's params,
metrics, plots and text model are logged and registered; promotions and rollbacks move the same
aliases there as in our registry; a broken tracking store never fails training."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from test_model import metadata, run

from mlops_assets.definitions import defs
from mlops_assets.train.mlflow_bridge import MODEL_NAME, VERSION_TAG, MlflowResource
from resources import default_resources
from resources.files import land_month
from resources.registry import ModelRegistryResource

mlflow = pytest.importorskip("mlflow", reason="the `mlflow` extra is not installed")

ASSETS = list(defs.assets)
MONTHS = ["2013-01", "2013-02", "2013-03"]  # train, valid, test
MODEL_STEPS = ["challenger_model", "frozen_eval_set", "model_evaluation", "champion_model"]
pytestmark = pytest.mark.timeout(900)


def forced(seed: int) -> dict[str, Any]:
    """Two trials; a gate that always passes (the mirror is under test here, not the gate)."""
    return {
        "ops": {
            "challenger_model": {"config": {"n_trials": 2, "seed": seed}},
            "model_evaluation": {
                "config": {"min_auc_gain": -1.0, "baseline_margin": -1.0,
                           "max_calibration_error": 1.0}
            },
        }
    }  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three real months materialized up to the training set, on one instance."""
    home = tmp_path_factory.mktemp("mlops")
    old = os.environ.get("MLOPS_HOME")
    os.environ["MLOPS_HOME"] = str(home)
    dagster_home = tmp_path_factory.mktemp("dagster_home")
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for month in MONTHS:
        land_month(month, home / "landing")
    resources = default_resources()
    monthly = ["raw_flights", "raw_weather", "flights", "weather", "flight_features"]
    try:
        with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
            run = {"resources": resources, "instance": instance}
            reference = ["raw_planes", "planes", "raw_airlines", "airlines"]
            assert dg.materialize(ASSETS, selection=reference, **run).success
            for month in MONTHS:
                assert dg.materialize(ASSETS, selection=monthly, partition_key=month, **run).success
            assert dg.materialize(ASSETS, selection=["training_set"], **run).success
            yield {"instance": instance, "resources": resources}
    finally:
        if old is None:
            os.environ.pop("MLOPS_HOME", None)
        else:
            os.environ["MLOPS_HOME"] = old


def materialize(
    prepared: dict[str, Any], resources: dict[str, Any], selection: list[str], seed: int
) -> dg.ExecuteInProcessResult:
    return run(prepared, resources, selection, forced(seed))


def alias(client: Any, name: str) -> tuple[str, str] | None:
    """(MLflow version, our version) behind an MLflow alias, or None when it is not set."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version_by_alias(MODEL_NAME, name)
    except MlflowException:
        return None
    return str(found.version), found.tags[VERSION_TAG]


def test_challengers_promotions_and_rollback_are_mirrored_to_mlflow(
    prepared: dict[str, Any], tmp_path: Path
) -> None:
    tracking = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    (tmp_path / "mlflow").mkdir()
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    resources = {**prepared["resources"], "registry": registry, "mlflow_tracking": tracking}

    result = materialize(prepared, resources, MODEL_STEPS, seed=13)
    assert result.success
    trained = metadata(result, "challenger_model")
    version = trained["version"]
    champion = registry.champion()  # the gated challenger refit on every landed month
    assert registry.load(champion).refit_of == version
    assert "mlflow_error" not in trained
    run_id = trained["mlflow_run_id"]
    assert trained["mlflow_model_version"] == "1"

    client = tracking.client()
    run = client.get_run(run_id)
    manifest = registry.manifest(version)
    assert run.info.status == "FINISHED"
    assert run.data.tags[VERSION_TAG] == version
    assert run.data.params["num_boost_round"] == str(manifest["params"]["num_boost_round"])
    assert run.data.params["seed"] == "13"
    assert run.data.params["search.n_trials"] == "2"
    assert run.data.params["train_months"] == "2013-01"
    assert run.data.params["valid_months"] == "2013-02"
    assert run.data.metrics["valid_auc"] == pytest.approx(manifest["metrics"]["valid_auc"])
    assert run.data.metrics["valid_auc"] == pytest.approx(trained["valid_auc"], abs=1e-9)
    history = client.get_metric_history(run_id, "trial_valid_auc")
    assert sorted(m.step for m in history) == [0, 1]

    # The model artifact is the registry's model.txt, byte for byte (LightGBM text, no pickle).
    downloaded = Path(client.download_artifacts(run_id, "model", str(tmp_path / "download")))
    artifact = (downloaded / "model.txt").read_bytes()
    stored = (Path(registry.root) / "models" / version / "model.txt").read_bytes()
    assert hashlib.sha256(artifact).hexdigest() == manifest["sha256"]
    assert artifact == stored
    assert sorted(p.name for p in downloaded.iterdir()) == [
        "manifest.json", "model.txt", "preprocessor.json",
    ]  # fmt: skip
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/feature_importance.png", "plots/search_history.png"}
    png = Path(client.download_artifacts(run_id, "plots/feature_importance.png", str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG")
    # Artifacts live next to the SQLite store, not in the working directory.
    assert (tmp_path / "mlflow" / "mlartifacts").is_dir()

    # The refit is mirrored too, and the champion alias follows our registry's.
    promoted = metadata(result, "champion_model")
    assert promoted["mlflow_refit_model_version"] == "2"
    refit_run = client.get_run(promoted["mlflow_refit_run_id"])
    assert refit_run.info.run_name == f"refit {champion}"
    assert refit_run.data.tags[VERSION_TAG] == champion
    assert alias(client, "champion") == ("2", champion)
    assert alias(client, "previous_champion") is None
    assert promoted["mlflow_champion"] == "2"

    # A second challenger promoted (as champion_model does), then the rollback job: MLflow's
    # aliases follow each move.
    result = materialize(prepared, resources, ["challenger_model"], seed=5)
    assert result.success
    second = metadata(result, "challenger_model")["version"]
    assert second != version
    registry.promote(second, "test: a second champion")
    assert tracking.sync_aliases(registry.aliases()) == {"champion": "3", "previous_champion": "2"}
    assert alias(client, "champion") == ("3", second)
    assert alias(client, "previous_champion") == ("2", champion)
    rollback = defs.get_job_def("rollback_job").execute_in_process(
        instance=prepared["instance"], resources=resources
    )
    assert rollback.success
    assert registry.aliases() == {"champion": champion, "previous_champion": None}
    assert alias(client, "champion") == ("2", champion)
    assert alias(client, "previous_champion") is None


def test_a_broken_tracking_store_is_reported_and_never_fails_training(
    prepared: dict[str, Any], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the store's folder should be")
    tracking = MlflowResource(tracking_uri=f"sqlite:///{blocker / 'mlflow.db'}")
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    resources = {**prepared["resources"], "registry": registry, "mlflow_tracking": tracking}

    result = materialize(prepared, resources, ["challenger_model"], seed=13)

    assert result.success
    trained = metadata(result, "challenger_model")
    assert "mlflow_run_id" not in trained
    assert "not-a-directory" in trained["mlflow_error"]
    assert registry.load(trained["version"]).sha256 == trained["sha256"]


def test_without_a_tracking_uri_or_without_mlflow_nothing_is_tracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    registry.register("tree\n", "{}", {"metrics": {}})
    model = registry.load("m0001")
    trials = pl.DataFrame({"trial": [0], "valid_auc": [0.7]})
    assert MlflowResource().log_challenger(model, trials) is None
    assert MlflowResource().sync_aliases(registry.aliases()) == {}
    # The extra not installed: a tracking URI alone changes nothing (the import is guarded).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    tracking = MlflowResource(tracking_uri=uri)
    assert not tracking.enabled
    assert tracking.log_challenger(model, trials) is None
    assert tracking.sync_aliases({"champion": "m0001"}) == {}
    assert not (tmp_path / "mlflow.db").exists()


def test_the_bridge_imports_on_its_own() -> None:
    # resources/__init__.py imports the bridge: it must not import resources back at load time.
    done = subprocess.run([sys.executable, "-c", "import mlops_assets.train.mlflow_bridge"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
