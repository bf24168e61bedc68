"""The retrain sensor's crash window, tick by tick: a daemon killed after a tick recorded its
decisions but before Dagster saved the tick's cursor (seen for real by
``test_pipeline_daemon_kills``) re-evaluates the same ingest runs. They must not be decided twice,
and the retrain it asks for must carry the same run key (Dagster launches a run key once).

The ingest runs here made no decision of their own (as a run launched without
``retrain_decision`` would), so the sensor decides for them, and their months wait for it.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlops_assets.monitor.sensors import INGEST_JOB, RETRAIN_JOB, retrain_sensor
from resources.registry import ModelRegistryResource
from resources.retrain_policy import RetrainPolicyResource


def _succeeded_ingest(instance: dg.DagsterInstance, month: str) -> str:
    run = dg.DagsterRun(
        job_name=INGEST_JOB, status=dg.DagsterRunStatus.SUCCESS,
        tags={"dagster/partition": month},
    )  # fmt: skip
    instance.add_run(run)
    return run.run_id


def _tick(
    instance: dg.DagsterInstance, registry: ModelRegistryResource, cursor: str | None
) -> dg.SensorResult:
    policy = RetrainPolicyResource(cooldown_seconds=0)
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"registry": registry, "retrain_policy": policy}
    )
    result = retrain_sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def test_a_tick_whose_cursor_was_lost_decides_nothing_twice(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    runs = [_succeeded_ingest(instance, m) for m in ("2013-01", "2013-02", "2013-03")]
    first = _tick(instance, registry, cursor=None)
    # The daemon dies here: the decisions are on disk, the cursor is not. The next tick starts
    # again from the cursor before this one (none).
    again = _tick(instance, registry, cursor=None)
    decisions = [d for d in registry.decisions() if d["action"] in ("retrain", "no_retrain")]
    assert sorted(d["ingest_run"] for d in decisions) == sorted(runs)
    assert [r.run_key for r in first.run_requests or []] == [
        r.run_key for r in again.run_requests or []
    ]
    assert len(first.run_requests or []) == 1
    # Dagster creates the requested run (not started yet); with it, the waiting months
    # are covered: the next tick decides nothing and asks for nothing.
    (request,) = again.run_requests or []
    instance.add_run(dg.DagsterRun(
        job_name=RETRAIN_JOB, status=dg.DagsterRunStatus.NOT_STARTED,
        tags={**request.tags, "dagster/run_key": request.run_key},
    ))  # fmt: skip
    assert not _tick(instance, registry, cursor=again.cursor).run_requests
    assert not _tick(instance, registry, cursor=None).run_requests
    assert len(registry.decisions()) == len(decisions)


def test_held_months_wait_for_the_lane_and_one_retrain_covers_them(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    for month in ("2013-01", "2013-02"):
        _succeeded_ingest(instance, month)
    busy = dg.DagsterRun(job_name=INGEST_JOB, status=dg.DagsterRunStatus.STARTED,
                         tags={"dagster/partition": "2013-03"})  # fmt: skip
    instance.add_run(busy)
    held = _tick(instance, registry, cursor=None)
    assert not held.run_requests
    assert "2013-03" in str(held.skip_reason) and "started" in str(held.skip_reason)
    instance.report_run_failed(busy)  # the busy run ends: the lane is quiet
    (request,) = _tick(instance, registry, cursor=held.cursor).run_requests or []
    assert request.tags["mlops/months"] == "2013-01,2013-02"
