"""When does a landed month retrain, and where: the verdict, the hold, the months waiting.

A landed month's verdict (``judge``) comes from its drift and the champion's performance on it.
A retrain that is due runs *in the month's own ingest run* (``retrain_decision`` lets the
training steps downstream of it go on) unless something holds it: another run of the model
lane (an ingest or retrain run, queued or running) or the cooldown after the last retrain. A
held month waits. The next ingest run that retrains covers it (its rolling window holds every
landed month), and otherwise the retrain sensor starts one retrain for all waiting months once
the lane is quiet.

Every decision goes to the registry's decision log with the ingest run that made it, so the
sensor and later runs read what was decided instead of deciding again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import dagster as dg

from resources.registry import ModelRegistryResource
from resources.retrain_policy import RetrainPolicyResource

INGEST_JOB = "ingest_month"
RETRAIN_JOB = "retrain"
LANE_TAG = "mlops/lane"
"""Runs that may train or swap the model carry this tag; ``dagster.yaml`` runs one at a time."""
ACTIVE = [
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]  # fmt: skip


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


def verdict_for(
    instance: dg.DagsterInstance, month: str, registry: ModelRegistryResource,
    policy: RetrainPolicyResource,
) -> Verdict:  # fmt: skip
    if registry.champion() is None:
        return Verdict(month, True, "no champion yet: train the first model on the landed months")
    return judge(instance, month, policy)


def _month_decisions(registry: ModelRegistryResource) -> list[dict[str, Any]]:
    return [d for d in registry.decisions() if d.get("action") in ("retrain", "no_retrain")]


def _newest_retrain_job(instance: dg.DagsterInstance) -> Any | None:
    records = instance.get_run_records(dg.RunsFilter(job_name=RETRAIN_JOB), limit=1)
    return records[0] if records else None


def _in_run_retrains(registry: ModelRegistryResource) -> list[float]:
    return [float(d["decided_at"]) for d in _month_decisions(registry)
            if d.get("retrain_in_run") and "decided_at" in d]  # fmt: skip


def last_retrain_at(instance: dg.DagsterInstance, registry: ModelRegistryResource) -> float:
    """When the newest retrain was asked for (a ``retrain`` job run created, or an ingest run's
    decision to retrain in-run): the cooldown counts from here."""
    record = _newest_retrain_job(instance)
    created = record.create_timestamp.timestamp() if record else 0.0
    return max([created, *_in_run_retrains(registry)])


def _covered_until(instance: dg.DagsterInstance, registry: ModelRegistryResource) -> float:
    """Decisions made before this time are covered by a retrain that built its training set
    after them: an in-run retrain decided later, or a ``retrain`` job run started later (or
    still waiting to start)."""
    record = _newest_retrain_job(instance)
    job = 0.0
    if record is not None:
        if record.start_time is not None:
            job = record.start_time
        elif record.dagster_run.status in ACTIVE:
            job = math.inf
    return max([job, *_in_run_retrains(registry)])


def waiting_months(
    instance: dg.DagsterInstance, registry: ModelRegistryResource
) -> dict[str, dict[str, Any]]:
    """Months whose retrain was held and that no retrain has covered since: month -> its
    (newest) decision."""
    since = _covered_until(instance, registry)
    waiting: dict[str, dict[str, Any]] = {}
    for d in _month_decisions(registry):
        held = d["action"] == "retrain" and d.get("retrain_in_run") is False
        if held and float(d.get("decided_at", 0.0)) > since:
            waiting[str(d["month"])] = d
    return waiting


def hold(
    instance: dg.DagsterInstance, registry: ModelRegistryResource,
    policy: RetrainPolicyResource, run_id: str | None,
) -> str | None:  # fmt: skip
    """Why a due retrain may not start now (``None``: it may)."""
    for job in (INGEST_JOB, RETRAIN_JOB):
        for record in instance.get_run_records(dg.RunsFilter(job_name=job, statuses=ACTIVE)):
            run = record.dagster_run
            if run.run_id != run_id:
                partition = run.tags.get("dagster/partition")
                what = f"{job} run {run.run_id[:8]}" + (f" [{partition}]" if partition else "")
                return f"{what} is {run.status.value.lower()}; it retrains or the sensor will"
    wait = policy.cooldown_seconds - (time.time() - last_retrain_at(instance, registry))
    if wait > 0:
        return f"cooldown after the last retrain, {wait:.0f} s left"
    return None


def recorded_decisions(registry: ModelRegistryResource) -> dict[str, dict[str, Any]]:
    """The decision recorded for each ingest run id."""
    return {str(d["ingest_run"]): d for d in _month_decisions(registry) if d.get("ingest_run")}


def decision_of(recorded: dict[str, dict[str, Any]], run: dg.DagsterRun) -> dict[str, Any] | None:
    """The decision an ingest run made, or the run it re-executes (a retry after its worker
    died keeps its root's decision)."""
    return recorded.get(run.run_id) or (recorded.get(run.root_run_id) if run.root_run_id else None)
