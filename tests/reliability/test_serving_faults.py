"""Serving under faults, on a real local Ray head: a killed replica, overload, corrupt models.

Figures (load held, faults injected and survived, status counts, latencies, RSS) are printed;
run with ``-s`` to see them. The slow ones are marked ``reliability_full``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ray._common.utils import import_attr

from mlops_assets.serve import assets as serve_assets
from mlops_assets.serve.deployment import ServeConfig, deploy, replica_infos
from mlops_assets.serve.proxy import (
    PROXY_CALLBACK,
    PROXY_CALLBACK_ENV,
    UnansweredAs503,
    proxy_middlewares,
)
from mlops_assets.serve.ray_runtime import free_port
from resources.prediction_log import PredictionLogResource
from resources.ray import RayResource
from tests.reliability.serving_fixtures import (
    BackgroundLoad,
    Stores,
    build_stores,
    head_pids,
    local_head,
    replica_actors,
    rss_mib,
    run_load,
    running_replicas,
    short_home,
)

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with short_home("mlrel") as folder:
        yield folder


@pytest.fixture(scope="module")
def stores(home: Path) -> Stores:
    return build_stores(home)


@pytest.fixture(scope="module")
def ray_serve(home: Path) -> Iterator[RayResource]:
    resource = RayResource(
        state_dir=str(home / "ray"), temp_dir=str(home / "rt"), http_port=free_port()
    )
    with local_head(resource):
        yield resource


def _config(stores: Stores, ray_serve: RayResource, **knobs: object) -> ServeConfig:
    base = serve_assets.serve_config(
        stores.registry,
        stores.warehouse,
        ray_serve,
        PredictionLogResource(folder=str(stores.home / "predlog")),
    )
    return base.model_copy(update=knobs)


# -- 1. kill -9 a replica under sustained load ------------------------------------------------


@pytest.mark.reliability_full
def test_kill_9_a_replica_under_load_loses_no_request(
    stores: Stores, ray_serve: RayResource
) -> None:
    config = _config(
        stores, ray_serve, app_name="kill", route_prefix="/kill", num_replicas=2,
        replica_num_cpus=0.5,
    )  # fmt: skip
    champion = stores.versions[0]
    stores.registry.promote(champion, "reliability: kill test")
    deploy(config, champion)
    try:
        before = replica_actors("kill")
        assert len(before) == 2
        ours = set(head_pids(ray_serve))
        assert {a["pid"] for a in before} <= ours, "replica PIDs are not of our head"
        victim = before[0]
        with BackgroundLoad(f"{config.url}/predict", stores.records, workers=8, retries=8) as load:
            time.sleep(3.0)
            killed_at = time.monotonic()
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = killed_at + 180
            recovered_at = None
            while time.monotonic() < deadline:
                actors = replica_actors("kill")
                if (
                    len(actors) == 2
                    and victim["pid"] not in {a["pid"] for a in actors}
                    and running_replicas("kill") == 2
                ):
                    recovered_at = time.monotonic()
                    break
                time.sleep(0.5)
            time.sleep(3.0)  # and keep the load on the recovered pair
            result = load.stop()
        assert recovered_at is not None, "Serve did not bring the replica count back to 2"
        after = replica_actors("kill")
        statuses = result.statuses()
        retried = [a for a in result.answers if a.attempts > 1]
        failed = [a for a in result.answers if a.status != 200]
        during = [a for a in result.answers if killed_at <= a.sent <= recovered_at]
        print(
            f"\nkill -9 replica pid {victim['pid']}: {len(result.answers)} requests in "
            f"{result.seconds:.1f}s (~{result.rate:.0f} req/s, 8 workers), {len(during)} while "
            f"recovering; statuses {statuses}; {len(retried)} needed a retry "
            f"({sum(a.attempts - 1 for a in retried)} retries: "
            f"{sorted({e.split(':')[0] for a in retried for e in a.errors})}); replica back in "
            f"{recovered_at - killed_at:.1f}s, pids {[a['pid'] for a in before]} -> "
            f"{[a['pid'] for a in after]}"
        )
        assert not failed, [(a.status, a.errors[-3:]) for a in failed[:5]]
        assert {a.version for a in result.answers} == {champion}
        assert during, "no request was sent while the replica was down"
        assert {i["model_version"] for i in replica_infos(config)} == {champion}
    finally:
        from ray import serve

        serve.delete("kill")


# -- 2. overload far past the limits ----------------------------------------------------------


@pytest.mark.reliability_full
def test_overload_sheds_fast_503s_and_recovers(stores: Stores, ray_serve: RayResource) -> None:
    limits = {"max_ongoing_requests": 4, "max_queued_requests": 4}
    config = _config(
        stores, ray_serve, app_name="overload", route_prefix="/overload", max_batch_size=4,
        batch_bypass_records=4, **limits,
    )  # fmt: skip
    version = stores.versions[0]
    deploy(config, version)
    try:
        url = f"{config.url}/predict"
        ((pid, *_),) = [(i["pid"],) for i in replica_infos(config)]
        run_load(url, stores.records, workers=1, seconds=1.0)  # warm up
        baseline = run_load(url, stores.records, workers=1, seconds=3.0)
        rss_before = rss_mib(pid)
        workers = 96  # 12x what the deployment admits (4 ongoing + 4 queued)
        storm = run_load(url, stores.records, workers=workers, seconds=8.0)
        rss_peak = rss_mib(pid)
        time.sleep(1.0)
        after = run_load(url, stores.records, workers=1, seconds=3.0)
        rss_after = rss_mib(pid)
        statuses = storm.statuses()
        print(
            f"\noverload: {workers} concurrent clients vs {limits}: {len(storm.answers)} requests "
            f"in {storm.seconds:.1f}s, statuses {statuses}; p50 200 {storm.p50_ms(200):.1f} ms, "
            f"p50 503 {storm.p50_ms(503):.1f} ms; sequential p50 before "
            f"{baseline.p50_ms(200):.2f} ms, after {after.p50_ms(200):.2f} ms; replica RSS "
            f"{rss_before:.0f} -> {rss_peak:.0f} (peak) -> {rss_after:.0f} MiB"
        )
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.get(503, 0) > statuses.get(200, 0) / 10, "nothing was shed"
        assert statuses.get(200, 0) > 0
        # Shedding costs less than serving: a refused request is answered well before a served
        # one (the bound is loose: client and proxy share 2 busy cores here).
        assert storm.p50_ms(503) < min(0.6 * storm.p50_ms(200), 1000), "503s are not fast"
        assert set(after.statuses()) == {200}
        assert after.p50_ms(200) < 2 * baseline.p50_ms(200) + 5, "latency did not recover"
        assert rss_after - rss_before < 64, "replica memory grew under overload"
        assert {i["model_version"] for i in replica_infos(config)} == {version}
    finally:
        from ray import serve

        serve.delete("overload")


# -- the proxy middleware, in-process ------------------------------------------------------------


def _asgi_call(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    asyncio.run(UnansweredAs503(app)(scope, receive, send))
    return sent


def test_a_request_the_proxy_left_unanswered_gets_a_retryable_503() -> None:
    async def lost(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Ray's proxy does when the replica died holding the request

    start, body = _asgi_call(lost)
    assert start["status"] == 503
    assert (b"retry-after", b"1") in start["headers"]
    assert b"lost with its serving replica" in body["body"]

    async def app_500(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"model failed"})

    # An answer from the app, even a 500, passes through untouched.
    assert [m.get("status") for m in _asgi_call(app_500)] == [500, None]
    assert proxy_middlewares()[0].cls is UnansweredAs503
    env = RayResource(state_dir="unused").head_environment()
    assert env[PROXY_CALLBACK_ENV] == PROXY_CALLBACK
    assert import_attr(env[PROXY_CALLBACK_ENV]) is proxy_middlewares
