"""Training, evaluation, the promotion gate and rollback, materialized on real months."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import lightgbm as lgb
import numpy as np
import optuna
import polars as pl
import pytest

from mlops_assets.definitions import defs
from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import POST_DEPARTURE, build_features
from mlops_assets.train import model as model_module
from mlops_assets.train.model import TUNED_PARAMS, Matrix
from resources import default_resources
from resources.files import land_month
from resources.registry import ModelRegistryResource
from resources.warehouse import WarehouseIOManager, WarehouseResource

ASSETS = list(defs.assets)
FAST = {"ops": {"challenger_model": {"config": {"n_trials": 2}}}}
MODEL_STEPS = ["challenger_model", "frozen_eval_set", "model_evaluation", "champion_model"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The demo's six real months materialized up to the training set, on one instance."""
    home = tmp_path_factory.mktemp("mlops")
    old = os.environ.get("MLOPS_HOME")
    os.environ["MLOPS_HOME"] = str(home)
    dagster_home = tmp_path_factory.mktemp("dagster_home")
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    months = [f"2013-0{m}" for m in range(1, 7)]
    for month in months:
        land_month(month, home / "landing")
    resources = default_resources()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        reference = ["raw_planes", "planes", "raw_airlines", "airlines"]
        assert dg.materialize(ASSETS, selection=reference, resources=resources,
                              instance=instance).success  # fmt: skip
        for month in months:
            assert dg.materialize(
                ASSETS, selection=["raw_flights", "raw_weather", "flights", "weather",
                                   "flight_features"],
                partition_key=month, resources=resources, instance=instance,
            ).success  # fmt: skip
        assert dg.materialize(ASSETS, selection=["training_set"], resources=resources,
                              instance=instance).success  # fmt: skip
        yield {"home": home, "dagster_home": dagster_home, "instance": instance,
               "resources": resources}  # fmt: skip
    if old is None:
        os.environ.pop("MLOPS_HOME", None)
    else:
        os.environ["MLOPS_HOME"] = old


def with_registry(prepared: dict[str, Any], root: Path, warehouse_root: Path | None = None):
    resources = {**prepared["resources"], "registry": ModelRegistryResource(root=str(root))}
    if warehouse_root is not None:
        warehouse = WarehouseResource(
            root=str(warehouse_root), reports_root=str(warehouse_root.parent / "reports")
        )
        resources |= {"warehouse": warehouse, "io_manager": WarehouseIOManager(warehouse=warehouse)}
    return resources


def run(prepared: dict[str, Any], resources: dict[str, Any], selection: list[str],
        run_config: dict[str, Any] | None = None) -> dg.ExecuteInProcessResult:  # fmt: skip
    ops = {k: v for k, v in (run_config or FAST)["ops"].items() if k in selection}
    return dg.materialize(
        ASSETS, selection=selection, resources=resources, instance=prepared["instance"],
        run_config={"ops": ops}, raise_on_error=False,
    )  # fmt: skip


def metadata(result: dg.ExecuteInProcessResult, key: str) -> dict[str, Any]:
    for event in result.get_asset_materialization_events():
        if event.asset_key == dg.AssetKey(key):
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise AssertionError(f"{key} was not materialized")


def gate(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    return next(e for e in result.get_asset_check_evaluations() if e.check_name == "promotion_gate")


def test_first_model_is_trained_evaluated_and_promoted(prepared, tmp_path: Path) -> None:
    resources = with_registry(prepared, tmp_path / "registry")
    result = run(prepared, resources, MODEL_STEPS)
    assert result.success
    trained = metadata(result, "challenger_model")
    version = trained["version"]
    assert trained["trials"] == 2 and "learning_rate" in trained["best_params"]
    assert trained["trial_table"].splitlines()[0].startswith("| trial |")
    registry = resources["registry"]
    manifest = registry.manifest(version)
    assert manifest["sha256"] == trained["sha256"]
    names = [f["name"] for f in manifest["features"]]
    assert names and not POST_DEPARTURE & set(names) and "delayed" not in names
    assert all(
        {"name", "kind", "dtype", "missing", "description"} <= set(f) for f in manifest["features"]
    )
    assert manifest["training"]["months"] == {
        "train": ["2013-01", "2013-02", "2013-03", "2013-04"],
        "valid": ["2013-05"],
        "test": ["2013-06"],
    }  # fmt: skip
    assert manifest["training"]["fit_on"] == ["train", "valid"]
    partitions = manifest["training"]["partitions"]
    assert [p["partition"] for p in partitions] == [f"2013-0{m}" for m in range(1, 6)]
    assert all(p["data_version"] for p in partitions)
    assert manifest["code_version"].startswith("0.1.0+src.")
    assert {"params", "metrics", "created_at"} <= set(manifest)
    assert manifest["params"]["objective"] == "binary"

    evaluation = metadata(result, "model_evaluation")
    assert evaluation["gate_passed"] is True
    assert evaluation["gate_reason"].startswith("promote: first model")
    assert 0.65 < evaluation["frozen_auc"] < 0.9
    # the decision threshold was chosen before the validation month joined the training
    assert evaluation["threshold"] == manifest["metrics"]["valid_best_f1_threshold"]
    # The challenger fit its validation month: that row is in sample, the frozen one is not.
    for model in ("challenger", "base_rate", "logistic"):
        assert f"| frozen | {model} | False |" in evaluation["metrics"]
        assert f"| valid | {model} | True |" in evaluation["metrics"]
    assert "2013-06" in evaluation["per_month"] and "| UA |" in evaluation["per_carrier"]
    assert Path(evaluation["report"]).exists()
    assert gate(result).passed
    assert [d["action"] for d in registry.decisions()] == ["gate", "promote"]

    # What serves is the gated model's parameters and rounds refit on every landed month.
    champion = registry.champion()
    promoted = metadata(result, "champion_model")
    assert promoted["version"] == champion != version and promoted["gated_version"] == version
    refit = registry.load(champion)
    assert refit.refit_of == version
    assert refit.trained_months == [f"2013-0{m}" for m in range(1, 7)]
    assert refit.manifest["refit_of"]["frozen_auc"] == evaluation["frozen_auc"]
    assert refit.manifest["params"] == manifest["params"]
    assert refit.manifest["features"] == manifest["features"]
    assert [p["partition"] for p in refit.manifest["training"]["partitions"]] == (
        refit.trained_months
    )
    booster = lgb.Booster(model_str=refit.model_text)
    assert booster.num_trees() == manifest["params"]["num_boost_round"]
    assert refit.sha256 != manifest["sha256"]
    assert "serving its refit on every landed month" in registry.decisions()[-1]["reason"]

    # The same steps again, on the same months: the champion trained on the frozen month, so
    # the gate compares the new challenger with the model the champion refits.
    again = run(prepared, resources, MODEL_STEPS)
    evaluation = metadata(again, "model_evaluation")
    assert evaluation["champion_version"] == champion
    assert evaluation["champion_compared_as"] == version
    assert evaluation["gate_reason"] == "the challenger is already the champion; nothing changes"
    assert registry.champion() == champion  # the same bytes: nothing registered or promoted
    assert len(registry.versions()) == 3  # the first challenger, its refit, the second challenger


def test_the_gated_model_itself_serves_when_refitting_is_off(prepared, tmp_path: Path) -> None:
    resources = with_registry(prepared, tmp_path / "registry")
    config = {"ops": {**FAST["ops"],
                      "model_evaluation": {"config": {"refit_on_all_months": False}}}}  # fmt: skip
    result = run(prepared, resources, MODEL_STEPS, config)
    assert result.success
    version = metadata(result, "challenger_model")["version"]
    registry = resources["registry"]
    assert registry.champion() == version and registry.versions() == [version]
    # Promoting it again changes nothing and registers nothing.
    assert run(prepared, resources, ["champion_model"], config).success
    assert registry.champion() == version and registry.versions() == [version]


def test_same_data_and_config_give_the_same_model_bytes(prepared, tmp_path: Path) -> None:
    resources = with_registry(prepared, tmp_path / "registry")
    first = metadata(run(prepared, resources, ["challenger_model"]), "challenger_model")
    second = metadata(run(prepared, resources, ["challenger_model"]), "challenger_model")
    assert first["version"] != second["version"]
    assert first["sha256"] == second["sha256"]
    registry = resources["registry"]
    assert registry.load(first["version"]).model_text == registry.load(second["version"]).model_text


def test_a_model_trained_on_shuffled_labels_is_rejected(prepared, tmp_path: Path) -> None:
    warehouse_copy = tmp_path / "warehouse"
    shutil.copytree(prepared["resources"]["warehouse"].root, warehouse_copy)
    resources = with_registry(prepared, tmp_path / "registry", warehouse_copy)
    assert run(prepared, resources, MODEL_STEPS).success
    champion = resources["registry"].champion()

    training = resources["warehouse"].read("training_set")
    shuffled = training.with_columns(
        pl.when(pl.col("split") == "test").then(pl.col("delayed"))
        .otherwise(pl.col("delayed").shuffle(seed=1)).alias("delayed")
    )  # fmt: skip
    resources["warehouse"].write("training_set", shuffled)
    result = run(prepared, resources, ["challenger_model", "model_evaluation", "champion_model"])
    assert not result.success
    check = gate(result)
    assert not check.passed
    assert check.description.startswith("reject: AUC")
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "champion_model" not in materialized
    assert resources["registry"].champion() == champion
    assert resources["registry"].decisions()[-1]["passed"] is False


def test_a_corrupted_model_is_refused_and_the_alias_stays(prepared, tmp_path: Path) -> None:
    resources = with_registry(prepared, tmp_path / "registry")
    assert run(prepared, resources, MODEL_STEPS).success
    registry = resources["registry"]
    champion = registry.champion()
    trained = metadata(run(prepared, resources, ["challenger_model"]), "challenger_model")
    model_file = Path(registry.root) / "models" / trained["version"] / "model.txt"
    model_file.write_text(model_file.read_text().replace("shrinkage=", "shrinkage=9", 1))
    result = run(prepared, resources, ["model_evaluation", "champion_model"])
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    messages = [error.message] + ([error.cause.message] if error.cause else [])
    assert any("refusing to load a corrupted or tampered model" in m for m in messages)
    assert registry.champion() == champion


def test_rollback_job_and_cli_restore_the_exact_previous_champion(prepared, tmp_path: Path) -> None:
    resources = with_registry(prepared, tmp_path / "registry")
    assert run(prepared, resources, MODEL_STEPS).success
    registry = resources["registry"]
    first = registry.champion()
    forced = {"ops": {"challenger_model": {"config": {"n_trials": 2, "seed": 5}},
                      "model_evaluation": {"config": {"min_auc_gain": -1.0}}}}  # fmt: skip
    result = run(prepared, resources, MODEL_STEPS, forced)
    assert result.success
    second = registry.champion()
    assert second != first
    assert registry.aliases() == {"champion": second, "previous_champion": first}

    job = defs.get_job_def("rollback_job")
    outcome = job.execute_in_process(instance=prepared["instance"], resources=resources)
    assert outcome.success
    assert registry.champion() == first
    assert registry.load(first).sha256 == registry.manifest(first)["sha256"]
    rollback = next(
        e for e in outcome.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("champion_model")
    )  # fmt: skip
    assert rollback.materialization.metadata["version"].value == first

    # Promote the second again, then roll back from the command line.
    registry.promote(second, "test")
    env = {**os.environ, "MLOPS_HOME": str(prepared["home"]),
           "DAGSTER_HOME": str(prepared["dagster_home"])}  # fmt: skip
    shutil.copytree(registry.root, prepared["home"] / "registry", dirs_exist_ok=True)
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "mlops"), "rollback"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    aliases = json.loads((prepared["home"] / "registry" / "aliases.json").read_text())
    assert aliases["champion"] == first
    assert first in cli.stdout


def test_batch_predictions_score_a_month_with_the_champion(prepared, tmp_path: Path) -> None:
    resources = with_registry(prepared, tmp_path / "registry")

    def score() -> dg.ExecuteInProcessResult:
        return dg.materialize(
            ASSETS, selection=["batch_predictions"], partition_key="2013-06",
            resources=resources, instance=prepared["instance"], raise_on_error=False,
        )  # fmt: skip

    no_champion = score()
    assert not no_champion.success
    error = no_champion.get_step_failure_events()[0].event_specific_data.error
    assert "there is no champion model yet" in error.message
    assert run(prepared, resources, MODEL_STEPS).success
    result = score()
    assert result.success
    scored = resources["warehouse"].read("batch_predictions", ["2013-06"])
    flights = resources["warehouse"].read("flights", ["2013-06"])
    assert scored.height == flights.height
    champion = resources["registry"].champion()
    assert scored["model_version"].unique().to_list() == [champion]
    # The same scores as the trained booster on the training-time features of those flights.
    stored = resources["registry"].load(champion)
    booster, preprocessor = (
        lgb.Booster(model_str=stored.model_text),
        Preprocessor.from_json(stored.preprocessor_json),
    )
    features = build_features(
        flights, resources["warehouse"].read("weather", ["2013-06"]),
        resources["warehouse"].read("planes"),
    )  # fmt: skip
    expected = booster.predict(Matrix.from_features(features, preprocessor).x)
    assert np.allclose(scored["delay_probability"].to_numpy(), expected)


def test_a_retrain_can_reuse_the_champion_s_tuned_parameters(prepared, tmp_path: Path) -> None:
    """The loop's retrains skip the search: the champion's tuned values, early stopping for the
    rounds. With no champion yet the same config searches."""
    reuse = {
        "ops": {"challenger_model": {"config": {"n_trials": 2, "reuse_champion_params": True}}}
    }
    resources = with_registry(prepared, tmp_path / "registry")
    first = metadata(run(prepared, resources, ["challenger_model"], reuse), "challenger_model")
    assert first["params_from"] == "search" and first["trials"] == 2
    registry = resources["registry"]
    registry.promote(first["version"], "test: a champion to reuse")
    retrained = metadata(run(prepared, resources, ["challenger_model"], reuse), "challenger_model")
    assert retrained["params_from"] == f"champion {first['version']}"
    assert retrained["trials"] == 1 and "REUSED" in retrained["trial_table"]
    champion = registry.manifest(first["version"])["params"]
    challenger = registry.manifest(retrained["version"])["params"]
    assert {k: challenger[k] for k in TUNED_PARAMS} == {k: champion[k] for k in TUNED_PARAMS}
    assert challenger["num_boost_round"] == retrained["rounds"] >= 1
    assert registry.manifest(retrained["version"])["search"]["params_from"] == (
        f"champion {first['version']}"
    )


def test_the_search_tunes_exactly_the_parameters_a_retrain_reuses() -> None:
    trial = optuna.trial.FixedTrial(
        {"learning_rate": 0.1, "num_leaves": 31, "min_child_samples": 50,
         "feature_fraction": 0.8, "bagging_fraction": 0.8, "lambda_l2": 1.0, "cat_smooth": 10.0}
    )  # fmt: skip
    assert tuple(model_module._suggest(trial)) == TUNED_PARAMS
