"""The closed loop on a real daemon: land files, nobody clicks, the served model follows.

One module-scoped scenario on a real ``dagster-daemon`` (temp DAGSTER_HOME with the project's
``dagster.yaml``: queued runs, run monitoring), real files, the real data, and Ray Serve on
127.0.0.1:

1. land Jan–Jun: six ingest runs, one at a time (the model lane); the first five hold their
   retrain for the run queued behind them, and the June run itself trains, gates, promotes and
   serves the first champion: one retrain, no ``retrain`` job run;
2. land Oct, a month the Jan–Jun champion has decayed on (its AUC falls by more than 0.03;
   July no longer retrains, since the champion trains through June): one ingest run, drift and
   performance measured against the champion, one retrain decision, and the retrain in the
   same run, whose gate decides the served version;
3. land the identical Oct file again: no new run;
4. ``kill -9`` the daemon, land Nov while it is down, restart it: exactly one Nov ingest run
   and at most one retrain for it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest

from mlops_assets.definitions import defs
from mlops_assets.serve.ray_runtime import free_port, stop_local_ray
from resources import default_resources
from resources.files import land_month
from resources.registry import ModelRegistryResource

ROOT = Path(__file__).resolve().parents[1]
FIRST = [f"2013-0{m}" for m in range(1, 7)]
DECAYED, NEXT = "2013-10", "2013-11"
REFERENCE = ["raw_planes", "planes", "raw_airports", "airports", "raw_airlines", "airlines"]
pytestmark = pytest.mark.timeout(1500)


class Loop:
    def __init__(self, home: Path, dagster_home: Path, env: dict[str, str]) -> None:
        self.home, self.dagster_home, self.env = home, dagster_home, env
        self.daemon: subprocess.Popen[bytes] | None = None
        self.instance = dg.DagsterInstance.from_config(str(dagster_home))
        self.registry = ModelRegistryResource(root=str(home / "registry"))
        self.endpoint = f"http://127.0.0.1:{env['MLOPS_SERVE_PORT']}"

    def start_daemon(self) -> None:
        log = open(self.home / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
        self.daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run",
             "-w", str(ROOT / "workspace.yaml")],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        assert self.daemon is not None
        os.killpg(self.daemon.pid, sig)
        self.daemon.wait(timeout=60)
        self.daemon = None

    def runs(self, job: str, **tags: str) -> list[dg.DagsterRun]:
        return list(self.instance.get_runs(dg.RunsFilter(job_name=job, tags=tags)))

    def wait(self, what: str, ready: Callable[[], bool], timeout: float = 420) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            assert self.daemon is None or self.daemon.poll() is None, "the daemon died"
            time.sleep(2)
        log = (self.home / "daemon.log").read_text()[-4000:]
        raise AssertionError(f"timed out waiting for {what}\n{log}")

    def finished(self, runs: list[dg.DagsterRun]) -> bool:
        return bool(runs) and all(r.is_finished for r in runs)

    def decisions(self, action: str | None = None) -> list[dict[str, Any]]:
        entries = self.registry.decisions()
        return [d for d in entries if action is None or d["action"] == action]

    def retrains(self) -> int:
        """Challengers trained so far (by ingest runs and ``retrain`` runs alike)."""
        return len(self.instance.fetch_materializations(
            dg.AssetKey("challenger_model"), limit=100).records)  # fmt: skip

    def quiet(self) -> bool:
        return self.finished(self.runs("ingest_month")) and all(
            r.is_finished for r in self.runs("retrain")
        )

    def served_version(self) -> str | None:
        response = httpx.get(f"{self.endpoint}/healthz", timeout=10)
        return response.json().get("model_version")


def loop_env(home: Path, dagster_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a loop under test: its own homes and port, no cooldown, 2 trials,
    the embedded sources and a local Ray (whatever the calling shell points at)."""
    env = {
        **os.environ,
        "MLOPS_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        "MLOPS_SERVE_PORT": str(free_port()),
        "MLOPS_RETRAIN_COOLDOWN_SECONDS": "0",
        "MLOPS_RETRAIN_TRIALS": "2",
        **extra,
    }
    for name in ("MLOPS_REFERENCE_DB_URL", "MLOPS_WEATHER_API_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    home = tmp_path_factory.mktemp("mlops")
    dagster_home = tmp_path_factory.mktemp("dagster_home")
    shutil.copyfile(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = loop_env(home, dagster_home)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    loop = Loop(home, dagster_home, env)
    try:
        # Reference tables are not monthly; `mlops up` materializes them the same way.
        assert dg.materialize(
            list(defs.assets), selection=REFERENCE, resources=default_resources(),
            instance=loop.instance,
        ).success  # fmt: skip
        loop.start_daemon()
        yield loop
    finally:
        if loop.daemon is not None:
            loop.kill_daemon(signal.SIGTERM)
        stop_local_ray(home / "ray")
        loop.instance.dispose()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_first_months_bootstrap_the_first_champion_with_no_clicks(loop: Loop) -> None:
    for month in FIRST:
        land_month(month, loop.home / "landing")
    loop.wait("six ingest runs and the bootstrap retrain", lambda: len(
        loop.runs("ingest_month")) == 6 and loop.quiet())  # fmt: skip
    ingests = loop.runs("ingest_month")
    assert sorted(r.tags["dagster/partition"] for r in ingests) == FIRST
    log = (loop.home / "daemon.log").read_text()[-4000:]
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in ingests), log
    # The lane ran them one at a time: every month but the last held its retrain for the run
    # queued behind it, and the last run retrained in-run, covering them all.
    decisions = loop.decisions("retrain")
    assert sorted(d["month"] for d in decisions) == FIRST
    assert all("no champion yet" in d["reason"] for d in decisions)
    (in_run,) = [d for d in decisions if d["retrain_in_run"]]
    assert in_run["month"] == FIRST[-1] and in_run["covers"] == FIRST
    assert all("is queued" in d["held"] for d in decisions if d is not in_run)
    starts = sorted(r.start_time for r in loop.instance.get_run_records(
        dg.RunsFilter(job_name="ingest_month")))  # fmt: skip
    ends = sorted(r.end_time for r in loop.instance.get_run_records(
        dg.RunsFilter(job_name="ingest_month")))  # fmt: skip
    assert all(end <= start for end, start in zip(ends, starts[1:], strict=False))
    time.sleep(12)  # two retrain-sensor ticks: the held months are covered, nothing starts
    assert loop.retrains() == 1 and loop.runs("retrain") == []
    champion = loop.registry.champion()
    assert champion is not None
    assert loop.served_version() == champion


def test_a_decayed_month_is_monitored_decided_once_and_retrained(loop: Loop) -> None:
    before = loop.registry.champion()
    land_month(DECAYED, loop.home / "landing")
    loop.wait("the October ingest run", lambda: loop.finished(loop.runs("ingest_month",
              **{"dagster/partition": DECAYED})))  # fmt: skip
    (decision,) = [d for d in loop.decisions() if d.get("month") == DECAYED]
    drift = loop.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("flight_drift"), asset_partitions=[DECAYED]),
        limit=1,
    ).records[0]
    metadata = drift.asset_materialization.metadata
    assert metadata["champion_version"].value == before
    assert 0.0 <= metadata["weighted_drift_share"].value <= 1.0
    assert Path(metadata["report"].value).is_file()
    assert decision["action"] == "retrain", decision["reason"]
    # Nothing else was in the lane and the test's cooldown is 0: the retrain runs in-run.
    assert decision["retrain_in_run"]
    time.sleep(12)  # two retrain-sensor ticks: nothing waits, so nothing starts
    assert loop.runs("retrain") == []
    assert loop.retrains() == 2
    gate = [d for d in loop.decisions("gate")][-1]
    after = loop.registry.champion()
    if gate["passed"]:  # what serves is the gated model refit on every landed month
        assert loop.registry.load(after).refit_of == gate["version"]
        assert DECAYED in loop.registry.load(after).trained_months
    else:
        assert after == before
    assert loop.served_version() == loop.registry.champion()


def test_landing_the_same_file_twice_starts_one_run(loop: Loop) -> None:
    land_month(DECAYED, loop.home / "landing", overwrite=True)  # same bytes, new mtime
    time.sleep(20)  # four landing-sensor ticks
    assert len(loop.runs("ingest_month", **{"dagster/partition": DECAYED})) == 1


def test_a_daemon_killed_between_ticks_loses_and_doubles_nothing(loop: Loop) -> None:
    retrains = loop.retrains()
    loop.kill_daemon()
    land_month(NEXT, loop.home / "landing")
    time.sleep(3)
    loop.start_daemon()
    loop.wait("the November ingest run", lambda: loop.finished(loop.runs("ingest_month",
              **{"dagster/partition": NEXT})))  # fmt: skip
    loop.wait("the lane quiet", loop.quiet)
    time.sleep(10)
    assert len(loop.runs("ingest_month", **{"dagster/partition": NEXT})) == 1
    assert loop.retrains() - retrains <= 1
    assert len([d for d in loop.decisions() if d.get("month") == NEXT]) == 1
    assert loop.served_version() == loop.registry.champion()
    # the sensors' state after the restart: every landed file is in the landing cursor
    cursors = {
        s.name: s.instigator_data.cursor
        for s in loop.instance.all_instigator_state()
        if s.instigator_data is not None and getattr(s.instigator_data, "cursor", None)
    }
    landed = json.loads(cursors["landing_sensor"])
    assert {f"flights_{DECAYED}.csv", f"flights_{NEXT}.csv"} <= set(landed)
