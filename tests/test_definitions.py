"""The asset graph is pinned: a change to the lineage shows up as a diff here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlops_assets.definitions import defs

ROOT = Path(__file__).resolve().parents[1]

EXPECTED: dict[str, tuple[str, set[str]]] = {
    "raw_flights": ("ingest", set()),
    "raw_weather": ("ingest", set()),
    "raw_planes": ("ingest", set()),
    "raw_airports": ("ingest", set()),
    "raw_airlines": ("ingest", set()),
    "flights": ("validate", {"raw_flights"}),
    "weather": ("validate", {"raw_weather"}),
    "planes": ("validate", {"raw_planes"}),
    "airports": ("validate", {"raw_airports"}),
    "airlines": ("validate", {"raw_airlines"}),
    "eda_report": ("explore", {"flights", "weather", "planes", "airlines"}),
    "flight_features": ("features", {"flights", "weather", "planes"}),
    "training_set": ("features", {"flight_features", "retrain_decision"}),
    "challenger_model": ("train", {"training_set"}),
    "frozen_eval_set": ("evaluate", {"training_set"}),
    "model_evaluation": ("evaluate", {"training_set", "frozen_eval_set", "challenger_model"}),
    "champion_model": ("evaluate", {"model_evaluation", "training_set"}),
    "served_model": ("serve", {"champion_model"}),
    "batch_predictions": ("serve", {"flights", "weather", "planes", "champion_model"}),
    "prediction_log": ("monitor", set()),
    "flight_drift": ("monitor", {"flight_features"}),
    "champion_performance": ("monitor", {"flight_features"}),
    "retrain_decision": ("monitor", {"flight_drift", "champion_performance"}),
    "live_traffic_drift": ("monitor", {"prediction_log", "champion_model"}),
}
MONTHLY = {"raw_flights", "raw_weather", "flights", "weather", "flight_features",
           "batch_predictions", "flight_drift", "champion_performance",
           "retrain_decision"}  # fmt: skip
DAILY = {"prediction_log", "live_traffic_drift"}
BLOCKING_CHECKS = {
    (table, "quarantine_share_below_threshold")
    for table in ("flights", "weather", "planes", "airports", "airlines")
} | {("model_evaluation", "promotion_gate")}
NON_BLOCKING_CHECKS = {
    ("served_model", "endpoint_serves_champion"),
    ("flight_drift", "drift_share_below_threshold"),
    ("champion_performance", "auc_decay_within_tolerance"),
    ("live_traffic_drift", "live_drift_share_below_threshold"),
}


def test_asset_graph_is_pinned() -> None:
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED)
    for name, (group, deps) in EXPECTED.items():
        node = graph.get(dg.AssetKey(name))
        assert node.group_name == group, name
        assert {k.to_user_string() for k in node.parent_keys} == deps, name
        assert (node.partitions_def is not None) == (name in MONTHLY | DAILY), name
        assert node.description, f"{name} has no description for the UI"


def test_checks_are_pinned_and_blocking() -> None:
    graph = defs.resolve_asset_graph()
    checks = {
        (key.asset_key.to_user_string(), key.name): graph.get_check_spec(key)
        for key in graph.asset_check_keys
    }
    assert set(checks) == BLOCKING_CHECKS | NON_BLOCKING_CHECKS
    assert all(checks[key].blocking for key in BLOCKING_CHECKS)


def test_jobs_are_pinned() -> None:
    jobs = {job.name for job in defs.resolve_all_job_defs()} - {"__ASSET_JOB"}
    assert jobs == {"rollback_job", "ingest_month", "retrain"}


def test_a_landed_month_runs_from_file_to_served_model_in_one_lane_run() -> None:
    ingest = defs.resolve_job_def("ingest_month")
    retrain = defs.resolve_job_def("retrain")
    steps = {key.to_user_string() for key in ingest.asset_layer.selected_asset_keys}
    assert {"raw_flights", "flight_drift", "retrain_decision", "challenger_model",
            "champion_model", "served_model"} <= steps  # fmt: skip
    assert ingest.tags["mlops/lane"] == retrain.tags["mlops/lane"] == "model"
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("retrain_decision")).is_materializable
    limits = yaml.safe_load((ROOT / "dagster.yaml").read_text())["run_coordinator"]["config"]
    assert {"key": "mlops/lane", "value": "model", "limit": 1} in limits["tag_concurrency_limits"]


def test_the_loop_is_automated_by_default() -> None:
    repo = defs.get_repository_def()
    sensors = {s.name: s for s in repo.sensor_defs}
    assert set(sensors) == {"landing_sensor", "retrain_sensor", "monitor_automation"}
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    assert sensors["landing_sensor"].job_name == "ingest_month"
    assert sensors["retrain_sensor"].job_name == "retrain"
    (schedule,) = repo.schedule_defs
    assert (schedule.name, schedule.job_name) == ("weekly_retrain", "retrain")
    graph = defs.resolve_asset_graph()
    automated = {
        key.to_user_string()
        for key in graph.get_all_asset_keys()
        if graph.get(key).automation_condition is not None
    }
    assert automated == {"prediction_log", "live_traffic_drift"}


def test_monthly_partitions_cover_2013() -> None:
    node = defs.resolve_asset_graph().get(dg.AssetKey("raw_flights"))
    keys = node.partitions_def.get_partition_keys()
    assert keys == [f"2013-{m:02d}" for m in range(1, 13)]


def test_dagster_definitions_validate_passes_on_the_workspace(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "MLOPS_HOME": str(tmp_path / "m")}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate",
         "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_the_readme_picture_is_the_asset_graph() -> None:
    from mlops_assets.lineage import SENSOR_EDGES, mermaid

    picture = mermaid(defs)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"```mermaid\n{picture}```" in readme, "README's graph is stale: paste `mlops graph`"
    # every asset appears once, every dependency is an arrow, and the loop's sensors are drawn
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        assert picture.count(f'    {key.to_user_string()}["') == 1
        for parent in graph.get(key).parent_keys:
            assert f"{parent.to_user_string()} --> {key.to_user_string()}" in picture
    for source, sensor, target in SENSOR_EDGES:
        assert f"{source} -. {sensor} .-> {target}" in picture


def test_direct_ingress_is_switched_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``MLOPS_SERVE_DIRECT_INGRESS=1``: the local head gives each replica its own port."""
    from resources import default_resources

    monkeypatch.delenv("MLOPS_SERVE_DIRECT_INGRESS", raising=False)
    off = default_resources()["ray_serve"]
    assert not off.direct_ingress
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in off.head_environment()
    monkeypatch.setenv("MLOPS_SERVE_DIRECT_INGRESS", "1")
    on = default_resources()["ray_serve"]
    assert on.direct_ingress
    assert on.head_environment()["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    monkeypatch.setenv("MLOPS_SERVE_DIRECT_INGRESS", "yes")
    with pytest.raises(ValueError, match="MLOPS_SERVE_DIRECT_INGRESS must be 0 or 1"):
        default_resources()
