"""The project's own local Ray head: started detached, found again, stopped by PID.

``start_local_ray(folder)`` runs ``ray start --head --block`` in a new session (its own process
group and session id) with a small CPU count, usage stats off, token auth off
(``RAY_AUTH_MODE=disabled``; Ray 2.60 otherwise writes ``~/.ray/auth_token``), no dashboard UI,
its temp dir under ``folder`` and free ports for every listener that has a fixed default (so it
never collides with another Ray on the machine). Ray turns ``--node-ip-address=127.0.0.1`` into
the machine's address and binds its internal ports there and on 0.0.0.0 regardless; what users
talk to (the Serve HTTP proxy) is on 127.0.0.1. The head outlives the process that started it
(a Dagster step), and its address, PID and session id are kept in ``folder/ray-head.json`` so
later steps and runs reuse it.

``stop_local_ray(folder)`` stops exactly that head: SIGTERM to the ``ray start --block`` process
(which shuts down the Ray processes it started), then SIGTERM and finally SIGKILL to anything
still left in its session (workers, Ray's agents, for instance). Nothing else is touched;
``ray stop`` is never used because it stops every Ray process of the user on the machine.

A process counts as the head's when it is in the head's session and shows it is ours: our
``RAY_TMPDIR`` in its environment, or as its working directory the head's folder or a folder
under the head's temp dir (a worker of a job with a ``working_dir`` runs in Ray's copy of it
there). The working directory is needed for Ray's agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``): they write their process title over the start of their environment
block, and as the raylet hands them their environment in a random order, ``RAY_TMPDIR`` is gone
from their ``/proc/PID/environ`` in about half of the starts. They keep the working directory
``ray start`` was given.

The head is started with Ray's SIGTERM drain off (``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0``):
on one node there is nowhere to drain to, so with anything still leased (Serve's actors) the drain
only waited its full 30 s and then shut down ungracefully; meanwhile the GCS got stopped before
the raylet, and agents orphaned by the raylet's SIGKILL hung reporting its death to the dead GCS
(ignoring SIGTERM). That is how a test run once left both agents running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resources.storage import pid_alive, write_text_atomic

log = logging.getLogger(__name__)

STATE_FILE = "ray-head.json"
LOG_FILE = "ray-head.log"
LOCK_FILE = ".ray-head.lock"
READY_MARKER = "Ray runtime started"
# What is left of a head's session once its ``ray start`` has exited is orphaned (nothing else
# will stop it): it gets SIGTERM at once and SIGKILL this much later.
ORPHAN_GRACE_S = 5.0
# Ray 2.60's `ray start --block` drains its node on SIGTERM (for Kubernetes rolling upgrades)
# for up to 30 s; a single local node has nowhere to move its work to.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# Ray puts Unix sockets under <temp_dir>/session_<timestamp>_<pid>/sockets/…: AF_UNIX paths are
# limited to 107 bytes, so the temp dir itself must stay short.
MAX_TEMP_DIR_CHARS = 50


class LocalRayError(RuntimeError):
    """The local Ray head could not be started (or its state is unusable)."""


@dataclass(frozen=True)
class LocalRay:
    """A Ray head this project started."""

    address: str
    pid: int
    session_id: int
    temp_dir: str
    num_cpus: int
    started_at: str
    log_file: str
    env: dict[str, str] = field(default_factory=dict)
    """The ``extra_env`` the head was started with (feature flags such as direct ingress)."""

    @property
    def folder(self) -> Path:
        """The head's folder (state, lock, log): the working directory of its processes."""
        return Path(self.log_file).parent


def ray_environment(temp_dir: str | Path) -> dict[str, str]:
    """Environment for anything that starts or joins the project's local Ray."""
    return {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(temp_dir),
        "TMPDIR": str(temp_dir),
    }


def default_temp_dir(folder: str | Path) -> Path:
    """``<folder>/tmp`` when short enough for Ray's socket paths, else a per-folder /tmp dir."""
    candidate = Path(folder).resolve() / "tmp"
    if len(str(candidate)) <= MAX_TEMP_DIR_CHARS:
        return candidate
    digest = hashlib.sha256(str(candidate).encode()).hexdigest()[:10]
    return Path("/tmp") / f"mlops-ray-{os.getuid()}-{digest}"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a server about to bind it: tests, benchmarks)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are picked (one at a
    time, the kernel can hand the same port out twice, and Ray refuses to start with a port
    shared by two of its components)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _reap(pid: int) -> None:
    """Collect our own exited child, if it is one (no zombie left behind)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _cwd_in(pid: int, folder: str | None, tree: str | None) -> bool:
    """Whether the process works in ``folder`` or anywhere under ``tree``."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return cwd == folder or (tree is not None and (cwd == tree or cwd.startswith(tree + os.sep)))


def session_pids(
    session_id: int, temp_dir: str | None = None, cwd: str | Path | None = None
) -> list[int]:
    """Live processes of the head's session (what it started), optionally only ours for sure.

    With ``temp_dir`` or ``cwd``, a process counts only if it also shows that it is ours (a
    recycled session id cannot match): our ``RAY_TMPDIR`` in its environment (every Ray process
    inherits it), or as its working directory ``cwd`` (every process of a ``ray start`` run in
    ``cwd`` inherits that) or a folder under ``temp_dir`` (a job's ``working_dir``, unpacked
    there). Pass both: the environment of Ray's agents no longer shows ``RAY_TMPDIR`` once they
    have set their process title, in about half of the starts.
    """
    marker = f"RAY_TMPDIR={temp_dir}".encode() if temp_dir else None
    folder = str(Path(cwd).resolve()) if cwd is not None else None
    tree = str(Path(temp_dir).resolve()) if temp_dir else None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.getsid(pid) != session_id or not pid_alive(pid):
                continue
        except (ProcessLookupError, PermissionError):
            continue
        unchecked = marker is None and folder is None
        by_env = marker is not None and _environ_has(pid, marker)
        if unchecked or by_env or _cwd_in(pid, folder, tree):
            found.append(pid)
    return sorted(found)


def local_ray_pids(state: LocalRay) -> list[int]:
    """Every live process of the head ``state`` records (its session: environment or cwd)."""
    return session_pids(state.session_id, state.temp_dir, cwd=state.folder)


def _port_open(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _read_state(folder: Path) -> LocalRay | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        return LocalRay(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise LocalRayError(f"unreadable local Ray state {path}: {exc}") from exc


def local_ray(folder: str | Path) -> LocalRay | None:
    """The running head recorded under ``folder``, or None when there is none (or it died)."""
    state = _read_state(Path(folder))
    if state is None:
        return None
    if state.pid in local_ray_pids(state) and _port_open(state.address):
        return state
    return None


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One starter at a time: two steps starting at once share one head."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if found is None:
        raise LocalRayError("the `ray` command is not installed in this environment")
    return found


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


START_ATTEMPTS = 3
OVERLOADED_MARKER = "timed out during startup"


def _spawn_head(
    root: Path,
    tmp: Path,
    num_cpus: int,
    object_store_bytes: int,
    timeout_s: float,
    extra_env: Mapping[str, str] | None,
) -> LocalRay:
    """One ``ray start --head`` attempt: recorded, then waited for; cleaned up if it fails."""
    flags = [
        "--port", "--ray-client-server-port", "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
        "--node-manager-port", "--object-manager-port",
        "--dashboard-port",  # a headless API server starts even without the UI
    ]  # fmt: skip
    ports = dict(zip(flags, free_ports(len(flags)), strict=True))
    gcs_port = ports["--port"]
    command = [
        _ray_cli(),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--object-store-memory={object_store_bytes}",
        f"--temp-dir={tmp}",
        "--include-dashboard=false",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    env = {**os.environ, **ray_environment(tmp), **NO_DRAIN, **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)  # `ray start --head` must not try to join another cluster
    log_path = root / LOG_FILE
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: we stop exactly it, by session id
        )
    state = LocalRay(
        address=f"127.0.0.1:{gcs_port}",
        pid=proc.pid,
        session_id=proc.pid,  # a new session's id is its leader's PID
        temp_dir=str(tmp),
        num_cpus=num_cpus,
        started_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        log_file=str(log_path),
        env=dict(extra_env or {}),
    )
    # Record it before waiting, so a failed start can still be cleaned up by stop_local_ray.
    write_text_atomic(json.dumps(asdict(state), indent=1), root / STATE_FILE)
    offset = log_path.stat().st_size if log_path.exists() else 0
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = _log_tail(log_path)
            stop_local_ray(root)
            raise LocalRayError(
                f"`ray start` exited with code {proc.returncode}; log {log_path}:\n{tail}"
            )
        with open(log_path, "rb") as handle:
            handle.seek(max(0, offset - 4096))
            if READY_MARKER.encode() in handle.read() and _port_open(state.address):
                break
        if time.monotonic() > deadline:
            tail = _log_tail(log_path)
            stop_local_ray(root)
            raise LocalRayError(
                f"the local Ray head did not start within {timeout_s:.0f}s; log {log_path}:\n{tail}"
            )
        time.sleep(0.25)
    return state


def start_local_ray(
    folder: str | Path,
    *,
    num_cpus: int = 2,
    temp_dir: str | Path | None = None,
    object_store_bytes: int = 512 * 1024 * 1024,
    timeout_s: float = 120.0,
    extra_env: Mapping[str, str] | None = None,
) -> str:
    """Start (or reuse) the project's local Ray head; return its address (``host:port``).

    Args:
        folder: where the head's state, lock and log live (e.g. ``$MLOPS_HOME/ray``).
        num_cpus: CPUs the head offers to tasks and actors.
        temp_dir: Ray's temp dir (sessions, sockets, logs); short, see ``MAX_TEMP_DIR_CHARS``.
        object_store_bytes: shared-memory object store size (Ray's default is 30% of RAM).
        timeout_s: how long to wait for the head to come up.
        extra_env: more environment for the head, e.g. ``RAY_SERVE_ENABLE_DIRECT_INGRESS``
            (Ray reads such flags in the processes it starts).
    """
    root = Path(folder).resolve()
    with _locked(root):
        running = local_ray(root)
        if running is not None:
            if running.num_cpus != num_cpus:
                log.warning(
                    "reusing the local Ray head at %s with %d CPUs (asked for %d)",
                    running.address,
                    running.num_cpus,
                    num_cpus,
                )
            if running.env != dict(extra_env or {}):
                # Ray reads its feature flags when its processes start: a running head keeps its.
                log.warning(
                    "reusing the local Ray head at %s started with %s (asked for %s); stop it "
                    "to change them",
                    running.address,
                    running.env,
                    dict(extra_env or {}),
                )
            return running.address
        stale = _read_state(root)
        if stale is not None:
            # A head recorded earlier but gone (or half gone): clear what is left of it first.
            stop_local_ray(root)

        tmp = Path(temp_dir).resolve() if temp_dir else default_temp_dir(root)
        if len(str(tmp)) > MAX_TEMP_DIR_CHARS:
            raise LocalRayError(
                f"Ray temp dir {tmp} is longer than {MAX_TEMP_DIR_CHARS} characters: Ray's "
                "Unix socket paths under it would pass the 107-byte limit; choose a shorter one"
            )
        tmp.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                state = _spawn_head(root, tmp, num_cpus, object_store_bytes, timeout_s, extra_env)
                break
            except LocalRayError as exc:
                # Ray gives its raylet a fixed 30 s to register; on an overloaded machine
                # that can pass. The attempt is cleaned up already: try again.
                if OVERLOADED_MARKER not in str(exc) or attempt == START_ATTEMPTS:
                    raise
                log.warning("the local Ray head timed out starting (attempt %d); retrying", attempt)
        log.info("started a local Ray head at %s (pid %d, temp %s)", state.address, state.pid, tmp)
        return state.address


def stop_local_ray(folder: str | Path, timeout_s: float = 30.0) -> list[int]:
    """Stop the head recorded under ``folder`` and everything in its session; return the PIDs.

    Only processes in the session of the ``ray start`` we launched (and ours by environment or
    working directory, see :func:`session_pids`) are signalled. The ``ray start`` process gets
    SIGTERM and shuts down what it started; whatever is still left once it has exited (or at
    half of ``timeout_s``) gets SIGTERM, then SIGKILL after ``ORPHAN_GRACE_S`` (or at
    ``timeout_s``): an agent stuck reporting to a GCS that is gone ignores SIGTERM.
    """
    root = Path(folder).resolve()
    state = _read_state(root)
    if state is None:
        return []
    targets = local_ray_pids(state)
    if state.pid in targets:
        # `ray start --block` shuts down the processes it started on SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    kill_at = deadline
    term_sent_to_rest = False
    while True:
        _reap(state.pid)
        left = local_ray_pids(state)
        targets = sorted(set(targets) | set(left))
        if not left:
            break
        now = time.monotonic()
        orphaned = state.pid not in left  # `ray start` is done: nothing else will stop these
        if not term_sent_to_rest and (orphaned or now > deadline - timeout_s / 2):
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            term_sent_to_rest = True
            kill_at = min(deadline, now + ORPHAN_GRACE_S) if orphaned else deadline
        if now > kill_at:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            _reap(state.pid)
            remaining = local_ray_pids(state)
            if remaining:
                raise LocalRayError(f"Ray processes {remaining} survived SIGKILL")
            break
        time.sleep(0.2)
    (root / STATE_FILE).unlink(missing_ok=True)
    log.info("stopped the local Ray head %s (pids %s)", state.address, targets)
    return targets
