"""Starting the local Ray head on a loaded machine (Ray's fixed raylet wait is retried), and
stopping it: nothing of its session is left running."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from mlops_assets.serve import ray_runtime
from mlops_assets.serve.ray_runtime import (
    LocalRayError,
    local_ray,
    ray_environment,
    start_local_ray,
    stop_local_ray,
)
from resources.storage import pid_alive

REAL_RAY = str(Path(sys.executable).parent / "ray")
OVERLOADED = (
    "Exception: The current node timed out during startup. This could happen because some of "
    "the raylet failed to startup or the GCS has become overloaded."
)


def _flaky_ray(tmp_path: Path, failures: int, message: str) -> tuple[Path, Path]:
    """A `ray` that fails its first ``failures`` calls with ``message``, then runs the real one."""
    counter = tmp_path / "attempts"
    script = tmp_path / "flaky-ray"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat "{counter}" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "{counter}"\n'
        f'if [ "$n" -le {failures} ]; then echo "{message}"; exit 1; fi\n'
        f'exec "{REAL_RAY}" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, counter


@pytest.fixture
def short_temp() -> Iterator[Path]:
    """Ray's socket paths need a short temp dir; pytest's are too long."""
    folder = Path(tempfile.mkdtemp(prefix="mlrs", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_head_that_times_out_registering_is_started_again(
    tmp_path: Path, short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, counter = _flaky_ray(tmp_path, 1, OVERLOADED)
    monkeypatch.setattr(ray_runtime, "_ray_cli", lambda: str(script))
    state = tmp_path / "ray"
    try:
        address = start_local_ray(state, num_cpus=1, temp_dir=short_temp)
        assert counter.read_text().strip() == "2"
        head = local_ray(state)
        assert head is not None and head.address == address
    finally:
        stopped = stop_local_ray(state)
    assert stopped and local_ray(state) is None


def test_other_start_failures_are_not_retried(
    tmp_path: Path, short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, counter = _flaky_ray(tmp_path, 5, "ValueError: --num-cpus must be positive")
    monkeypatch.setattr(ray_runtime, "_ray_cli", lambda: str(script))
    with pytest.raises(LocalRayError, match=r"exited with code 1(.|\n)*num-cpus must be positive"):
        start_local_ray(tmp_path / "ray", num_cpus=1, temp_dir=short_temp)
    assert counter.read_text().strip() == "1"


def test_a_head_that_never_registers_fails_after_the_last_attempt(
    tmp_path: Path, short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, counter = _flaky_ray(tmp_path, 99, OVERLOADED)
    monkeypatch.setattr(ray_runtime, "_ray_cli", lambda: str(script))
    with pytest.raises(LocalRayError, match="timed out during startup"):
        start_local_ray(tmp_path / "ray", num_cpus=1, temp_dir=short_temp)
    assert counter.read_text().strip() == str(ray_runtime.START_ATTEMPTS)
    assert local_ray(tmp_path / "ray") is None


# -- stopping: every process of the head's session, Ray's agents included ---------------------


def _session(session_id: int) -> list[int]:
    """Every live process of a session, whatever its environment or working directory."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            pid = int(entry.name) if entry.name.isdigit() else None
            if pid is not None and os.getsid(pid) == session_id and pid_alive(pid):
                found.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return sorted(found)


# Forks a process that ignores SIGTERM and sleeps, prints its pid and exits (so it has no parent).
# The fork leaves the worker's process group (Ray kills that group with the worker), not the
# session.
ORPHAN = """
import os, signal, time
pid = os.fork()
if pid:
    print(pid, flush=True)
    os._exit(0)
os.setpgid(0, 0)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(600)
"""


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


@ray.remote(num_cpus=0)
class Spawner:
    def spawn(self) -> int:
        """A grandchild, orphaned at once, in a process group of its own."""
        hidden = {"RAY_TMPDIR", "TMPDIR"}
        env = {k: v for k, v in os.environ.items() if k not in hidden}
        forked = subprocess.run(
            [sys.executable, "-c", ORPHAN], env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        return int(forked.stdout)


def _orphan_from_a_detached_actor(
    address: str, name: str, runtime_env: dict[str, str] | None = None
) -> int:
    """The orphan's PID, forked by a detached actor of a job (with ``runtime_env``) that ends."""
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        spawner = Spawner.options(name=name, lifetime="detached").remote()
        return ray.get(spawner.spawn.remote(), timeout=120)
    finally:
        ray.shutdown()


def test_stopping_the_head_leaves_no_process_of_its_session_behind(
    tmp_path: Path, short_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped head once left its ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` running
    after a test run (parent gone, deaf to SIGTERM). Their process title overwrites the start of
    their environment, so ``RAY_TMPDIR`` shows there only by chance and the stop did not count
    them as the head's; and they hung because the stop let Ray's 30 s SIGTERM drain run into
    our own SIGTERM/SIGKILL passes, which took the GCS down before them.

    Here a detached actor holds a lease through the stop (as Serve's actors do, so a drain could
    not finish) and has started a process in the head's session that shows no ``RAY_TMPDIR``,
    has no parent and ignores SIGTERM: an agent in that state. A second one does the same from
    a job with a ``working_dir`` (what CI's ``uv run`` once gave every worker). The stop must
    take both, the real agents and everything else in the session, promptly, without draining.
    """
    state_dir = tmp_path / "ray"
    address = start_local_ray(state_dir, num_cpus=1, temp_dir=short_temp)
    head = local_ray(state_dir)
    assert head is not None
    everything: list[int] = []
    try:
        for name, value in ray_environment(short_temp).items():
            monkeypatch.setenv(name, value)  # the driver agrees with the head (auth, temp dir)
        stray = _orphan_from_a_detached_actor(address, "spawner")
        # A job's `working_dir` runs its workers in Ray's copy under the temp dir: the stray
        # they start shows neither our RAY_TMPDIR nor the head's folder.
        job = tmp_path / "job"
        job.mkdir()
        (job / "note.txt").write_text("a working_dir")
        unpacked = _orphan_from_a_detached_actor(address, "packaged", {"working_dir": str(job)})
        everything = _session(head.session_id)
        agents = [
            p for p in everything if _title(p) in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
        ]
        assert len(agents) == 2, [(p, _title(p)) for p in everything]
        assert {stray, unpacked} <= set(everything)
        for pid in (stray, unpacked):
            assert f"RAY_TMPDIR={head.temp_dir}".encode() not in Path(
                f"/proc/{pid}/environ").read_bytes().split(b"\0")  # fmt: skip
        assert os.readlink(f"/proc/{unpacked}/cwd").startswith(str(short_temp.resolve()))
        started = time.monotonic()
        stopped = stop_local_ray(state_dir)
        took = time.monotonic() - started
        print(f"stopped {len(stopped)} processes in {took:.1f}s")
        left = [(p, _title(p)) for p in _session(head.session_id) if p in everything]
    finally:
        stop_local_ray(state_dir)  # nothing to do once stopped (its state file is gone)
        for pid in _session(head.session_id):  # whatever the stop missed: ours, by session
            if pid in everything:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert left == [], f"left running after the stop: {left}"
    assert {stray, unpacked, *agents} <= set(stopped)
    assert "Draining for up to" not in Path(head.log_file).read_text(errors="replace")
    # `ray start` done in a few seconds, then the deaf stray's 5 s grace; a drain alone was 30 s.
    assert took < 20, f"the stop took {took:.1f}s"


# -- a driver under `uv run` (the README's commands): its workers run where it runs -----------

DRIVER = """
import json, os, sys
from resources.ray import RayResource
RayResource(state_dir=sys.argv[1], temp_dir=sys.argv[2]).ensure_connected()
import ray

@ray.remote(num_cpus=0)
def where():
    context = ray.get_runtime_context()
    return {"cwd": os.getcwd(), "prefix": sys.prefix, "runtime_env": context.runtime_env}

print(json.dumps({"driver_prefix": sys.prefix, "worker": ray.get(where.remote(), timeout=120)}))
"""


def test_workers_of_a_driver_under_uv_run_run_in_its_environment(
    tmp_path: Path, short_temp: Path
) -> None:
    """Ray 2.60 hands the workers of a driver started by ``uv run`` a copy of the driver's working
    directory and starts them with ``uv run`` there, which builds a second virtualenv in Ray's temp
    dir (and the stop once missed such a worker: it showed neither our ``RAY_TMPDIR`` nor the
    head's folder). The project turns that off: its workers run in the driver's own virtualenv."""
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (the README's commands run under it)")
    state_dir = tmp_path / "ray"
    start_local_ray(state_dir, num_cpus=1, temp_dir=short_temp)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_UV_RUN_RUNTIME_ENV"}
    try:
        ran = subprocess.run(
            [uv, "run", "--frozen", "--no-sync", "python", "-c", DRIVER, str(state_dir),
             str(short_temp)],
            cwd=root, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        stop_local_ray(state_dir)
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen = json.loads(ran.stdout.strip().splitlines()[-1])
    worker = seen["worker"]
    assert worker["prefix"] == seen["driver_prefix"]
    assert "working_dir" not in worker["runtime_env"], worker["runtime_env"]
    assert "py_executable" not in worker["runtime_env"], worker["runtime_env"]
    assert not worker["cwd"].startswith(str(short_temp)), worker["cwd"]
