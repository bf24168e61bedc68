"""The serving app on a real Ray Serve, on 127.0.0.1, with real models trained by project code.

One local Ray head for the module, started the way the pipeline starts it (``RayResource`` ->
``start_local_ray``: detached ``ray start --head --block`` in its own session, its own temp dir,
2 CPUs, auth off) and stopped at the end by its PID and session, never ``ray stop``; the
teardown asserts none of its processes is left. The head runs with direct ingress on, so every
request path is tested: the Serve proxy (the contract's URL) and each replica's own port.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import numpy as np
import polars as pl
import pytest
import ray
from ray import serve
from realdata import serving_stores, small_lightgbm
from test_serve_http import BAD_PAYLOADS, GOOD

from mlops_assets.serve import assets as serve_assets
from mlops_assets.serve.compiled import TOLERANCE
from mlops_assets.serve.deployment import (
    DeployError,
    ServeConfig,
    deploy,
    direct_ingress_urls,
    live_health,
    replica_infos,
)
from mlops_assets.serve.predictor import Predictor
from mlops_assets.serve.predlog import read_prediction_log
from mlops_assets.serve.ray_runtime import (
    LocalRayError,
    free_port,
    local_ray,
    local_ray_pids,
    start_local_ray,
    stop_local_ray,
)
from resources.prediction_log import PredictionLogResource
from resources.ray import RayResource
from resources.registry import ModelRegistryResource
from resources.warehouse import WarehouseResource

pytestmark = pytest.mark.timeout(300)

CLIENTS = 8


# -- fixtures: a warehouse and registry with two real models, one local Ray ------------------


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    # Short on purpose: Ray's Unix socket paths live under the temp dir (107-byte limit).
    folder = Path(tempfile.mkdtemp(prefix="mlray", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def stores(home: Path) -> dict[str, Any]:
    built = serving_stores(home, [small_lightgbm(1, 7), small_lightgbm(2, 15)])
    return {
        "warehouse": built.warehouse,
        "registry": built.registry,
        "versions": built.versions,
        "records": built.bookings(400, seed=5),
    }


@pytest.fixture(scope="module")
def ray_serve(home: Path) -> Iterator[RayResource]:
    resource = RayResource(
        state_dir=str(home / "ray"),
        temp_dir=str(home / "rt"),
        http_port=free_port(),
        direct_ingress=True,
        direct_ingress_min_port=free_port(),
    )
    started = time.monotonic()
    # A removed direct-ingress replica drains >= 30 s by default (for load balancers); tests
    # delete apps, and have no balancer to wait for.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
        resource.ensure_connected()
    head = local_ray(resource.state_dir)
    assert head is not None
    print(f"local Ray head up in {time.monotonic() - started:.1f}s at {head.address}")
    try:
        yield resource
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            stopped = stop_local_ray(resource.state_dir)
            assert head.pid in stopped
            assert local_ray_pids(head) == []  # Ray's agents too (found by cwd)
            assert local_ray(resource.state_dir) is None


@pytest.fixture(scope="module")
def log_dir(home: Path) -> Path:
    return home / "predlog"


@pytest.fixture(scope="module")
def config(stores: dict[str, Any], ray_serve: RayResource, log_dir: Path) -> ServeConfig:
    # Built exactly as the served_model asset builds it, so the asset test swaps in place.
    return serve_assets.serve_config(
        stores["registry"],
        stores["warehouse"],
        ray_serve,
        PredictionLogResource(folder=str(log_dir)),
    )


@pytest.fixture(scope="module")
def first_deploy(config: ServeConfig, stores: dict[str, Any]) -> dict[str, Any]:
    return deploy(config, stores["versions"][0])


def _predict(client: httpx.Client, record: dict[str, Any]) -> httpx.Response:
    return client.post("/predict", json={"flights": [record]})


# -- the local Ray head ------------------------------------------------------------------------


def test_the_local_head_is_reused_not_started_twice(ray_serve: RayResource) -> None:
    head = local_ray(ray_serve.state_dir)
    assert head is not None
    assert start_local_ray(ray_serve.state_dir, temp_dir=ray_serve.temp_dir) == head.address
    assert local_ray(ray_serve.state_dir) == head  # same PID, same session
    assert ray.cluster_resources()["CPU"] == 2


def test_a_temp_dir_too_long_for_rays_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LocalRayError, match="longer than 50 characters"):
        start_local_ray(tmp_path, temp_dir=tmp_path / ("x" * 60))
    assert local_ray(tmp_path) is None


# -- first deployment -------------------------------------------------------------------------


def test_first_deploy_serves_v1_with_the_contract(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any], log_dir: Path
) -> None:
    v1 = stores["versions"][0]
    assert first_deploy["mode"] == "deploy"
    assert first_deploy["health"]["model_version"] == v1
    assert [r["model_version"] for r in first_deploy["replicas"]] == [v1]
    print(f"first deploy: {first_deploy['seconds']:.1f}s")
    records = stores["records"][:3]
    with httpx.Client(base_url=config.url, timeout=20) as client:
        response = client.post("/predict", json={"flights": records})
        assert response.status_code == 200, response.text
        assert response.headers["x-model-version"] == v1
        body = response.json()
        assert body["model_version"] == v1
        assert len(body["predictions"]) == 3
        for p in body["predictions"]:
            assert 0.0 <= p["delay_probability"] <= 1.0
            assert p["delayed"] == (p["delay_probability"] >= 0.5)
        # One request id header (Ray's proxy sets it; the app does not add a second one) ...
        ids = response.headers.get_list("x-request-id")
        assert len(ids) == 1
        # ... and it is the id the replica logged the prediction under.
        logged = read_prediction_log(log_dir)
        mine = logged.filter(pl.col("request_id") == ids[0])
        assert mine.height == 3 and set(mine.get_column("model_version")) == {v1}
        bad = client.post("/predict", json={"flights": [{**records[0], "surprise": 1}]})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "flights", 0, "surprise"]
        assert client.post("/predict", content=b"{", headers={"content-type": "application/json"}
                           ).status_code == 400  # fmt: skip
        assert client.get("/healthz").json() == {"status": "ok", "model_version": v1}
        assert client.get("/model").json()["version"] == v1
        assert "/predict" in client.get("/openapi.json").json()["paths"]


def _compiled_status(config: ServeConfig, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        (info,) = replica_infos(config)
        if not info["trees"].endswith("not compiled") or time.monotonic() > deadline:
            return str(info["trees"])
        time.sleep(0.2)


def test_the_replica_compiles_its_trees_and_answers_as_lightgbm_does(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    v1 = stores["versions"][0]
    status = _compiled_status(config)
    assert status.startswith("compiled (lleaves"), status
    reference = Predictor.from_registry(
        stores["registry"],
        v1,
        stores["warehouse"].read("planes"),
        stores["warehouse"].read("weather"),
    )
    records = stores["records"][:200]
    expected = reference.probabilities(records)
    with httpx.Client(base_url=config.url, timeout=20) as client:
        assert client.get("/model").json()["serving"]["trees"] == status
        response = client.post("/predict", json={"flights": records})
    assert response.status_code == 200, response.text
    got = np.array([p["delay_probability"] for p in response.json()["predictions"]])
    assert np.max(np.abs(got - expected)) <= TOLERANCE
    assert [p["delayed"] for p in response.json()["predictions"]] == (
        expected >= reference.threshold
    ).tolist()


def _direct_url(config: ServeConfig) -> str:
    (url,) = direct_ingress_urls(config)  # one replica: one port of its own
    return url


def test_direct_ingress_serves_the_same_contract_on_the_replica_s_port(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    url = _direct_url(config)
    assert first_deploy["direct_endpoints"] == [url] and url != config.url
    assert url.startswith(f"http://{config.http_host}:")
    records = stores["records"][:2]
    with httpx.Client(base_url=url, timeout=20) as client:
        response = client.post("/predict", json={"flights": records})
        assert response.status_code == 200, response.text
        assert len(response.headers.get_list("x-request-id")) == 1
        version = response.headers["x-model-version"]
        assert response.json()["model_version"] == version
        assert client.get("/healthz").json() == {"status": "ok", "model_version": version}
        assert client.get("/model").json()["serving"]["fast_path"].startswith("on, verified")
    with httpx.Client(base_url=config.url, timeout=20) as client:
        via_proxy = client.post("/predict", json={"flights": records}).json()
    assert via_proxy == response.json()


def _bad_cases(config: ServeConfig) -> list[tuple[str, bytes, dict[str, str], int]]:
    """The HTTP tests' bad payloads, sized for this app's limits, plus an oversized body."""
    json_type = {"content-type": "application/json"}
    too_many = json.dumps({"flights": [GOOD] * (config.max_records + 1)}).encode()
    cases = [
        (name, too_many if name == "too-many-records" else body, headers, status)
        for name, body, headers, status, _ in BAD_PAYLOADS
    ]
    oversized = b'{"flights": [' + b" " * config.max_body_bytes + b"]}"
    return [*cases, ("oversized-body", oversized, json_type, 413)]


def test_bad_payloads_through_ray_get_4xx_and_never_restart_the_replica(
    config: ServeConfig, first_deploy: dict[str, Any]
) -> None:
    cases = _bad_cases(config)
    assert len({body for _, body, _, _ in cases}) >= 25
    (before,) = replica_infos(config)
    seen: dict[str, list[int]] = {}
    for url in (config.url, _direct_url(config)):
        with httpx.Client(base_url=url, timeout=30) as client:
            for name, body, headers, status in cases:
                response = client.post("/predict", content=body, headers=headers)
                seen.setdefault(name, []).append(response.status_code)
                assert response.status_code == status, (url, name, response.text[:300])
                assert response.headers.get("x-request-id"), (url, name)
                assert isinstance(response.json()["detail"], str | list)
            assert client.get("/healthz").status_code == 200
    assert all(code < 500 for codes in seen.values() for code in codes)
    (after,) = replica_infos(config)
    assert (after["replica_id"], after["pid"]) == (before["replica_id"], before["pid"])
    assert after["last_error"] is None


# -- zero-downtime swap under load ------------------------------------------------------------


class Load:
    """CLIENTS threads, each sending single-record /predict requests back to back."""

    def __init__(self, url: str, records: list[dict[str, Any]]) -> None:
        self.url = url
        self.records = records
        self.stop = threading.Event()
        # per client: (sent, received, status, version or error text)
        self.results: list[list[tuple[float, float, int, str]]] = [[] for _ in range(CLIENTS)]
        self.threads = [
            threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(CLIENTS)
        ]

    def _run(self, k: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = k
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    response = _predict(client, self.records[i % len(self.records)])
                    status = response.status_code
                    tag = response.json()["model_version"] if status == 200 else response.text
                except Exception as exc:  # a dropped connection counts as a failure
                    status, tag = 0, f"{type(exc).__name__}: {exc}"
                self.results[k].append((sent, time.monotonic(), status, tag))
                i += CLIENTS

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)

    @property
    def all(self) -> list[tuple[float, float, int, str]]:
        return [r for client in self.results for r in client]


def test_swap_under_concurrent_load_loses_nothing(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any], log_dir: Path
) -> None:
    v1, v2 = stores["versions"]
    before = replica_infos(config)
    direct = _direct_url(config)
    with Load(config.url, stores["records"]) as load, Load(direct, stores["records"]) as fast:
        time.sleep(1.5)
        started = time.monotonic()
        result = deploy(config, v2)
        done = time.monotonic()
        time.sleep(1.5)
    # On the replica's own port too: nothing lost, v1 then v2, and the port stays.
    assert {r[2] for r in fast.all} == {200}
    assert {r[3] for r in fast.all} == {v1, v2}
    assert {r[3] for r in fast.all if r[0] >= done} == {v2}
    assert direct_ingress_urls(config) == [direct] == result["direct_endpoints"]
    answers = load.all
    failures = [r for r in answers if not 200 <= r[2] < 300]
    assert not failures, failures[:5]
    assert {r[3] for r in answers} == {v1, v2}
    for client in load.results:
        versions = [r[3] for r in client]
        first_v2 = versions.index(v2)
        assert set(versions[first_v2:]) == {v2}, "a client went back from v2 to v1"
    assert {r[3] for r in answers if r[0] >= done} == {v2}
    assert result["mode"] == "swap" and result["previous_versions"] == [v1]
    # Swapped inside the same replica: same process, no restart, no routing change.
    after = replica_infos(config)
    assert [(r["replica_id"], r["pid"]) for r in after] == [
        (r["replica_id"], r["pid"]) for r in before
    ]
    assert [r["model_version"] for r in after] == [v2]
    rate = len(answers) / (load.all[-1][1] - load.all[0][0])
    print(
        f"swap: {len(answers)} requests, 0 failed, ~{rate:.0f} req/s; deploy call "
        f"{done - started:.2f}s (replica load {result['replicas'][0]['load_seconds']}s)"
    )
    # Every answered prediction is in the log with the version that answered it.
    logged = read_prediction_log(log_dir).filter(pl.col("kind") == "prediction")
    counts = dict(logged.group_by("model_version").len().iter_rows())
    assert counts[v2] >= sum(r[3] == v2 for r in answers)


def test_a_lone_request_is_scored_at_once_not_after_a_batch_wait(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    (before,) = replica_infos(config)
    with httpx.Client(base_url=config.url, timeout=30) as client:
        for record in stores["records"][:5]:
            assert _predict(client, record).status_code == 200
    (after,) = replica_infos(config)
    assert after["scored_alone"] - before["scored_alone"] == 5
    assert after["batches"] == before["batches"]


def test_concurrent_large_requests_get_the_answers_of_a_lone_one(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    """Large requests are scored side by side on the replica's scoring threads."""
    body = {"flights": stores["records"][:200]}  # above batch_bypass_records: its own batch
    with httpx.Client(base_url=config.url, timeout=30) as client:
        alone = client.post("/predict", json=body)
    assert alone.status_code == 200
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def burst() -> None:
        with httpx.Client(base_url=config.url, timeout=60) as client:
            barrier.wait()
            answers.extend(client.post("/predict", json=body) for _ in range(4))

    threads = [threading.Thread(target=burst) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.status_code for r in answers] == [200] * 32
    # Equal to the last ulps: a swap before this test may still be compiling its trees.
    expected = np.array([p["delay_probability"] for p in alone.json()["predictions"]])
    for r in answers:
        got = np.array([p["delay_probability"] for p in r.json()["predictions"]])
        assert np.max(np.abs(got - expected)) <= TOLERANCE


def test_concurrent_single_record_requests_are_batched(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    records = stores["records"]
    barrier = threading.Barrier(16)
    statuses: list[int] = []

    def burst(k: int) -> None:
        with httpx.Client(base_url=config.url, timeout=30) as client:
            barrier.wait()
            for i in range(10):
                statuses.append(_predict(client, records[(k * 10 + i) % len(records)]).status_code)

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 160
    (info,) = replica_infos(config)
    assert info["largest_batch_requests"] > 1
    metrics = httpx.get(f"{config.url}/metrics", timeout=10).text
    buckets = dict(
        re.findall(r'mlops_serve_serve_batch_requests_bucket\{le="([^"]+)"\} (\S+)', metrics)
    )
    assert float(buckets["+Inf"]) > float(buckets["1.0"]), "every batch held a single request"


# -- a bad model never takes traffic ----------------------------------------------------------


def _tampered_copy(registry: ModelRegistryResource, version: str) -> str:
    stored = registry.load(version)
    manifest = registry.register(stored.model_text, stored.preprocessor_json, {"metrics": {}})
    model_file = Path(registry.root) / "models" / manifest["version"] / "model.txt"
    model_file.write_text(model_file.read_text().replace("shrinkage=0.1", "shrinkage=0.9", 1))
    return manifest["version"]


def test_corrupt_model_is_refused_and_v2_keeps_serving(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    v2 = stores["versions"][1]
    deploy(config, v2)  # idempotent when v2 is already live (order-independent test)
    bad = _tampered_copy(stores["registry"], v2)
    # Refused where the deploy runs, before serving is touched ...
    with pytest.raises(DeployError, match=rf"model {bad} failed verification before deployment"):
        deploy(config, bad)
    # ... and by the replica itself when the deploy skips that step: it keeps the old model.
    with Load(config.url, stores["records"]) as load:
        time.sleep(0.5)
        with pytest.raises(DeployError, match=rf"refused model {bad}.*still serving {v2}.*sha256"):
            deploy(config, bad, verify_locally=False)
        time.sleep(0.5)
    assert {(r[2], r[3]) for r in load.all} == {(200, v2)}
    assert live_health(config) == {"status_code": 200, "status": "ok", "model_version": v2}
    (info,) = replica_infos(config)
    assert info["model_version"] == v2 and "sha256" in info["last_error"]


def test_a_restarted_replica_comes_back_with_the_last_deployed_model(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    v1, v2 = stores["versions"]
    assert first_deploy["version"] == v1  # Serve's own user_config still names v1
    assert deploy(config, v2)["mode"] == "swap"
    (before,) = replica_infos(config)
    # Kill the replica process: Serve starts a new one from the deployment's user_config (v1),
    # which must pick up the newer recorded deploy (v2) instead.
    ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            infos = replica_infos(config)
        except Exception:  # the handle call raced the dying replica
            infos = []
        if infos and infos[0]["replica_id"] != before["replica_id"]:
            break
        assert time.monotonic() < deadline, "Serve did not replace the killed replica"
        time.sleep(0.5)
    (after,) = infos
    assert after["pid"] != before["pid"]
    assert after["model_version"] == v2
    assert live_health(config)["model_version"] == v2


# -- the Dagster asset and its check ----------------------------------------------------------


def test_served_model_asset_deploys_the_champion_and_the_check_passes(
    config: ServeConfig,
    stores: dict[str, Any],
    ray_serve: RayResource,
    first_deploy: dict[str, Any],
    log_dir: Path,
) -> None:
    registry: ModelRegistryResource = stores["registry"]
    v1 = stores["versions"][0]
    registry.promote(v1, "test")
    result = dg.materialize(
        [serve_assets.served_model, serve_assets.endpoint_serves_champion],
        resources={
            "registry": registry,
            "warehouse": stores["warehouse"],
            "ray_serve": ray_serve,
            "prediction_log_files": PredictionLogResource(folder=str(log_dir)),
        },
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("served_model")
    metadata = materialization.metadata
    assert metadata["version"].value == v1
    assert metadata["endpoint"].value == config.url
    assert metadata["replicas"].value == 1
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.description
    assert check.metadata["predict_version"].value == v1
    assert live_health(config)["model_version"] == v1


def test_check_fails_when_the_endpoint_is_not_the_champion(
    config: ServeConfig,
    stores: dict[str, Any],
    ray_serve: RayResource,
    first_deploy: dict[str, Any],
    log_dir: Path,
) -> None:
    registry: ModelRegistryResource = stores["registry"]
    served = live_health(config)["model_version"]
    other = next(v for v in stores["versions"] if v != served)
    registry.promote(other, "test: champion moved, endpoint not redeployed")
    result = dg.materialize(
        [serve_assets.served_model, serve_assets.endpoint_serves_champion],
        resources={
            "registry": registry,
            "warehouse": stores["warehouse"],
            "ray_serve": ray_serve,
            "prediction_log_files": PredictionLogResource(folder=str(log_dir)),
        },
        selection=dg.AssetSelection.checks(serve_assets.endpoint_serves_champion),
        raise_on_error=False,
    )
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed
    assert f"the champion is '{other}'" in check.description


def test_served_model_fails_clearly_without_a_champion(tmp_path: Path) -> None:
    result = dg.materialize(
        [serve_assets.served_model],
        resources={
            "registry": ModelRegistryResource(root=str(tmp_path / "empty")),
            "warehouse": WarehouseResource(root=str(tmp_path / "w"), reports_root=str(tmp_path)),
            "ray_serve": RayResource(state_dir=str(tmp_path / "ray")),  # never reached
            "prediction_log_files": PredictionLogResource(folder=str(tmp_path / "log")),
        },
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("served_model")
    assert failure is not None
    assert "no champion model to serve" in str(failure.error)


# -- back-pressure ----------------------------------------------------------------------------


def test_overload_gets_fast_503s_not_a_pile_up(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    # A second, deliberately tiny app beside the main one: one request at a time, one queued.
    tiny = config.model_copy(
        update={
            "app_name": "overload",
            "route_prefix": "/overload",
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "max_batch_size": 1,
            "batch_bypass_records": 1,
        }
    )
    deploy(tiny, stores["versions"][0])
    try:
        with Load(tiny.url, stores["records"]) as load:
            time.sleep(2.0)
        answers = load.all
        statuses = {r[2] for r in answers}
        assert statuses <= {200, 503}, statuses
        shed = [r for r in answers if r[2] == 503]
        served = [r for r in answers if r[2] == 200]
        assert shed and served
        shed_ms = sorted((r[1] - r[0]) * 1000 for r in shed)
        print(
            f"overload: {len(served)} answered, {len(shed)} shed with 503, "
            f"p50 503 in {shed_ms[len(shed_ms) // 2]:.1f} ms"
        )
        assert shed_ms[len(shed_ms) // 2] < 100
        # The main app is untouched.
        assert live_health(config)["status_code"] == 200
    finally:
        serve.delete(tiny.app_name)


# -- several replicas: one metrics view -------------------------------------------------------


def test_metrics_count_every_replica_whichever_answers_the_scrape(
    config: ServeConfig, stores: dict[str, Any], first_deploy: dict[str, Any]
) -> None:
    multi = config.model_copy(
        update={
            "app_name": "multi",
            "route_prefix": "/multi",
            "num_replicas": 2,
            "replica_num_cpus": 0.5,
        }
    )
    version = stores["versions"][0]
    deploy(multi, version)
    try:
        infos = replica_infos(multi)
        assert len({r["pid"] for r in infos}) == 2
        urls = direct_ingress_urls(multi)
        assert len(urls) == 2
        for url in urls:  # each replica's own port: both replicas surely answer some
            with httpx.Client(base_url=url, timeout=20) as client:
                for record in stores["records"][:15]:
                    assert _predict(client, record).status_code == 200
        with httpx.Client(base_url=multi.url, timeout=20) as client:
            for record in stores["records"][:10]:
                assert _predict(client, record).status_code == 200
        assert all(r["batches"] + r["scored_alone"] > 0 for r in replica_infos(multi))
        pattern = rf'mlops_serve_predictions_total{{model_version="{version}"}} (\S+)'
        scrapes = [
            *(httpx.get(f"{url}/metrics", timeout=10).text for url in urls),
            *(httpx.get(f"{multi.url}/metrics", timeout=10).text for _ in range(4)),
        ]
        totals = {float(re.search(pattern, text).group(1)) for text in scrapes}
        assert totals == {40.0}, totals
        assert all(
            f'mlops_serve_model_loaded{{model_version="{version}"}} 1.0' in t for t in scrapes
        )
    finally:
        serve.delete(multi.app_name)
