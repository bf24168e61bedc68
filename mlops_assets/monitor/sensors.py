"""The closed loop: new files become ingest runs, drift or decay becomes a retrain, no clicks.

- ``landing_sensor`` starts one ``ingest_month`` run per landed file *content*: the run key is
  the month plus the file's sha256, so landing the same bytes twice starts one run, a corrected
  export starts a new one, and a daemon restart neither loses nor doubles a run (Dagster skips a
  run key it has already launched; the cursor only saves re-hashing unchanged files).
- ``ingest_month`` materializes the month from raw file to features, then its drift and the
  champion's performance on it (with their checks), then ``retrain_decision``: when the month's
  importance-weighted drift or the champion's AUC decay passes its threshold (or an earlier
  month still waits for a retrain), and no other run of the model lane is queued or running,
  and the cooldown is over, the same run goes on to retrain → evaluate and gate → promote →
  swap. One run from landed file to served model: no second run worker, no sensor hop.
- ``retrain_sensor`` starts the retrain that a held month waits for, once the model lane is
  quiet and the cooldown is over: *one* ``retrain`` run for all waiting months (its rolling
  window includes them all). It also decides, as ``retrain_decision`` would, for a successful
  ingest run that made no decision (a run launched with a narrower selection). Decisions are
  recorded, with their reason, in the registry's decision log and on ``retrain_decision``.
  With no champion yet, the first ingested months start the first training.
- ``dagster.yaml`` runs the model lane (``mlops/lane`` tag: ingest and retrain runs) one run at
  a time, so a month is decided after the month before it has been ingested, and a month that
  lands while another is being ingested is covered by the later run's retrain.
- ``retrain`` runs training set → challenger → evaluation and the blocking promotion gate →
  champion alias → in-place swap on Ray Serve. A rejected challenger stops at the gate.
- ``weekly_retrain`` is the fallback schedule; ``monitor_automation`` keeps the prediction log
  ingested (on a cron) and the live-traffic drift view up to date (eager), declaratively.
"""

from __future__ import annotations

import hashlib
import json
import time

import dagster as dg

from mlops_assets.monitor.policy import (
    INGEST_JOB,
    LANE_TAG,
    RETRAIN_JOB,
    Verdict,
    decision_of,
    hold,
    recorded_decisions,
    verdict_for,
    waiting_months,
)
from mlops_assets.partitions import MONTHLY
from resources.extract import sha256_bytes
from resources.files import LandingFilesResource
from resources.registry import ModelRegistryResource
from resources.retrain_policy import RetrainPolicyResource

INGEST_ASSETS = [
    "raw_flights", "raw_weather", "flights", "weather", "flight_features", "flight_drift",
    "champion_performance",
]  # fmt: skip
RETRAIN_ASSETS = [
    "training_set", "challenger_model", "frozen_eval_set", "model_evaluation", "champion_model",
    "served_model",
]  # fmt: skip
DECIDED_MEMORY = 500  # ingest runs remembered in the cursor (older ones are never re-read)

LANE = {LANE_TAG: "model"}

ingest_month_job = dg.define_asset_job(
    INGEST_JOB,
    selection=dg.AssetSelection.assets(*INGEST_ASSETS, "retrain_decision", *RETRAIN_ASSETS),
    executor_def=dg.in_process_executor,
    tags=LANE,
    description="One landed month: raw file → validated → features → drift and performance → "
    "retrain decision; when it says retrain now, the same run retrains, gates, promotes and "
    "swaps the served model (otherwise those steps are skipped).",
)
retrain_job = dg.define_asset_job(
    RETRAIN_JOB,
    selection=dg.AssetSelection.assets(*RETRAIN_ASSETS),
    executor_def=dg.in_process_executor,
    tags=LANE,
    description="Retrain on the rolling window, evaluate, gate, promote and swap the served model.",
)


def _retrain_config(policy: RetrainPolicyResource) -> dict[str, object]:
    """``challenger_model``'s run config for the loop's runs (the schedule's runs have none)."""
    config: dict[str, object] = {"reuse_champion_params": policy.reuse_champion_params}
    if policy.n_trials:
        config["n_trials"] = policy.n_trials
    return {"ops": {"challenger_model": {"config": config}}}


@dg.sensor(
    job=ingest_month_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A new or changed monthly file in the landing directory starts one ingest run.",
)
def landing_sensor(
    context: dg.SensorEvaluationContext,
    landing: LandingFilesResource,
    retrain_policy: RetrainPolicyResource,
) -> dg.SensorResult:
    seen: dict[str, dict[str, str]] = json.loads(context.cursor) if context.cursor else {}
    requests = []
    known = set(MONTHLY.get_partition_keys())
    for month in landing.landed_months():
        if month not in known:
            context.log.warning(f"ignoring landed month {month}: not a partition of the graph")
            continue
        path = landing.path_for(month)
        if path is None:
            continue
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        if seen.get(path.name, {}).get("stamp") == stamp:
            continue
        digest = sha256_bytes(path.read_bytes())
        seen[path.name] = {"stamp": stamp, "sha256": digest}
        requests.append(
            dg.RunRequest(
                run_key=f"{month}:{digest[:16]}",
                partition_key=month,
                run_config=_retrain_config(retrain_policy),
                tags={"mlops/landed_file": path.name, "mlops/sha256": digest},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="no new or changed file", cursor=json.dumps(seen))
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen))


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Months whose retrain was held (another model-lane run, the cooldown) retrain "
    "together once the lane is quiet: one run, whose rolling window holds them all.",
)
def retrain_sensor(
    context: dg.SensorEvaluationContext,
    registry: ModelRegistryResource,
    retrain_policy: RetrainPolicyResource,
) -> dg.SensorResult:
    state = json.loads(context.cursor) if context.cursor else {}
    seen: list[str] = state.get("decided", [])  # ingest runs already looked at
    instance = context.instance

    finished = instance.get_run_records(
        dg.RunsFilter(
            job_name=INGEST_JOB,
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE],
        ),
        limit=100,
    )
    events: list[dg.AssetObservation] = []
    recorded: dict[str, dict[str, object]] | None = None
    for record in reversed(finished):  # oldest first
        run = record.dagster_run
        month = run.tags.get("dagster/partition")
        if run.run_id in seen or month is None:
            continue
        if recorded is None:
            recorded = recorded_decisions(registry)
        if decision_of(recorded, run) is None and run.status == dg.DagsterRunStatus.SUCCESS:
            # The run made no decision (launched without retrain_decision): decide for it, and
            # let the month wait for the retrain below.
            verdict: Verdict = verdict_for(instance, month, registry, retrain_policy)
            registry.record_decision(
                "retrain" if verdict.retrain else "no_retrain", registry.champion(),
                verdict.reason, month=month, ingest_run=run.run_id, retrain_in_run=False,
                decided_at=time.time(),
            )  # fmt: skip
            events.append(
                dg.AssetObservation(
                    asset_key="retrain_decision",
                    partition=month,
                    metadata={
                        "decision": "held" if verdict.retrain else "no retrain",
                        "reason": verdict.reason,
                    },
                )
            )
            context.log.info(verdict.reason)
        seen.append(run.run_id)

    requests: list[dg.RunRequest] = []
    skip = None
    waiting = waiting_months(instance, registry)
    if waiting:
        months = sorted(waiting)
        held = hold(instance, registry, retrain_policy, run_id=None)
        if held:
            skip = f"{months} wait: {held}"
        else:
            # Deterministic key: a tick re-evaluated after a crash between launching the run and
            # saving the cursor asks for the same run, which Dagster skips.
            decided = [[m, waiting[m].get("decided_at")] for m in months]
            key = hashlib.sha256(json.dumps(decided).encode()).hexdigest()[:16]
            requests.append(
                dg.RunRequest(
                    run_key=f"retrain:{'+'.join(months)}:{key}",
                    run_config=_retrain_config(retrain_policy),
                    tags={
                        "mlops/trigger": "monitor",
                        "mlops/months": ",".join(months),
                        "mlops/reason": "; ".join(str(waiting[m]["reason"]) for m in months)[:1000],
                    },
                )
            )
    cursor = json.dumps({"decided": seen[-DECIDED_MEMORY:]})
    if not requests and skip is None:
        skip = "no month waits for a retrain"
    return dg.SensorResult(
        run_requests=requests, skip_reason=None if requests else skip, cursor=cursor,
        asset_events=events,
    )  # fmt: skip


weekly_retrain = dg.ScheduleDefinition(
    name="weekly_retrain",
    job=retrain_job,
    cron_schedule="0 4 * * 1",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    tags={"mlops/trigger": "schedule"},
    description="Fallback: retrain, gate and swap every Monday 04:00 even without a signal.",
)

monitor_automation = dg.AutomationConditionSensorDefinition(
    "monitor_automation",
    target=dg.AssetSelection.assets("prediction_log", "live_traffic_drift"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
)

jobs = [ingest_month_job, retrain_job]
sensors = [landing_sensor, retrain_sensor, monitor_automation]
schedules = [weekly_retrain]
