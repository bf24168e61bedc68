"""``kill -9`` a run worker in the middle of a warehouse write, on a real daemon.

The month is first materialized in-process to record what a clean run stores (frame checksums
of every partition), and those partitions are removed. Then the real ``dagster-daemon`` (the
project's ``dagster.yaml``: queued runs, run monitoring, run retries) turns the landed file into
an ``ingest_month`` run; the test watches the warehouse and ``kill -9``s the run's worker process
the moment a temporary Parquet file appears (a write in progress). Expected: the run ends FAILURE,
the daemon re-executes it once, the retry succeeds, no temporary file is left anywhere, and the
stored rows equal the clean run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from mlops_assets.definitions import defs
from mlops_assets.monitor.sensors import INGEST_ASSETS, INGEST_JOB
from resources import default_resources
from resources.files import land_month
from resources.storage import write_bytes_atomic
from tests.reliability.pipeline_harness import (
    Harness,
    make_harness,
    temp_files,
    warehouse_checksums,
)

MONTH = "2013-01"
pytestmark = pytest.mark.timeout(600)


def _clean_run(harness: Harness) -> dict[str, str]:
    """Materialize the month in-process (its own instance), record its partitions, remove them."""
    warehouse = harness.home / "warehouse"
    before = set(warehouse.rglob("*.parquet"))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            list(defs.assets), selection=INGEST_ASSETS, partition_key=MONTH,
            resources=default_resources(), instance=instance,
        )  # fmt: skip
        assert result.success
    clean = warehouse_checksums(warehouse)
    for path in set(warehouse.rglob("*.parquet")) - before:
        path.unlink()
    return clean


def _kill_worker_mid_write(harness: Harness, run_id: str, timeout: float = 240) -> Path:
    """Poll the warehouse every millisecond; ``kill -9`` the worker when a write is in progress."""
    deadline = time.monotonic() + timeout
    pid = None
    while pid is None:
        assert time.monotonic() < deadline, "the run never reported its worker pid"
        try:
            pid = harness.run_worker_pid(run_id)
        except LookupError:
            time.sleep(0.05)
    ours = {p.pid for p in harness.processes()}
    assert pid in ours, f"worker pid {pid} is not a process this test started"
    warehouse = harness.home / "warehouse"
    while time.monotonic() < deadline:
        for table in os.scandir(warehouse) if warehouse.exists() else ():
            for entry in os.scandir(table.path):
                if entry.name.endswith(".tmp"):
                    os.kill(pid, signal.SIGKILL)
                    return Path(entry.path)
        run = harness.instance.get_run_by_id(run_id)
        assert run is not None and not run.is_finished, "the run finished before any kill"
        time.sleep(0.001)
    raise AssertionError("no write in progress was seen")


@pytest.fixture(scope="module")
def harness(harness_factory: list[Harness], tmp_path_factory: pytest.TempPathFactory) -> Harness:
    return make_harness(
        harness_factory, tmp_path_factory, module="tests.reliability.ingest_location"
    )


# Full suite only: on a fast machine the write can finish before the kill lands (seen once in CI).
@pytest.mark.reliability_full
def test_a_worker_killed_mid_write_fails_is_retried_and_leaves_the_clean_rows(
    harness: Harness,
) -> None:
    land_month(MONTH, harness.home / "landing")
    clean = _clean_run(harness)
    assert any(key.startswith("flight_features/") for key in clean)
    harness.start_daemon()
    harness.wait("the ingest run to start", lambda: any(
        r.status == dg.DagsterRunStatus.STARTED for r in harness.runs(INGEST_JOB)
    ))  # fmt: skip
    (first,) = harness.runs(INGEST_JOB)
    cut = _kill_worker_mid_write(harness, first.run_id)
    killed_at = time.monotonic()
    orphan_seen = cut.exists()  # the dead writer's temp file, before anything cleans it

    harness.wait("the killed run to fail", lambda: harness.instance.get_run_by_id(
        first.run_id).status == dg.DagsterRunStatus.FAILURE, timeout=120)  # fmt: skip
    failed_after = time.monotonic() - killed_at
    harness.wait("the retry to finish", lambda: len(harness.runs(INGEST_JOB)) == 2
                 and harness.finished(harness.runs(INGEST_JOB)), timeout=300)  # fmt: skip
    runs = harness.runs(INGEST_JOB)
    retry = next(r for r in runs if r.run_id != first.run_id)
    crash = [
        e.message
        for e in harness.instance.all_logs(first.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        if "SIGKILL" in (e.message or "") or "signal 9" in (e.message or "")
    ]
    assert crash, "the failure does not say the worker was killed"
    assert retry.status == dg.DagsterRunStatus.SUCCESS, (harness.home / "daemon.log").read_text()
    assert retry.tags.get("dagster/parent_run_id") == first.run_id
    assert retry.tags.get("dagster/partition") == MONTH

    warehouse = harness.home / "warehouse"
    assert temp_files(warehouse) == []
    stored = warehouse_checksums(warehouse)
    assert stored == clean
    time.sleep(5)  # a retry is never retried again, and the sensor starts nothing else
    assert len(harness.runs(INGEST_JOB)) == 2
    print(
        f"\nFIGURES worker-kill: killed during write of {cut.parent.name}/{cut.name}; "
        f"orphan temp file after kill: {orphan_seen}; run FAILURE after {failed_after:.1f} s; "
        f"runs for the month: {len(runs)} (1 killed + 1 retry); partitions equal to clean: "
        f"{sum(stored[k] == clean[k] for k in clean)}/{len(clean)}; temp files left: 0"
    )


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from resources.storage import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"half a new vers")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_write_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    target = write_bytes_atomic(b"version 1", tmp_path / "table" / "2013-01.parquet")
    writer = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], check=False)
    assert writer.returncode == -signal.SIGKILL
    (orphan,) = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert orphan.read_bytes() == b"half a new vers"
    assert target.read_bytes() == b"version 1"  # readers never saw the half write
    # A temp file of a live writer (this process's parent here) is never touched.
    live = target.parent / f".{target.name}.{os.getppid()}.abcdefgh.tmp"
    live.write_bytes(b"in progress")
    write_bytes_atomic(b"version 2", target)
    assert target.read_bytes() == b"version 2"
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, live.name])
