"""The serving app on Ray Serve: one FastAPI ingress deployment, models swapped in place.

Nothing here runs at import time; :func:`build_serve_app` builds the application and
:func:`deploy` puts a model version live (import this module only where Ray Serve is needed: it
imports ``ray.serve``, ~1.7 s).

How a new model goes live (:func:`deploy`):

1. The version is verified where the deploy runs: hash (the registry refuses a mismatch),
   feature schema, reference tables, one smoke prediction. A bad model stops here, before
   serving is touched.
2. First deployment (or a changed serving configuration): ``serve.run`` starts the replicas,
   each loading the version in ``reconfigure(user_config)``.
3. A new version for the same configuration is swapped **inside the running replicas**: a
   handle call to ``ModelServer.swap`` loads and verifies the model on a worker thread while
   the replica keeps answering, then replaces the one reference requests read. Requests already
   holding the old model finish with it and are tagged with it; every later one gets the new one.
   The replica never leaves the routing table, so nothing queues, fails or moves port. A
   ``serve.run`` with only ``user_config`` changed replaces the replica instead (Serve's Python
   API gives every deployment a random code version). Measured on 2 cores with 8 clients: no
   failed request either way, but ``serve.run`` took 9.8 s with requests stalled up to 8.7 s
   (the old replica stops first), or 22 s with ``max_surge_percent=100`` (the new one starts
   first), while the in-place swap took 0.4-0.7 s with no request slower than 0.25 s.
   If the replica cannot load the model it keeps the old one and the deploy raises
   :class:`DeployError` with the replica's reason.
4. The version is recorded (with a generation number) in ``state_dir``, so a replica restarted
   by Serve later loads the version deployed last, not the one it was first created with.
5. ``GET /healthz`` on the live endpoint must report the version, or the deploy raises.

Direct ingress (``RayResource(direct_ingress=True)``: ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in
the local head's environment): each replica also serves the app on a port of its own
(:func:`direct_ingress_urls`, ``direct_endpoints`` in the deploy result), with no proxy hop,
~4x the proxy's throughput here. The in-place swap keeps that port (the replica stays); a
replica that Serve replaces (a changed configuration, a crash) comes back on another port, and
several replicas have several ports (a balancer in front, e.g. Ray's HAProxy mode, is then the
stable address). The proxy URL keeps answering throughout.

Metrics: every replica of an app writes its Prometheus values to ``<state_dir>/metrics/<app>``
(``PROMETHEUS_MULTIPROC_DIR`` via the replica's ``runtime_env``), so ``/metrics`` from any
replica shows the app's totals (see :mod:`mlops_assets.serve.metrics`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from prometheus_client import Histogram
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray import serve
from ray.serve.schema import ApplicationStatus, ReplicaState
from starlette.types import ASGIApp, Receive, Scope, Send

from mlops_assets.serve.app import build_app, default_scorer
from mlops_assets.serve.columnar import Bookings
from mlops_assets.serve.compiled import in_background
from mlops_assets.serve.metrics import PREFIX, ServeMetrics
from mlops_assets.serve.predictor import Predictor
from mlops_assets.serve.predlog import PredictionLog
from mlops_assets.serve.schema import SERVING
from resources.registry import ModelRegistryResource
from resources.storage import write_text_atomic
from resources.warehouse import WarehouseResource

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ModelServer"
STATE_SUFFIX = ".served.json"
_REQUEST_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512, 1024)


class DeployError(RuntimeError):
    """A model could not be put live; whatever was serving before still is."""


class ServeConfig(BaseModel):
    """How the app is served. Everything but ``model_version`` fixes the running replicas."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry_root: str
    warehouse_root: str
    model_version: str | None = Field(
        default=None, description="version to serve; None: the registry's champion at build"
    )
    app_name: str = "mlops"
    route_prefix: str = "/"
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    prediction_log_dir: str | None = None
    state_dir: str | None = Field(
        default=None, description="where the last deployed version is recorded for restarts"
    )
    api_token: SecretStr | None = None
    max_records: int = SERVING.max_records
    max_body_bytes: int = 1_000_000
    num_replicas: int = SERVING.num_replicas
    replica_num_cpus: float = SERVING.replica_num_cpus
    # One LightGBM thread per call: concurrent requests, not OpenMP teams, keep the cores busy.
    # Measured on 2 cores (benchmarks/README.md): a second thread cost a small batch 220-560 µs
    # with the other core busy (50-260 µs on one), and 1,000-record Arrow requests from 2/4/8
    # clients got 71.6k/78.0k/87.6k rows/s on one thread against 65.5k/69.5k/71.5k on two; only
    # a lone large request is faster on two (62-68k vs 51k rows/s). Per-call counts cannot be
    # mixed in one process (see Predictor.num_threads).
    predict_threads: int = 1
    compile_trees: bool = True
    """Compile each loaded model's trees (lleaves) in the background and score with them once
    they equal LightGBM's answers; 3x fewer CPU per 1,000 rows here (see ``serve/compiled.py``)."""
    max_batch_size: int = SERVING.max_batch_size
    batch_wait_timeout_s: float = SERVING.batch_wait_timeout_s
    # A request with more than batch_bypass_records records is a batch already.
    batch_bypass_records: int = 32
    score_alone_inline: bool = True
    """Score a request at once when no other is being scored (no batch wait at low load)."""
    max_ongoing_requests: int = SERVING.max_ongoing_requests
    max_queued_requests: int = SERVING.max_queued_requests
    # Ray's per-request access log costs ~7% of a replica's CPU on single-record traffic, and
    # the prediction log already records every request (id, status, latency).
    access_log: bool = False
    deploy_timeout_s: float = 180.0

    def fingerprint(self) -> str:
        """Identity of the serving configuration (not the model): equal means swap in place."""
        data = self.model_dump(exclude={"model_version", "deploy_timeout_s", "api_token"})
        token = self.api_token.get_secret_value() if self.api_token else ""
        data["api_token_sha256"] = hashlib.sha256(token.encode()).hexdigest()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}{self.route_prefix.rstrip('/')}"

    @property
    def metrics_dir(self) -> str | None:
        """Where the replicas of this app share their Prometheus values (see ``metrics.py``)."""
        return str(Path(self.state_dir) / "metrics" / self.app_name) if self.state_dir else None

    @property
    def state_path(self) -> Path | None:
        return Path(self.state_dir) / f"{self.app_name}{STATE_SUFFIX}" if self.state_dir else None


class ModelTarget(BaseModel):
    """The ``user_config`` of the deployment (and of each swap): which model, from where."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_version: str
    registry_root: str
    warehouse_root: str
    generation: int = 0
    """Deploys are ordered by generation; a restarted replica loads the newest it can see."""


def load_predictor(target: ModelTarget, num_threads: int = 0) -> Predictor:
    """Load and verify a model with the current reference tables: hash, schema, smoke test."""
    registry = ModelRegistryResource(root=target.registry_root)
    warehouse = WarehouseResource(root=target.warehouse_root, reports_root=target.warehouse_root)
    predictor = Predictor.from_registry(
        registry,
        target.model_version,
        planes=warehouse.read("planes"),
        weather=warehouse.read("weather"),
        num_threads=num_threads,
    )
    predictor.smoke_test()
    return predictor


def _read_recorded(path: Path | None) -> ModelTarget | None:
    if path is None or not path.exists():
        return None
    try:
        return ModelTarget.model_validate_json(path.read_text())
    except ValueError:
        log.exception("ignoring unreadable deploy record %s", path)
        return None


@dataclass(frozen=True)
class ScoreItem:
    """One request's validated records and the model it was tagged with."""

    predictor: Predictor
    bookings: Bookings


ScoreResult = np.ndarray | Exception
"""One request's probabilities, or what stopped them (raised again for that request only)."""


def _records_in(items: Sequence[ScoreItem]) -> int:
    return sum(item.bookings.n for item in items)


class _InFlight:
    """ASGI middleware counting the HTTP requests inside a replica's app (one event loop)."""

    def __init__(self, app: ASGIApp, server: ModelServer) -> None:
        self._app = app
        self._server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        self._server._in_flight += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self._server._in_flight -= 1


@serve.ingress()
class ModelServer:
    """A serving replica: the HTTP contract of ``build_app`` around a swappable model."""

    def __init__(self, config: ServeConfig) -> None:
        self._config = config
        self._predictor: Predictor | None = None
        self._target: ModelTarget | None = None
        self._swap_lock = asyncio.Lock()
        self._last_error: str | None = None
        context = serve.get_replica_context()
        self._replica_id = context.replica_id.unique_id
        self._actor_name = context.replica_id.to_full_id_str()
        self._metrics = ServeMetrics(multiprocess_dir=config.metrics_dir)
        self._batch_requests = Histogram(
            f"{PREFIX}_serve_batch_requests",
            "Requests scored together in one @serve.batch call.",
            buckets=_REQUEST_BATCH_BUCKETS,
            registry=self._metrics.registry,
        )
        self._batches = 0
        self._largest_batch = 0
        self._in_flight = 0  # HTTP requests inside the app (counted by _InFlight)
        self._alone = 0
        self._log = PredictionLog(config.prediction_log_dir) if config.prediction_log_dir else None
        self.score_batch.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
        self.score_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def __serve_build_asgi_app__(self) -> FastAPI:
        token = self._config.api_token
        app = build_app(
            lambda: self._predictor,
            max_records=self._config.max_records,
            max_body_bytes=self._config.max_body_bytes,
            api_token=token.get_secret_value() if token else None,
            log_sink=self._log,
            metrics=self._metrics,
            scorer=self._score,
            echo_request_id=False,  # Ray's proxy sets X-Request-ID (the same id we log)
        )
        app.add_middleware(_InFlight, server=self)
        return app

    # -- scoring ------------------------------------------------------------------------------

    async def _score(self, predictor: Predictor, bookings: Bookings) -> np.ndarray:
        if bookings.n > self._config.batch_bypass_records:
            return await default_scorer(predictor, bookings)  # already a batch of its own
        if self._in_flight <= 1 and self._config.score_alone_inline:
            # No other request is in the app, so none can join a batch: waiting
            # batch_wait_timeout_s for company would only add latency.
            self._alone += 1
            return await default_scorer(predictor, bookings)
        answer = await self.score_batch(ScoreItem(predictor, bookings))
        if isinstance(answer, Exception):
            raise answer
        return answer

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002, batch_size_fn=_records_in)
    async def score_batch(self, items: list[ScoreItem]) -> list[ScoreResult]:
        """Score concurrent requests together, one model call per model in the batch.

        Grouped by model: a request tagged with the old model during a swap is answered by it.
        If a group fails, its requests are scored one by one, so only a failing request fails.
        """
        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(items))
        self._batch_requests.observe(len(items))
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(id(item.predictor), []).append(i)
        answers: list[ScoreResult] = [np.empty(0) for _ in items]
        for members in groups.values():
            predictor = items[members[0]].predictor
            try:
                together = Bookings.concat([items[i].bookings for i in members])
                probabilities = await default_scorer(predictor, together)
            except Exception:
                for i in members:
                    try:
                        answers[i] = await default_scorer(predictor, items[i].bookings)
                    except Exception as exc:
                        answers[i] = exc
                continue
            start = 0
            for i in members:
                stop = start + items[i].bookings.n
                answers[i] = probabilities[start:stop]
                start = stop
        return answers

    # -- model swaps --------------------------------------------------------------------------

    def _info(self, **extra: Any) -> dict[str, Any]:
        predictor = self._predictor
        return {
            "replica_id": self._replica_id,
            "actor_name": self._actor_name,
            "pid": os.getpid(),
            "model_version": predictor.version if predictor else None,
            "trees": predictor.trees_status if predictor else None,
            "generation": self._target.generation if self._target else None,
            "fingerprint": self._config.fingerprint(),
            "last_error": self._last_error,
            "batches": self._batches,
            "largest_batch_requests": self._largest_batch,
            "scored_alone": self._alone,
            **extra,
        }

    async def _swap(self, target: ModelTarget, force: bool = False) -> dict[str, Any]:
        async with self._swap_lock:
            current = self._predictor
            live = self._target
            if live is not None and target.generation < live.generation:
                # Two deploys raced and the newer one is already live: never go back to the older.
                return self._info(
                    ok=False,
                    swapped=False,
                    error=f"stale deploy of {target.model_version} (generation "
                    f"{target.generation}); a newer deploy of {live.model_version} is live",
                )
            if current is not None and current.version == target.model_version and not force:
                if self._target is None or target.generation > self._target.generation:
                    self._target = target
                return self._info(ok=True, swapped=False, previous_version=current.version)
            started = time.perf_counter()
            try:
                # On a worker thread: the event loop keeps answering with the current model.
                fresh = await asyncio.to_thread(
                    load_predictor, target, self._config.predict_threads
                )
            except Exception as exc:
                kept = current.version if current else "nothing"
                self._last_error = (
                    f"model {target.model_version} refused, still serving {kept}: "
                    f"{type(exc).__name__}: {exc}"
                )
                log.exception("replica %s: %s", self._replica_id, self._last_error)
                return self._info(ok=False, swapped=False, error=self._last_error)
            # The swap itself: one reference, read once per request.
            self._predictor = fresh
            self._target = target
            self._last_error = None
            if self._config.compile_trees:
                in_background(fresh.compile_trees, f"mlops-compile-{fresh.version}")
            seconds = time.perf_counter() - started
            log.info(
                "replica %s now serves %s (was %s; loaded and verified in %.2fs)",
                self._replica_id,
                fresh.version,
                current.version if current else None,
                seconds,
            )
            return self._info(
                ok=True,
                swapped=True,
                previous_version=current.version if current else None,
                load_seconds=round(seconds, 3),
            )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's hook for ``user_config``: load the target model (or the newer recorded one).

        Raising here makes Serve stop the replica, so once a model is loaded a failure is
        recorded and the old model kept; only a replica with nothing to serve fails to start.
        """
        target = ModelTarget.model_validate(user_config)
        recorded = _read_recorded(self._config.state_path)
        if (
            self._predictor is None
            and recorded is not None
            and recorded.generation > target.generation
        ):
            target = recorded  # a restart after in-place swaps: load the newest deploy
        result = await self._swap(target)
        if not result["ok"] and self._predictor is None:
            raise RuntimeError(result["error"])

    async def swap(self, user_config: dict[str, Any], force: bool = False) -> dict[str, Any]:
        """Load, verify, then serve another model; on failure keep the current one.

        Returns this replica's state with ``ok`` and, when not ok, ``error``.
        """
        return await self._swap(ModelTarget.model_validate(user_config), force=force)

    def info(self) -> dict[str, Any]:
        """This replica's model, configuration fingerprint and batching counters."""
        return self._info()

    def __del__(self) -> None:
        if self._log is not None:
            self._log.close()


def _target_for(config: ServeConfig, version: str, generation: int) -> ModelTarget:
    return ModelTarget(
        model_version=version,
        registry_root=config.registry_root,
        warehouse_root=config.warehouse_root,
        generation=generation,
    )


def build_serve_app(config: ServeConfig | dict[str, Any]) -> serve.Application:
    """The Serve application for ``config`` (also usable as an app builder by ``serve run``)."""
    config = ServeConfig.model_validate(config)
    version = config.model_version
    if version is None:
        version = ModelRegistryResource(root=config.registry_root).champion()
        if version is None:
            raise DeployError(f"no model_version given and no champion in {config.registry_root}")
    if config.batch_bypass_records > config.max_batch_size:
        raise ValueError(
            f"batch_bypass_records ({config.batch_bypass_records}) must not exceed "
            f"max_batch_size ({config.max_batch_size}): a batched request must fit in a batch"
        )
    if config.max_ongoing_requests < config.max_batch_size:
        raise ValueError(
            f"max_ongoing_requests ({config.max_ongoing_requests}) must be at least "
            f"max_batch_size ({config.max_batch_size}) or batches can never fill"
        )
    target = _target_for(config, version, time.time_ns())
    actor_options: dict[str, Any] = {"num_cpus": config.replica_num_cpus}
    if config.metrics_dir is not None:
        # Read by prometheus_client when the replica imports it: values go to shared files.
        actor_options["runtime_env"] = {
            "env_vars": {"PROMETHEUS_MULTIPROC_DIR": config.metrics_dir}
        }
    deployment = serve.deployment(
        ModelServer,
        name=DEPLOYMENT_NAME,
        num_replicas=config.num_replicas,
        ray_actor_options=actor_options,
        user_config=target.model_dump(),
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        max_constructor_retry_count=3,
        logging_config={"enable_access_log": config.access_log},
        health_check_period_s=5.0,
        # A redeploy that replaces replicas starts the new ones first; the old keep serving
        # until they are ready (without this, a one-replica app stalls ~9 s on every redeploy).
        max_surge_percent=100,
    )
    return deployment.bind(config)


# -- deploying --------------------------------------------------------------------------------


def _app_status(config: ServeConfig) -> Any | None:
    try:
        status = serve.status()
    except Exception:  # no Serve instance on this cluster yet
        return None
    return status.applications.get(config.app_name)


def _running_replicas(app: Any) -> int:
    deployment = app.deployments.get(DEPLOYMENT_NAME)
    if deployment is None:
        return 0
    return int(deployment.replica_states.get(ReplicaState.RUNNING, 0))


def replica_infos(config: ServeConfig, attempts: int = 0) -> list[dict[str, Any]]:
    """``info()`` of the running replicas, each once (found by repeated handle calls)."""
    app = _app_status(config)
    if app is None:
        return []
    expected = _running_replicas(app)
    handle = serve.get_app_handle(config.app_name)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(attempts or max(1, expected) * 10):
        info = handle.info.remote().result(timeout_s=30)
        seen[info["replica_id"]] = info
        if len(seen) >= expected:
            break
    return list(seen.values())


def _swap_everywhere(config: ServeConfig, target: ModelTarget, expected: int) -> list[dict]:
    """Swap every running replica (a handle call reaches one; repeat until all confirm)."""
    handle = serve.get_app_handle(config.app_name)
    confirmed: dict[str, dict[str, Any]] = {}
    for _ in range(max(1, expected) * 10):
        result = handle.swap.remote(target.model_dump()).result(timeout_s=config.deploy_timeout_s)
        if not result["ok"]:
            raise DeployError(
                f"replica {result['replica_id']} refused model {target.model_version}: "
                f"{result['error']}"
            )
        confirmed[result["replica_id"]] = result
        if len(confirmed) >= expected:
            return list(confirmed.values())
    raise DeployError(
        f"only {len(confirmed)} of {expected} replicas confirmed model {target.model_version}"
    )


def _wait_running(config: ServeConfig) -> None:
    deadline = time.monotonic() + config.deploy_timeout_s
    while True:
        app = _app_status(config)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status in (
            ApplicationStatus.DEPLOY_FAILED,
            ApplicationStatus.UNHEALTHY,
        ):
            raise DeployError(f"application {config.app_name} is {app.status}: {app.message}")
        if time.monotonic() > deadline:
            state = app.status if app else "absent"
            raise DeployError(f"application {config.app_name} still {state} after the timeout")
        time.sleep(0.5)


def live_health(config: ServeConfig, timeout_s: float = 5.0) -> dict[str, Any]:
    """``GET /healthz`` on the live endpoint: the status code and body."""
    response = httpx.get(f"{config.url}/healthz", timeout=timeout_s)
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:500]}
    return {"status_code": response.status_code, **body}


def direct_ingress_urls(config: ServeConfig) -> list[str]:
    """Each running replica's own HTTP endpoint when Ray runs with direct ingress (else ``[]``).

    With ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the head's environment, every ingress replica
    serves the app itself on a port Serve allocates (from
    ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT``), bound to ``config.http_host``, with no proxy
    hop; the proxy at ``config.url`` keeps answering too. Read from Serve's target groups.
    """
    from ray.serve.context import _get_global_client

    try:
        details = _get_global_client().get_serve_details()
    except Exception:  # no Serve instance yet
        return []
    prefix = config.route_prefix.rstrip("/")
    urls = []
    for group in details.get("target_groups", []):
        if group.get("app_name") != config.app_name or str(group.get("protocol")) not in (
            "HTTP",
            "RequestProtocol.HTTP",
        ):
            continue
        urls += [f"http://{config.http_host}:{t['port']}{prefix}" for t in group["targets"]]
    return sorted(set(urls))


def _confirm_live(config: ServeConfig, version: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | str = "no answer"
    while time.monotonic() < deadline:
        try:
            health = live_health(config)
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        else:
            if health["status_code"] == 200 and health.get("model_version") == version:
                return health
            last = health
        time.sleep(0.25)
    raise DeployError(f"{config.url}/healthz does not report model {version}: {last}")


def _record(config: ServeConfig, target: ModelTarget) -> None:
    path = config.state_path
    if path is None:
        return
    recorded = _read_recorded(path)
    if recorded is None or recorded.generation < target.generation:
        write_text_atomic(target.model_dump_json(indent=1), path)


def deploy(config: ServeConfig, version: str, *, verify_locally: bool = True) -> dict[str, Any]:
    """Put ``version`` live (swap in place when the app already runs this configuration).

    Needs a connected Ray (``RayResource.ensure_connected``). Raises :class:`DeployError` when
    the model is refused or the endpoint does not report it; the previous model keeps serving.

    Returns:
        ``version``, ``previous_versions``, ``mode`` (``"swap"`` or ``"deploy"``),
        ``endpoint``, ``direct_endpoints`` (each replica's own URL under direct ingress, else
        empty), ``replicas`` (each replica's info), ``health`` and ``seconds``.
    """
    started = time.perf_counter()
    config = config.model_copy(update={"model_version": version})
    target = _target_for(config, version, time.time_ns())
    if verify_locally:
        try:
            load_predictor(target, num_threads=1)
        except Exception as exc:
            raise DeployError(
                f"model {version} failed verification before deployment "
                f"({type(exc).__name__}: {exc}); nothing was changed in serving"
            ) from exc

    app = _app_status(config)
    previous: list[str | None] = []
    mode = "deploy"
    if app is not None and app.status == ApplicationStatus.RUNNING:
        infos = replica_infos(config)
        previous = sorted({i["model_version"] for i in infos}, key=str)
        if infos and all(i["fingerprint"] == config.fingerprint() for i in infos):
            mode = "swap"
    if mode == "swap":
        replicas = _swap_everywhere(config, target, expected=_running_replicas(app))
    else:
        serve.start(http_options={"host": config.http_host, "port": config.http_port})
        try:
            serve.run(
                build_serve_app(config),
                name=config.app_name,
                route_prefix=config.route_prefix,
                blocking=False,
            )
        except Exception as exc:
            raise DeployError(
                f"Serve could not start {config.app_name} with model {version}: {exc}"
            ) from exc
        _wait_running(config)
        replicas = replica_infos(config)
        wrong = [r for r in replicas if r["model_version"] != version]
        if wrong:
            raise DeployError(f"replicas do not serve {version}: {wrong}")
    _record(config, target)
    health = _confirm_live(config, version)
    return {
        "version": version,
        "previous_versions": previous,
        "mode": mode,
        "endpoint": config.url,
        "direct_endpoints": direct_ingress_urls(config),
        "replicas": replicas,
        "health": health,
        "seconds": round(time.perf_counter() - started, 3),
    }
