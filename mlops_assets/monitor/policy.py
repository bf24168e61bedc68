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


def _last_retrain(
    instance: dg.DagsterInstance, decisions: list[dict[str, Any]]
) -> tuple[float, float]:
    """``(asked, covers)`` for the newest retrain, a ``retrain`` job run or an ingest run's
    decision to retrain in-run. ``asked``: when it was asked for (the cooldown counts from
    here). ``covers``: decisions made before this time are covered, because that retrain built
    its training set after them (a job run that has not started yet will: it covers all)."""
    in_run = [float(d["decided_at"]) for d in decisions
              if d.get("retrain_in_run") and "decided_at" in d]  # fmt: skip
    records = instance.get_run_records(dg.RunsFilter(job_name=RETRAIN_JOB), limit=1)
    asked = covers = 0.0
    if records:
        asked = records[0].create_timestamp.timestamp()
        if records[0].start_time is not None:
            covers = records[0].start_time
        elif records[0].dagster_run.status in ACTIVE:
            covers = math.inf
    return max([asked, *in_run]), max([covers, *in_run])


def waiting_months(
    instance: dg.DagsterInstance, registry: ModelRegistryResource
) -> dict[str, dict[str, Any]]:
    """Months whose retrain was held and that no retrain has covered since: month -> its
    (newest) decision."""
    decisions = _month_decisions(registry)
    _, since = _last_retrain(instance, decisions)
    waiting: dict[str, dict[str, Any]] = {}
    for d in decisions:
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
    asked, _ = _last_retrain(instance, _month_decisions(registry))
    wait = policy.cooldown_seconds - (time.time() - asked)
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
