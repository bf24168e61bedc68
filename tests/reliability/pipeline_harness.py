"""A real ``dagster-daemon`` on a temporary instance, for the pipeline reliability tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import psutil
import pytest
import yaml

from resources.extract import frame_checksum
from tests.test_loop import REFERENCE, ROOT, Loop, loop_env


class Harness(Loop):
    """``tests.test_loop.Loop`` on any workspace, with exact cleanup of every process it started.

    The daemon starts in its own session; its code servers and their run workers inherit that
    session even after the daemon dies (``kill -9`` orphans them), so teardown stops every process
    of every session this harness created, and nothing else.
    """

    def __init__(self, home: Path, dagster_home: Path, env: dict[str, str], workspace: Path):
        super().__init__(home, dagster_home, env)
        self.workspace = workspace
        self.sessions: set[int] = set()

    def start_daemon(self) -> None:
        log = open(self.home / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
        self.daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(self.workspace)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.sessions.add(self.daemon.pid)

    def kill_daemon_only(self) -> None:
        """``kill -9`` the daemon process alone: its code server and runs live on, orphaned."""
        assert self.daemon is not None
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=60)
        self.daemon = None

    def processes(self) -> list[psutil.Process]:
        """Every live process in a session this harness started."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) in self.sessions:
                    found.append(proc)
            except (ProcessLookupError, PermissionError):
                continue
        return found

    def run_worker_pid(self, run_id: str) -> int:
        """The pid the code server reported for the run's worker process (an engine event)."""
        for entry in self.instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            message = entry.message or ""
            if message.startswith("Started process for run (pid: "):
                return int(message.split("pid: ")[1].split(")")[0])
        raise LookupError(f"run {run_id} has not reported its worker pid yet")

    def stop_everything(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            os.killpg(self.daemon.pid, signal.SIGTERM)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None
        deadline = time.monotonic() + 20
        while (left := self.processes()) and time.monotonic() < deadline:
            for proc in left:
                sig = signal.SIGTERM if time.monotonic() < deadline - 10 else signal.SIGKILL
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.5)


def write_instance_yaml(dagster_home: Path, poll_interval_seconds: int = 1) -> dict:
    """The project's ``dagster.yaml``, with run monitoring polled fast enough for a test."""
    config = yaml.safe_load((ROOT / "dagster.yaml").read_text())
    config["run_monitoring"]["poll_interval_seconds"] = poll_interval_seconds
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return config


def write_workspace(folder: Path, module: str) -> Path:
    path = folder / "workspace.yaml"
    entry = {"python_module": {"module_name": module, "working_directory": str(ROOT)}}
    path.write_text(yaml.safe_dump({"load_from": [entry]}))
    return path


def make_harness(
    made: list[Harness],
    tmp_path_factory: pytest.TempPathFactory,
    module: str = "mlops_assets.definitions",
    **extra_env: str,
) -> Harness:
    """A temp MLOPS_HOME and DAGSTER_HOME, the reference tables materialized, no daemon yet."""
    from mlops_assets.definitions import defs
    from resources import default_resources

    home = tmp_path_factory.mktemp("mlops")
    dagster_home = tmp_path_factory.mktemp("dagster_home")
    write_instance_yaml(dagster_home)
    env = loop_env(home, dagster_home, **extra_env)
    os.environ.update(env)
    workspace = write_workspace(home, module)
    harness = Harness(home, dagster_home, env, workspace)
    made.append(harness)
    assert dg.materialize(
        list(defs.assets), selection=REFERENCE, resources=default_resources(),
        instance=harness.instance,
    ).success  # fmt: skip
    return harness


def warehouse_checksums(root: Path) -> dict[str, str]:
    """``table/partition.parquet`` -> frame checksum, for every stored partition."""
    return {
        str(path.relative_to(root)): frame_checksum(pl.read_parquet(path))
        for path in sorted(root.rglob("*.parquet"))
    }


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.name.endswith(".tmp"))
