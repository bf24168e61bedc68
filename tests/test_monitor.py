"""The prediction log written by serving replicas, ingested as a daily partitioned asset."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg

from mlops_assets.definitions import defs
from mlops_assets.serve.predlog import PredictionLog
from mlops_assets.serve.schema import Prediction

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
        request_id="req-1", model_version="m0001", records=[RECORD, RECORD],
        predictions=[Prediction(delay_probability=0.2, delayed=False),
                     Prediction(delay_probability=0.7, delayed=True)], latency_ms=3.5,
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
