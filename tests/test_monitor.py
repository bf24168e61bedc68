"""The prediction log written by serving replicas, ingested as a daily partitioned asset."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg

from mlops_assets.definitions import defs
from mlops_assets.serve.predlog import PredictionLog

RECORD = {
    "year": 2013, "month": 7, "day": 4, "sched_dep_time": 900, "sched_arr_time": 1130,
    "carrier": "UA", "flight": 1545, "tailnum": "N14228", "origin": "EWR", "dest": "IAH",
    "distance": 1400.0,
}  # fmt: skip


def test_prediction_log_ingests_one_day_of_answers_and_rejections(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    log = PredictionLog(resources["prediction_log_files"].folder)
    log.log_predictions(
        request_id="req-1", model_version="m0001", inputs=[RECORD, RECORD],
        probabilities=[0.2, 0.7], delayed=[False, True], latency_ms=3.5,
    )  # fmt: skip
    log.log_rejection(
        request_id="req-2", status=422, error="body.flights.0.month: too large", latency_ms=0.4
    )
    log.close()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    result = dg.materialize(
        list(defs.assets), selection=["prediction_log"], partition_key=today,
        resources=resources, instance=instance,
    )  # fmt: skip
    assert result.success
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["predictions"].value == 2 and meta["rejections"].value == 1
    assert meta["requests"].value == 2
    assert meta["model_versions"].value == "m0001: 2"
    stored = resources["warehouse"].read("prediction_log", [today])
    assert stored.height == 3
    assert stored.filter(stored["kind"] == "prediction")["carrier"].to_list() == ["UA", "UA"]
    # Another day holds none of these lines.
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    other = dg.materialize(
        list(defs.assets), selection=["prediction_log"], partition_key=yesterday,
        resources=resources, instance=instance,
    )  # fmt: skip
    assert other.success
    assert resources["warehouse"].read("prediction_log", [yesterday]).height == 0


def _champion_on_january(resources: dict[str, Any]) -> str:
    """A small real champion trained on January's features, and the warehouse it needs."""
    import lightgbm as lgb
    import polars as pl

    from mlops_assets.features.preprocess import Preprocessor
    from mlops_assets.features.transform import LABEL, build_features
    from mlops_assets.train.model import Matrix, dataset
    from tests.realdata import valid_table

    warehouse, registry = resources["warehouse"], resources["registry"]
    weather, planes = valid_table("weather"), valid_table("planes")
    january = build_features(valid_table("flights", 1), weather, planes)
    january = january.filter(pl.col(LABEL).is_not_null())
    warehouse.write("flight_features", january, "2013-01")
    warehouse.write("weather", weather.filter(pl.col("month") == 7), "2013-07")
    warehouse.write("planes", planes)
    preprocessor = Preprocessor.fit(january)
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 2, "seed": 1},
                        dataset(Matrix.from_features(january, preprocessor)), 20)  # fmt: skip
    manifest = registry.register(
        booster.model_to_string(), preprocessor.to_json(),
        {"metrics": {"valid_auc": 0.7},
         "training": {"months": {"train": ["2013-01"], "valid": ["2013-01"], "test": []}}},
    )  # fmt: skip
    registry.promote(manifest["version"], "test champion")
    return manifest["version"]


def test_live_traffic_drift_compares_served_requests_with_the_training_reference(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    import polars as pl

    from mlops_assets.features.transform import BOOKING_COLUMNS
    from tests.realdata import valid_table

    version = _champion_on_january(resources)
    july = valid_table("flights", 7).head(400).select(list(BOOKING_COLUMNS))
    log = PredictionLog(resources["prediction_log_files"].folder)
    records = july.to_dicts()
    for start in range(0, len(records), 50):
        batch = records[start : start + 50]
        log.log_predictions(
            request_id=f"req-{start}", model_version=version, inputs=batch,
            probabilities=[0.3] * len(batch), delayed=[False] * len(batch), latency_ms=2.0,
        )  # fmt: skip
    log.close()
    today = dt.datetime.now(dt.UTC).date().isoformat()
    result = dg.materialize(
        list(defs.assets), selection=["prediction_log", "live_traffic_drift"],
        partition_key=today, resources=resources, instance=instance,
    )  # fmt: skip
    assert result.success
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey("live_traffic_drift")]  # fmt: skip
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    assert meta["current_rows"] == 400
    assert meta["champion_version"] == version
    assert meta["served_versions"] == f"{version}: 400"
    assert "temp" in meta["drifted_columns"].split(", ")  # July weather against January's
    assert 0 < meta["weighted_drift_share"] <= 1
    assert Path(meta["report"]).is_file()
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "live_drift_share_below_threshold"
    assert "importance-weighted drifted share" in check.description

    # A day without traffic is skipped with its reason, not a crash.
    quiet = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=2)).isoformat()
    result = dg.materialize(
        list(defs.assets), selection=["prediction_log", "live_traffic_drift"],
        partition_key=quiet, resources=resources, instance=instance,
    )  # fmt: skip
    assert result.success
    skipped = [e.materialization.metadata["skipped"].value
               for e in result.get_asset_materialization_events()
               if e.asset_key == dg.AssetKey("live_traffic_drift")]  # fmt: skip
    assert skipped == [f"no answered requests on {quiet}"]
    assert pl.DataFrame(resources["registry"].decisions()).height >= 1
