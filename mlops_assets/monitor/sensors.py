"""The closed loop: new files become ingest runs, drift or decay becomes a retrain, no clicks.

- ``landing_sensor`` starts one ``ingest_month`` run per landed file *content*: the run key is
  the month plus the file's sha256, so landing the same bytes twice starts one run, a corrected
  export starts a new one, and a daemon restart neither loses nor doubles a run (Dagster skips a
  run key it has already launched; the cursor only saves re-hashing unchanged files).
- ``ingest_month`` materializes the month from raw file to features, then its drift and the
  champion's performance on it (with their checks).
- ``retrain_sensor`` decides once per successful ``ingest_month`` run: retrain when the month's
  importance-weighted drift or the champion's AUC decay passes its threshold (the thresholds
  are the monitor assets' config, shown in their checks). Decisions are recorded, with their
  reason, in the registry's decision log and as an observation on the month's drift partition.
  Hysteresis: while a retrain or an ingest runs, or within the cooldown after a retrain
  started, triggered months wait and are then covered by *one* retrain (whose rolling window
  includes them all). With no champion yet, the first ingested months start the first training.
- ``retrain`` runs training set → challenger → evaluation and the blocking promotion gate →
  champion alias → in-place swap on Ray Serve. A rejected challenger stops at the gate.
- ``weekly_retrain`` is the fallback schedule; ``monitor_automation`` keeps the prediction log
  ingested (on a cron) and the live-traffic drift view up to date (eager), declaratively.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

import dagster as dg

from mlops_assets.partitions import MONTHLY
from resources.extract import sha256_bytes
from resources.files import LandingFilesResource
from resources.registry import ModelRegistryResource
from resources.retrain_policy import RetrainPolicyResource

INGEST_JOB = "ingest_month"
RETRAIN_JOB = "retrain"
INGEST_ASSETS = [
    "raw_flights", "raw_weather", "flights", "weather", "flight_features", "flight_drift",
    "champion_performance",
]  # fmt: skip
RETRAIN_ASSETS = [
    "training_set", "challenger_model", "frozen_eval_set", "model_evaluation", "champion_model",
    "served_model",
]  # fmt: skip
ACTIVE = [
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]  # fmt: skip
DECIDED_MEMORY = 500  # ingest runs remembered in the cursor (older ones are never re-read)

ingest_month_job = dg.define_asset_job(
    INGEST_JOB,
    selection=dg.AssetSelection.assets(*INGEST_ASSETS),
    executor_def=dg.in_process_executor,
    description="One landed month: raw file → validated → features → drift and performance.",
)
retrain_job = dg.define_asset_job(
    RETRAIN_JOB,
    selection=dg.AssetSelection.assets(*RETRAIN_ASSETS),
    executor_def=dg.in_process_executor,
    description="Retrain on the rolling window, evaluate, gate, promote and swap the served model.",
)


@dg.sensor(
    job=ingest_month_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A new or changed monthly file in the landing directory starts one ingest run.",
)
def landing_sensor(
    context: dg.SensorEvaluationContext, landing: LandingFilesResource
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
                tags={"mlops/landed_file": path.name, "mlops/sha256": digest},
            )
        )
    if not requests:
        return dg.SensorResult(skip_reason="no new or changed file", cursor=json.dumps(seen))
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen))


@dataclass(frozen=True)
class Verdict:
    month: str
    retrain: bool
    reason: str
    drift_share: float | None = None
    auc_drop: float | None = None


def _latest(instance: dg.DagsterInstance, key: str, month: str) -> dict[str, object] | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[month]), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def judge(instance: dg.DagsterInstance, month: str, policy: RetrainPolicyResource) -> Verdict:
    """Should the month's drift and the champion's performance on it start a retrain?"""
    drift = _latest(instance, "flight_drift", month) or {}
    performance = _latest(instance, "champion_performance", month) or {}
    if "skipped" in drift or "skipped" in performance:
        why = drift.get("skipped") or performance.get("skipped")
        return Verdict(month, False, f"no retrain for {month}: monitoring skipped ({why})")
    share = drift.get("weighted_drift_share")
    max_share = drift.get("max_drift_share")
    drop = performance.get("auc_drop")
    max_drop = performance.get("max_auc_drop")
    in_training = bool(performance.get("in_training")) or bool(drift.get("in_reference"))
    reasons, quiet = [], []
    if isinstance(share, float) and isinstance(max_share, float):
        text = f"weighted drift share {share:.3f} vs {max_share}"
        drifted = share > max_share
        (reasons if drifted and policy.retrain_on_drift else quiet).append(text)
    if isinstance(drop, float) and isinstance(max_drop, float) and not math.isnan(drop):
        text = f"AUC drop {drop:+.4f} vs {max_drop}"
        decayed = drop > max_drop and not in_training
        (reasons if decayed and policy.retrain_on_decay else quiet).append(text)
    if in_training:
        return Verdict(month, False, f"no retrain for {month}: the champion trained on it",
                       share, drop)  # fmt: skip
    if reasons:
        return Verdict(month, True, f"retrain for {month}: " + "; ".join(reasons), share, drop)
    return Verdict(
        month, False, f"no retrain for {month}: " + ("; ".join(quiet) or "no signal"), share,
        drop,
    )  # fmt: skip


@dg.sensor(
    job=retrain_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Drift or decay on a newly ingested month retrains, gates, promotes and swaps.",
)
def retrain_sensor(
    context: dg.SensorEvaluationContext,
    registry: ModelRegistryResource,
    retrain_policy: RetrainPolicyResource,
) -> dg.SensorResult:
    state = json.loads(context.cursor) if context.cursor else {}
    decided: list[str] = state.get("decided", [])
    pending: dict[str, str] = state.get("pending", {})  # month -> reason, waiting to retrain
    last_retrain = float(state.get("last_retrain_at", 0.0))
    instance = context.instance

    finished = instance.get_run_records(
        dg.RunsFilter(job_name=INGEST_JOB, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=100
    )
    events: list[dg.AssetObservation] = []
    recorded: dict[str, dict[str, object]] | None = None
    for record in reversed(finished):  # oldest first
        run = record.dagster_run
        month = run.tags.get("dagster/partition")
        if run.run_id in decided or month is None:
            continue
        if recorded is None:
            recorded = {
                d["ingest_run"]: d
                for d in registry.decisions()
                if d.get("action") in ("retrain", "no_retrain") and d.get("ingest_run")
            }
        prior = recorded.get(run.run_id)
        if prior is not None:
            # Decided by a tick whose cursor was lost (the daemon died in between): keep it.
            verdict = Verdict(month, prior["action"] == "retrain", str(prior["reason"]))
        else:
            verdict = (
                judge(instance, month, retrain_policy)
                if registry.champion()
                else Verdict(
                    month, True, "no champion yet: train the first model on the landed months"
                )
            )
            registry.record_decision(
                "retrain" if verdict.retrain else "no_retrain", registry.champion(),
                verdict.reason, month=month, ingest_run=run.run_id,
            )  # fmt: skip
        decided.append(run.run_id)
        events.append(
            dg.AssetObservation(
                asset_key="flight_drift",
                partition=month,
                metadata={
                    "retrain_decision": "retrain" if verdict.retrain else "no retrain",
                    "reason": verdict.reason,
                },
            )
        )
        context.log.info(verdict.reason)
        if verdict.retrain:
            pending[month] = verdict.reason

    requests: list[dg.RunRequest] = []
    skip = None
    if pending:
        # Retrain once ingestion is quiet, so the rolling window holds every landed month.
        active = [
            r
            for job in (RETRAIN_JOB, INGEST_JOB)
            for r in instance.get_run_records(dg.RunsFilter(job_name=job, statuses=ACTIVE), limit=1)
        ]
        wait = retrain_policy.cooldown_seconds - (time.time() - last_retrain)
        if active:
            run = active[0].dagster_run
            skip = f"{sorted(pending)} wait: {run.job_name} run {run.run_id} is active"
        elif wait > 0:
            skip = f"{sorted(pending)} wait: cooldown, {wait:.0f} s left"
        else:
            months = sorted(pending)
            # Deterministic key: re-evaluating the same ingest runs after a crash between
            # launching the run and saving the cursor asks for the same run, which Dagster skips.
            key = hashlib.sha256(json.dumps([months, decided[-50:]]).encode()).hexdigest()[:16]
            trials = retrain_policy.n_trials
            requests.append(
                dg.RunRequest(
                    run_key=f"retrain:{'+'.join(months)}:{key}",
                    run_config={"ops": {"challenger_model": {"config": {"n_trials": trials}}}}
                    if trials
                    else {},
                    tags={
                        "mlops/trigger": "monitor",
                        "mlops/months": ",".join(months),
                        "mlops/reason": "; ".join(pending[m] for m in months)[:1000],
                    },
                )
            )
            pending, last_retrain = {}, time.time()
    cursor = json.dumps(
        {"decided": decided[-DECIDED_MEMORY:], "pending": pending, "last_retrain_at": last_retrain}
    )
    if not requests and skip is None:
        skip = "no newly ingested month" if not events else "no month asked for a retrain"
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
