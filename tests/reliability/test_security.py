"""Security and integrity of serving: loopback listeners, no leaked secrets, no unpickling, and
corrupt models never served.

One local Ray head for the module, started by the ``served_model`` asset itself from the
project's default resources (``MLOPS_HOME`` in a temp dir, secrets only in the environment).
Run with ``-s`` to see the socket table and the counts.
"""

from __future__ import annotations

import _pickle
import contextlib
import copyreg
import json
import os
import pickle
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import psutil
import pytest
import ray
from ray import serve

from mlops_assets.serve import assets as serve_assets
from mlops_assets.serve.app import build_app
from mlops_assets.serve.deployment import (
    ModelTarget,
    ServeConfig,
    live_health,
    load_predictor,
)
from mlops_assets.serve.predictor import Predictor, PredictorError
from mlops_assets.serve.ray_runtime import free_port, stop_local_ray
from resources import default_resources
from resources.registry import ModelIntegrityError, ModelRegistryResource
from resources.weather_api_server import serve_weather_api
from tests.reliability.serving_fixtures import (
    BackgroundLoad,
    Stores,
    build_stores,
    head_pids,
    listening_sockets,
    short_home,
)

pytestmark = pytest.mark.timeout(600)

LOOPBACK = {"127.0.0.1", "::1"}
MLOPS = str(Path(sys.executable).parent / "mlops")


# -- model loading never unpickles (in-process, no Ray) ----------------------------------------


@pytest.fixture(scope="module")
def one_model() -> Iterator[Stores]:
    with short_home("mlpk") as home:
        yield build_stores(home)


class _Unpickled(AssertionError):
    pass


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every unpickling entry point raises (and records the call)."""
    calls: list[str] = []

    def refuse(name: str) -> Any:
        def _refused(*args: object, **kwargs: object) -> None:
            calls.append(name)
            raise _Unpickled(f"{name} called during model loading")

        return _refused

    for module in (pickle, _pickle):
        for name in ("loads", "load", "Unpickler"):
            monkeypatch.setattr(module, name, refuse(f"{module.__name__}.{name}"))
    monkeypatch.setattr(copyreg, "_reconstructor", refuse("copyreg._reconstructor"))
    return calls


def _target(stores: Stores, version: str) -> ModelTarget:
    return ModelTarget(
        model_version=version,
        registry_root=stores.registry.root,
        warehouse_root=stores.warehouse.root,
    )


def test_loading_and_serving_a_model_never_unpickles(
    one_model: Stores, no_unpickling: list[str]
) -> None:
    version = one_model.versions[0]
    predictor = load_predictor(_target(one_model, version))  # hash, schema, smoke test
    app = build_app(lambda: predictor)
    transport = httpx.ASGITransport(app=app)

    async def call() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.post("/predict", json={"flights": one_model.records[:20]}),
                await client.get("/model"),
                await client.get("/healthz"),
            ]

    import asyncio

    predict, model, health = asyncio.run(call())
    assert predict.status_code == 200, predict.text
    assert predict.json()["model_version"] == version
    assert len(predict.json()["predictions"]) == 20
    assert model.json()["version"] == version and health.status_code == 200
    assert no_unpickling == []


def _malicious_pickle(marker: Path, protocol: int) -> bytes:
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.mkdir, (str(marker),))

    return pickle.dumps(Payload(), protocol=protocol)


def test_a_pickle_in_place_of_a_model_is_refused_and_never_run(
    one_model: Stores, tmp_path: Path, no_unpickling: list[str]
) -> None:
    stored = one_model.registry.load(one_model.versions[0])
    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    marker = tmp_path / "pwned"
    # 1. A text (protocol 0) pickle registered as the model, with a matching sha256: the hash
    #    passes, LightGBM's text parser refuses it; it is never unpickled.
    text_pickle = _malicious_pickle(marker, 0).decode("ascii")
    version = registry.register(text_pickle, stored.preprocessor_json, {"metrics": {}})["version"]
    target = ModelTarget(
        model_version=version, registry_root=registry.root, warehouse_root=one_model.warehouse.root
    )
    with pytest.raises(PredictorError, match=rf"model {version} cannot be loaded"):
        load_predictor(target)
    # 2. A binary pickle written over a registered model's file: refused by its hash.
    good = registry.register(stored.model_text, stored.preprocessor_json, {"metrics": {}})
    model_file = Path(registry.root) / "models" / good["version"] / "model.txt"
    model_file.write_bytes(_malicious_pickle(marker, 5))
    with pytest.raises(ModelIntegrityError, match=good["version"]):
        load_predictor(target.model_copy(update={"model_version": good["version"]}))
    # ... and refused for promotion.
    with pytest.raises(ModelIntegrityError):
        registry.promote(good["version"], "a pickle")
    assert registry.champion() is None
    assert not marker.exists(), "the pickle's payload ran"
    assert no_unpickling == []
    # Control: unpickling this payload really would have run it.
    with pytest.raises(_Unpickled):
        pickle.loads(_malicious_pickle(marker, 5))


# -- one head, started by the asset from the default resources, with canary secrets ------------


@pytest.fixture(scope="module")
def secured() -> Iterator[dict[str, Any]]:
    canary_api = f"canary-api-{uuid.uuid4().hex}"
    canary_weather = f"canary-weather-{uuid.uuid4().hex}"
    server, _ = serve_weather_api("127.0.0.1", 0, token=canary_weather)
    saved = dict(os.environ)  # the asset's Ray connection points TMPDIR at the head's temp dir
    with short_home("mlsec") as root, pytest.MonkeyPatch.context() as env:
        home = root / "m"
        env.setenv("MLOPS_HOME", str(home))
        env.setenv("DAGSTER_HOME", str(root / "dh"))
        env.setenv("MLOPS_API_TOKEN", canary_api)
        env.setenv("MLOPS_WEATHER_API_TOKEN", canary_weather)
        env.setenv("MLOPS_WEATHER_API_URL", f"http://127.0.0.1:{server.server_port}")
        env.setenv("MLOPS_SERVE_PORT", str(free_port()))
        for name in ("RAY_ADDRESS", "MLOPS_REFERENCE_DB_URL"):
            env.delenv(name, raising=False)
        (root / "dh").mkdir()
        (root / "dh" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        stores = build_stores(home)
        stores.registry.promote(stores.versions[0], "security: first champion")
        resources = default_resources()
        ray_serve = resources["ray_serve"]
        try:
            with dg.instance_for_test(temp_dir=str(root / "dh")) as instance:
                weather = dg.materialize(
                    [*_ingest_assets()],
                    selection=["raw_weather"],
                    partition_key="2013-01",
                    instance=instance,
                    resources=resources,
                )
                served = dg.materialize(
                    [serve_assets.served_model, serve_assets.endpoint_serves_champion],
                    instance=instance,
                    resources=resources,
                )
                yield {
                    "root": root,
                    "home": home,
                    "stores": stores,
                    "resources": resources,
                    "ray_serve": ray_serve,
                    "instance": instance,
                    "runs": [weather, served],
                    "canaries": {
                        "MLOPS_API_TOKEN": canary_api,
                        "MLOPS_WEATHER_API_TOKEN": canary_weather,
                    },
                    "url": f"http://127.0.0.1:{os.environ['MLOPS_SERVE_PORT']}",
                }
        finally:
            server.shutdown()
            server.server_close()
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
            stop_local_ray(home / "ray")
            os.environ.clear()
            os.environ.update(saved)


def _ingest_assets() -> list[dg.AssetsDefinition]:
    from mlops_assets.ingest.assets import raw_weather

    return [raw_weather]


def _serve_config(secured: dict[str, Any]) -> ServeConfig:
    r = secured["resources"]
    return serve_assets.serve_config(
        r["registry"], r["warehouse"], r["ray_serve"], r["prediction_log_files"]
    )


def test_the_materializations_succeed_with_the_tokens_from_the_environment(
    secured: dict[str, Any],
) -> None:
    weather, served = secured["runs"]
    assert weather.success and served.success
    (check,) = served.get_asset_check_evaluations()
    assert check.passed, check.description  # the check calls /predict with the token
    token = secured["canaries"]["MLOPS_API_TOKEN"]
    with httpx.Client(base_url=secured["url"], timeout=20) as client:
        record = secured["stores"].records[0]
        assert client.post("/predict", json={"flights": [record]}).status_code == 401
        ok = client.post(
            "/predict", json={"flights": [record]}, headers={"Authorization": f"Bearer {token}"}
        )
        assert ok.status_code == 200


def _files_containing(folder: Path, needles: list[bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    scanned = 0
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        scanned += 1
        for needle in needles:
            if needle in data:
                found.setdefault(needle.decode(), []).append(str(path))
    found["__scanned__"] = [str(scanned)]
    return found


def test_canary_secrets_never_reach_logs_events_or_run_config(secured: dict[str, Any]) -> None:
    canaries = secured["canaries"]
    token = canaries["MLOPS_API_TOKEN"]
    # Traffic that carries the secrets in headers: right token, wrong tokens (one is the other
    # canary), and a body that names neither.
    with httpx.Client(base_url=secured["url"], timeout=20) as client:
        record = secured["stores"].records[1]
        for auth in (token, canaries["MLOPS_WEATHER_API_TOKEN"], token + "x"):
            client.post("/predict", json={"flights": [record]},
                        headers={"Authorization": f"Bearer {auth}"})  # fmt: skip
        client.get("/model", headers={"Authorization": f"Bearer {token}"})
    needles = [c.encode() for c in canaries.values()]
    instance: dg.DagsterInstance = secured["instance"]
    leaks: list[str] = []
    events = 0
    for result in secured["runs"]:
        run = instance.get_run_by_id(result.run_id)
        assert run is not None
        config_text = json.dumps(run.run_config, default=str)
        leaks += [f"run config of {run.run_id}" for n in needles if n.decode() in config_text]
        for entry in instance.all_logs(result.run_id):
            events += 1
            text = dg.serialize_value(entry)
            leaks += [f"event {entry.dagster_event_type}" for n in needles if n.decode() in text]
    # Every file the runs, the replicas and the head wrote: Dagster storage (event log, compute
    # logs), MLOPS_HOME (prediction log, registry, warehouse), Ray's session logs.
    files = _files_containing(secured["root"], needles)
    scanned = int(files.pop("__scanned__")[0])
    ray_logs = list((secured["home"] / "ray").rglob("session_*/logs/*"))
    predlog = list((secured["home"] / "logs" / "predictions").rglob("*"))
    print(
        f"\ncanaries: {events} Dagster events, 2 run configs, {scanned} files scanned "
        f"({len(ray_logs)} Ray session logs, {len(predlog)} prediction-log files): leaks "
        f"{leaks or 'none'}, files {files or 'none'}"
    )
    assert ray_logs and predlog and events > 10
    assert not leaks and not files
    # The secrets reached the resources through dg.EnvVar (resolved at run time, stored by name).
    run_configs = json.dumps(
        [instance.get_run_by_id(r.run_id).run_config for r in secured["runs"]], default=str
    )
    assert "canary" not in run_configs


def _ray_role(socket: dict[str, Any]) -> str | None:
    """What a Ray process listens for (README, "Security"), or None if not a known internal."""
    process, name = socket["process"], socket["name"]
    if name == "gcs_server":
        return "GCS (gRPC)"
    if name == "raylet":
        return "raylet: node manager and object manager (gRPC)"
    if "autoscaler/_private/monitor.py" in process:
        return "autoscaler monitor metrics (HTTP, Prometheus)"
    if "dashboard/dashboard.py" in process:
        return "dashboard head metrics (HTTP, Prometheus)"
    if "DashboardAgent" in process or "dashboard/agent.py" in process:
        return "dashboard agent: HTTP, gRPC, metrics export (HTTP)"
    if "RuntimeEnvAgent" in process or "runtime_env/agent" in process:
        return "runtime-env agent (HTTP)"
    if "ray.util.client.server" in process:
        return "Ray client server (gRPC)"
    if name.startswith("ray::") or process.startswith("ray::"):
        return "worker: core worker gRPC"
    return None


def test_every_serving_http_listener_binds_loopback(secured: dict[str, Any]) -> None:
    ray_serve = secured["resources"]["ray_serve"]
    pids = head_pids(ray_serve)
    sockets = listening_sockets(pids)
    port = int(os.environ["MLOPS_SERVE_PORT"])
    proxy = [s for s in sockets if s["port"] == port]
    # The dashboard's own HTTP server (UI and state API) is --dashboard-port; off by default
    # (--include-dashboard=false), and bound to --dashboard-host=127.0.0.1 if it is on.
    dashboard_http = {
        int(arg.split("=", 1)[1])
        for pid in pids
        for arg in psutil.Process(pid).cmdline()
        if arg.startswith("--dashboard-port=")
    }
    assert dashboard_http, "the head was started without an explicit --dashboard-port"
    print(f"\nRay head: {len(pids)} processes, {len(sockets)} LISTEN sockets:")
    for s in sockets:
        scope = "loopback" if s["ip"] in LOOPBACK else "WIDE"
        role = "Serve HTTP proxy" if s["port"] == port else _ray_role(s)
        print(f"  {s['ip']:>16}:{s['port']:<5} {scope:8} {role}  (pid {s['pid']} {s['name']})")
    assert proxy, f"nothing listens on the Serve port {port}"
    assert {s["ip"] for s in proxy} <= LOOPBACK, proxy
    assert all(s["ip"] in LOOPBACK for s in sockets if s["port"] in dashboard_http)
    wide = [s for s in sockets if s["ip"] not in LOOPBACK]
    # What binds wider is Ray's internal plumbing, each a known role; never the Serve proxy,
    # the dashboard UI/API, or anything unrecognised.
    unknown = [s for s in wide if _ray_role(s) is None]
    assert not unknown, unknown
    assert wide, "expected Ray's internal ports in the table (is the head really ours?)"


@pytest.mark.reliability_full  # ~1-3 min: lands months, materializes, starts the daemon
def test_mlops_up_listens_only_on_loopback(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MLOPS_HOME": str(tmp_path / "m")}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.Popen([MLOPS, "up", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, "mlops up exited"
                time.sleep(1)
        else:
            pytest.fail("the Dagster UI did not come up")
        # The code servers start behind the webserver and the daemon: give them a moment.
        time.sleep(5)
        family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        sockets = listening_sockets(family)
        print(f"\nmlops up: {len(family)} processes, LISTEN sockets:")
        for s in sockets:
            print(f"  {s['ip']:>15}:{s['port']:<5} pid {s['pid']:<7} {s['process']}")
        assert any(s["port"] == port for s in sockets)
        assert {s["ip"] for s in sockets} <= LOOPBACK, sockets
    finally:
        subprocess.run([MLOPS, "down"], env=env, timeout=120, capture_output=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- corrupt models are refused; the old one serves on; the alias does not move --------------


def _report_gate(instance: dg.DagsterInstance, version: str) -> None:
    """What ``model_evaluation`` records when its gate passes (``champion_model`` reads it)."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "model_evaluation",
            metadata={"challenger_version": version, "gate_passed": True,
                      "gate_reason": "reliability: gate passed"},
        )
    )  # fmt: skip


def _corrupt(registry: ModelRegistryResource, version: str) -> tuple[Path, bytes]:
    model_file = Path(registry.root) / "models" / version / "model.txt"
    original = model_file.read_bytes()
    model_file.write_bytes(original.replace(b"shrinkage=0.1", b"shrinkage=0.9", 1))
    assert model_file.read_bytes() != original
    return model_file, original


def test_corrupt_models_are_refused_through_the_assets_under_load(secured: dict[str, Any]) -> None:
    stores: Stores = secured["stores"]
    registry, instance = stores.registry, secured["instance"]
    resources = secured["resources"]
    served = live_health(_serve_config(secured))["model_version"]
    assert served == registry.champion() == stores.versions[0]
    v2 = stores.versions[1]
    token = secured["canaries"]["MLOPS_API_TOKEN"]
    attempts: list[str] = []
    with BackgroundLoad(f"{secured['url']}/predict", stores.records, workers=4,
                        headers={"Authorization": f"Bearer {token}"}) as load:  # fmt: skip
        # (a) the challenger was corrupted after registration: champion_model refuses to move
        #     the alias, served_model never runs.
        model_file, original = _corrupt(registry, v2)
        _report_gate(instance, v2)
        result = dg.materialize(
            [serve_assets.served_model, _champion_asset()],
            instance=instance, resources=resources, raise_on_error=False,
        )  # fmt: skip
        attempts.append("promote corrupt challenger")
        assert not result.success
        failure = result.failure_data_for_node("champion_model")
        assert failure is not None and "refusing to load" in str(failure.error)
        assert registry.champion() == served
        # (b) the champion alias points at a model corrupted after promotion: served_model
        #     refuses to deploy it (verification before serving is touched).
        model_file.write_bytes(original)
        registry.promote(v2, "reliability: valid promotion, then corrupted on disk")
        _corrupt(registry, v2)
        result = dg.materialize(
            [serve_assets.served_model], instance=instance, resources=resources,
            raise_on_error=False,
        )  # fmt: skip
        attempts.append("deploy corrupted champion")
        assert not result.success
        failure = result.failure_data_for_node("served_model")
        assert failure is not None
        assert f"model {v2} failed verification before deployment" in str(failure.error)
        # (c) a forced reload of the model being served, whose file is now corrupt: every
        #     replica keeps the model it has in memory.
        served_file, served_bytes = _corrupt(registry, served)
        handle = serve.get_app_handle("mlops")
        target = ModelTarget(
            model_version=served,
            registry_root=registry.root,
            warehouse_root=stores.warehouse.root,
            generation=time.time_ns(),
        )
        forced = handle.swap.remote(target.model_dump(), force=True).result(timeout_s=120)
        attempts.append("forced reload with a hash mismatch")
        assert not forced["ok"] and "sha256" in forced["error"], forced
        assert forced["model_version"] == served
        served_file.write_bytes(served_bytes)
        model_file.write_bytes(original)
        time.sleep(0.5)
        answers = load.stop()
    statuses = answers.statuses()
    print(
        f"\ncorrupt models: {len(attempts)} attempts refused ({attempts}); "
        f"{len(answers.answers)} requests meanwhile, statuses {statuses}"
    )
    assert statuses == {200: len(answers.answers)} and answers.answers
    assert {a.version for a in answers.answers} == {served}
    assert live_health(_serve_config(secured))["model_version"] == served
    assert registry.champion() == v2  # (b) moved it legitimately; the endpoint check says so
    registry.rollback("reliability: back to the served model")
    assert registry.champion() == served


def _champion_asset() -> dg.AssetsDefinition:
    from mlops_assets.evaluate.assets import champion_model

    return champion_model


def test_a_predictor_refuses_a_model_that_is_not_lightgbm_text(one_model: Stores) -> None:
    stored = one_model.registry.load(one_model.versions[0])
    bogus = type(stored)(stored.version, "not a model\n", stored.preprocessor_json, {})
    with pytest.raises(PredictorError, match="cannot be loaded"):
        Predictor.from_stored(
            bogus, one_model.warehouse.read("planes"), one_model.warehouse.read("weather")
        )
