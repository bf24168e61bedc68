"""Shared by the serving reliability tests: real models, a local Ray head, load and sockets.

The models and the head are built the way ``tests/test_serve_ray.py`` builds them (real data,
project training code, ``RayResource`` -> ``start_local_ray``, stopped by PID and session).
Plain functions and context managers, not fixtures: each test module wraps what it needs in its
own module-scoped fixtures (one head per module, disconnected before the next module connects).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import ray
from ray import serve
from realdata import serving_stores, small_lightgbm

from mlops_assets.serve.ray_runtime import local_ray, local_ray_pids, stop_local_ray
from resources.ray import RayResource
from resources.registry import ModelRegistryResource
from resources.warehouse import WarehouseResource


@dataclass(frozen=True)
class Stores:
    """A warehouse with the reference tables and a registry with real models."""

    home: Path
    warehouse: WarehouseResource
    registry: ModelRegistryResource
    versions: list[str]
    records: list[dict[str, Any]]


def _train_stores(home: Path, models: int) -> Stores:
    built = serving_stores(home, [small_lightgbm(s, 7 * s + 1) for s in range(1, models + 1)])
    return Stores(home, built.warehouse, built.registry, built.versions, built.bookings(400, 5))


_TRAINED: dict[int, Stores] = {}


def build_stores(home: Path, models: int = 2) -> Stores:
    """Reference tables of January and ``models`` small LightGBM models trained on it.

    Trained once per test process and copied into ``home`` for each caller (the registry and
    warehouse are plain files), so every module gets its own, identical, writable stores.
    """
    if models not in _TRAINED:
        cache = Path(tempfile.mkdtemp(prefix="mlstores"))
        atexit.register(shutil.rmtree, cache, True)
        _TRAINED[models] = _train_stores(cache, models)
    trained = _TRAINED[models]
    for part in ("warehouse", "registry"):
        shutil.copytree(trained.home / part, home / part, dirs_exist_ok=True)
    return Stores(
        home,
        WarehouseResource(root=str(home / "warehouse"), reports_root=str(home / "reports")),
        ModelRegistryResource(root=str(home / "registry")),
        list(trained.versions),
        list(trained.records),
    )


@contextlib.contextmanager
def short_home(prefix: str) -> Iterator[Path]:
    """A short temp folder (Ray's Unix socket paths live under its temp dir: 107-byte limit)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def local_head(resource: RayResource) -> Iterator[RayResource]:
    """Connect to (starting) the project's local head; on exit stop exactly it, and check.

    The environment is restored afterwards (connecting points ``TMPDIR``/``RAY_TMPDIR`` at the
    head's temp dir, which is deleted with the test's folder).
    """
    saved = dict(os.environ)
    resource.ensure_connected()
    head = local_ray(resource.state_dir)
    assert head is not None
    try:
        yield resource
    finally:
        try:
            with contextlib.suppress(Exception):
                serve.shutdown()
        finally:
            ray.shutdown()
            stopped = stop_local_ray(resource.state_dir)
            os.environ.clear()
            os.environ.update(saved)
            assert head.pid in stopped
            assert local_ray_pids(head) == []  # Ray's agents too (found by cwd)


def head_pids(resource: RayResource) -> list[int]:
    """Every live process of the local head this test started (its session; its temp dir or cwd)."""
    head = local_ray(resource.state_dir)
    assert head is not None, "the local head is not running"
    return local_ray_pids(head)


def replica_actors(app_name: str) -> list[dict[str, Any]]:
    """Alive replica actors of the app's ``ModelServer`` deployment, from Ray's actor table.

    Read from the GCS (``ray._private.state.actors``: the table ``ray.util.state.list_actors``
    serves), because the project's head runs without the dashboard that the state API's HTTP
    server lives in.
    """
    from ray._private.state import actors

    wanted = f"ServeReplica:{app_name}:ModelServer"
    return [
        {"actor_id": a["ActorID"], "pid": int(a["Pid"]), "name": a["Name"]}
        for a in actors().values()
        if a["ActorClassName"] == wanted and a["State"] == "ALIVE" and a["Pid"]
    ]


def running_replicas(app_name: str) -> int:
    """RUNNING replicas of the app's deployment as ``serve.status()`` reports them."""
    from ray.serve.schema import ReplicaState

    app = serve.status().applications.get(app_name)
    if app is None or "ModelServer" not in app.deployments:
        return 0
    return int(app.deployments["ModelServer"].replica_states.get(ReplicaState.RUNNING, 0))


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- a concurrent HTTP client ------------------------------------------------------------------


@dataclass
class Answer:
    """One logical request: its final status (0: never answered), version, attempts, latency."""

    sent: float
    done: float
    status: int
    version: str | None
    attempts: int
    errors: list[str] = field(default_factory=list)


@dataclass
class LoadResult:
    answers: list[Answer]
    seconds: float

    @property
    def rate(self) -> float:
        return len(self.answers) / self.seconds if self.seconds else 0.0

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for a in self.answers:
            counts[a.status] = counts.get(a.status, 0) + 1
        return counts

    def latencies_ms(self, status: int | None = None) -> list[float]:
        return [
            (a.done - a.sent) * 1000 for a in self.answers if status is None or a.status == status
        ]

    def p50_ms(self, status: int | None = None) -> float:
        values = self.latencies_ms(status)
        return statistics.median(values) if values else float("nan")


RETRYABLE_STATUSES = frozenset({502, 503, 504})


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    records: list[dict[str, Any]],
    k: int,
    workers: int,
    stop: asyncio.Event,
    answers: list[Answer],
    retries: int,
    headers: dict[str, str],
) -> None:
    i = k
    while not stop.is_set():
        payload = {"flights": [records[i % len(records)]]}
        sent = time.monotonic()
        errors: list[str] = []
        status, version, attempts = 0, None, 0
        while attempts <= retries:
            attempts += 1
            try:
                async with session.post(url, json=payload, headers=headers) as response:
                    status = response.status
                    body = await response.read()
                    version = response.headers.get("x-model-version")
                    if status not in RETRYABLE_STATUSES:
                        if status != 200:
                            errors.append(f"{status}: {body[:200]!r}")
                        break
                    errors.append(f"{status}: {body[:200]!r}")
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                status = 0
                errors.append(f"{type(exc).__name__}: {exc}")
            if attempts <= retries:
                await asyncio.sleep(min(0.05 * 2 ** (attempts - 1), 1.0))
        answers.append(Answer(sent, time.monotonic(), status, version, attempts, errors))
        i += workers


async def _run_load(
    url: str,
    records: list[dict[str, Any]],
    workers: int,
    seconds: float | None,
    stop: asyncio.Event,
    retries: int,
    headers: dict[str, str],
) -> LoadResult:
    answers: list[Answer] = []
    connector = aiohttp.TCPConnector(limit=workers, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [
            asyncio.create_task(
                _worker(session, url, records, k, workers, stop, answers, retries, headers)
            )
            for k in range(workers)
        ]
        if seconds is not None:
            await asyncio.sleep(seconds)
            stop.set()
        await asyncio.gather(*tasks)
    return LoadResult(answers, time.monotonic() - started)


def run_load(
    url: str,
    records: list[dict[str, Any]],
    *,
    workers: int,
    seconds: float,
    retries: int = 0,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """``workers`` concurrent clients posting single-record predictions for ``seconds``."""
    return asyncio.run(
        _run_load(url, records, workers, seconds, asyncio.Event(), retries, headers or {})
    )


class BackgroundLoad:
    """:func:`run_load` on its own thread and event loop, until :meth:`stop` is called."""

    def __init__(
        self,
        url: str,
        records: list[dict[str, Any]],
        *,
        workers: int,
        retries: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        import threading

        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.result: LoadResult | None = None

        def main() -> None:
            asyncio.set_event_loop(self._loop)
            self.result = self._loop.run_until_complete(
                _run_load(url, records, workers, None, self._stop, retries, headers or {})
            )

        self._thread = threading.Thread(target=main, daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def stop(self) -> LoadResult:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=120)
        assert self.result is not None, "the load did not finish"
        self._loop.close()
        return self.result

    def __exit__(self, *exc: object) -> None:
        if self.result is None and self._thread.is_alive():
            self.stop()


def listening_sockets(pids: list[int]) -> list[dict[str, Any]]:
    """Every TCP LISTEN socket of ``pids``: pid, process name, address, port."""
    found = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            name = " ".join(process.cmdline()[:3])[-90:] or process.name()
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                found.append({"pid": pid, "name": process.name(), "process": name,
                              "ip": conn.laddr.ip, "port": conn.laddr.port})  # fmt: skip
    return sorted(found, key=lambda s: (s["port"], s["ip"]))
