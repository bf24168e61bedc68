"""The loop's hysteresis on a real instance and a real decision log: what holds a due retrain,
which held months still wait, and what covers them."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import pytest

from mlops_assets.monitor import policy, sensors
from resources import default_resources
from resources.registry import ModelRegistryResource
from resources.retrain_policy import RetrainPolicyResource


def _decide(registry: ModelRegistryResource, month: str, *, in_run: bool, at: float) -> None:
    registry.record_decision(
        "retrain", None, f"retrain for {month}", month=month, ingest_run=f"run-{month}",
        retrain_in_run=in_run, decided_at=at,
    )  # fmt: skip


def _run(instance: dg.DagsterInstance, job: str, status: dg.DagsterRunStatus) -> dg.DagsterRun:
    run = dg.DagsterRun(job_name=job, status=status, tags={"dagster/partition": "2013-05"})
    instance.add_run(run)
    return run


def test_the_cooldown_counts_from_the_last_in_run_retrain(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    two_minutes = RetrainPolicyResource(cooldown_seconds=120)
    assert policy.hold(instance, registry, two_minutes, None) is None
    _decide(registry, "2013-07", in_run=True, at=time.time() - 30)
    held = policy.hold(instance, registry, two_minutes, None)
    assert held is not None and held.startswith("cooldown"), held
    assert 80 <= int(held.split(", ")[1].split(" s left")[0]) <= 90, held
    assert policy.hold(instance, registry, RetrainPolicyResource(cooldown_seconds=20), None) is None


def test_another_lane_run_holds_a_retrain_but_the_deciding_run_does_not(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    quiet = RetrainPolicyResource(cooldown_seconds=0)
    me = _run(instance, policy.INGEST_JOB, dg.DagsterRunStatus.STARTED)
    assert policy.hold(instance, registry, quiet, me.run_id) is None
    other = _run(instance, policy.INGEST_JOB, dg.DagsterRunStatus.NOT_STARTED)
    held = policy.hold(instance, registry, quiet, me.run_id)
    assert held is not None and other.run_id[:8] in held and "[2013-05]" in held
    instance.report_run_failed(other)
    assert policy.hold(instance, registry, quiet, me.run_id) is None
    # The sensor (no run of its own) is held by any lane run, a retrain run too.
    instance.report_run_failed(me)
    assert policy.hold(instance, registry, quiet, None) is None
    _run(instance, policy.RETRAIN_JOB, dg.DagsterRunStatus.NOT_STARTED)
    assert "retrain run" in str(policy.hold(instance, registry, quiet, None))


def test_held_months_wait_until_a_later_retrain_covers_them(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    now = time.time()
    _decide(registry, "2013-07", in_run=False, at=now - 60)
    _decide(registry, "2013-08", in_run=False, at=now - 50)
    registry.record_decision(
        "no_retrain", None, "no signal", month="2013-09", ingest_run="run-2013-09",
        retrain_in_run=False, decided_at=now - 45,
    )  # fmt: skip
    assert set(policy.waiting_months(instance, registry)) == {"2013-07", "2013-08"}
    _decide(registry, "2013-10", in_run=True, at=now - 40)  # covers what was decided before
    _decide(registry, "2013-11", in_run=False, at=now - 30)
    assert set(policy.waiting_months(instance, registry)) == {"2013-11"}
    # A retrain run that has not started yet will build its training set later: it covers all.
    _run(instance, policy.RETRAIN_JOB, dg.DagsterRunStatus.NOT_STARTED)
    assert policy.waiting_months(instance, registry) == {}


def test_a_decision_made_outside_the_ingest_job_holds_the_retrain_for_the_sensor(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """Materializing ``retrain_decision`` alone (as from the UI) decides, but cannot retrain in
    a run without the training steps: the month waits for the retrain sensor."""
    from mlops_assets.monitor.assets import retrain_decision

    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    result = dg.materialize(
        [retrain_decision], partition_key="2013-03",
        resources={"registry": registry, "retrain_policy": RetrainPolicyResource()},
        instance=instance,
    )  # fmt: skip
    assert result.success
    assert result.asset_materializations_for_node("retrain_decision") == []
    (observation,) = result.asset_observations_for_node("retrain_decision")
    assert observation.metadata["decision"].value == "held"
    assert "does not include the training steps" in observation.metadata["reason"].value
    (decision,) = registry.decisions()
    assert decision["action"] == "retrain" and decision["retrain_in_run"] is False
    assert decision["ingest_run"] == result.run_id
    assert set(policy.waiting_months(instance, registry)) == {"2013-03"}


def test_loop_retrains_reuse_the_champion_s_parameters_unless_told_to_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def trainer(config: dict[str, object]) -> dict[str, object]:
        return config["ops"]["challenger_model"]["config"]  # type: ignore[index]

    assert trainer(sensors._retrain_config(RetrainPolicyResource())) == {
        "reuse_champion_params": True
    }
    searching = RetrainPolicyResource(n_trials=4, reuse_champion_params=False)
    assert trainer(sensors._retrain_config(searching)) == {
        "reuse_champion_params": False, "n_trials": 4
    }  # fmt: skip
    monkeypatch.delenv("MLOPS_RETRAIN_SEARCH", raising=False)
    assert default_resources()["retrain_policy"].reuse_champion_params is True
    monkeypatch.setenv("MLOPS_RETRAIN_SEARCH", "1")
    assert default_resources()["retrain_policy"].reuse_champion_params is False
    monkeypatch.setenv("MLOPS_RETRAIN_SEARCH", "yes")
    with pytest.raises(ValueError, match="MLOPS_RETRAIN_SEARCH must be 0 or 1"):
        default_resources()
