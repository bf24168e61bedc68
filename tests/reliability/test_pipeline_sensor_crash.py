"""The retrain sensor's crash window, tick by tick: a daemon killed after a tick recorded its
decisions but before Dagster saved the tick's cursor (seen for real by
``test_pipeline_daemon_kills``) re-evaluates the same ingest runs. They must not be decided twice,
and the retrain it asks for must carry the same run key (Dagster launches a run key once).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mlops_assets.monitor.sensors import INGEST_JOB, retrain_sensor
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
    # With the cursor saved, nothing more happens.
    assert not _tick(instance, registry, cursor=again.cursor).run_requests
    assert len(registry.decisions()) == len(decisions)
