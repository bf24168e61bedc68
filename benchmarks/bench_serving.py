"""Serving: single-record ``POST /predict`` against four servers, same model, same client.

    python -m benchmarks.bench_serving --repeats 3 --json .mlops/bench/serving.json

(a) ``naive``: FastAPI + uvicorn (1 worker), the handler reads the JSON, derives the booking
    features in Python, builds a one-row pandas DataFrame and calls ``Booster.predict`` on it;
(b) ``bare``: the same handler with a numpy row instead of the DataFrame: the no-framework
    limit. Neither validates, enriches (weather and planes are NaN), logs or counts anything;
(c) ``serve``: the project's Ray Serve app (``deploy``) with the whole contract on (strict
    validation, enrichment through the shared feature function's path, the prediction log,
    Prometheus metrics, ``@serve.batch``), through the Serve proxy on a head started without
    direct ingress;
(d) ``direct``: the same app on a head started with direct ingress
    (``RayResource(direct_ingress=True)``), on the replica's own port; the proxy of that head
    is measured too (``serve+di``). After the timed runs an in-place swap to a second model is
    made under load on the replica's port: it must lose nothing and keep the port.

The model is trained as the serving tests train theirs: validated January flights from the
package, the project's feature function, ``Preprocessor`` and ``train.model.fit`` (30 rounds),
registered in a temporary registry (under ``--home``, default ``.mlops/bench/serving``).

The load client is aiohttp in a process of its own (``--client``, internal): ``concurrency``
workers each send pre-encoded single-record bodies back to back over kept-alive connections
(400 real January bookings in rotation); after ``--warmup`` seconds it counts ``--seconds``
seconds of answers. Every answer must be a 200. The client measures its own CPU time, the
servers' (``/proc/<pid>/stat`` of the server process; for Ray the replica and the proxy) and the
whole machine's (``/proc/stat``) over the same window, so the table shows whether the client
(one core at most) or the two cores were the limit. Servers are measured one at a time,
interleaved within each phase, ``--repeats`` times; the table shows medians.
"""

import argparse
import asyncio
import datetime as dt
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlops_assets.serve.ray_runtime import free_port

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "@@result "
CLK_TCK = os.sysconf("SC_CLK_TCK")
N_RECORDS = 400
BATCH_BODIES = 4
TARGET_BATCH_SHARE = 0.5
TARGET_P50_MS = 5.0


# --------------------------------------------------------------------------- setup


# No ``from __future__ import annotations`` here: FastAPI resolves the baseline handlers'
# annotations at runtime, and ``Request`` is imported inside the child process only.


def prepare(home: Path, toy_model: bool = False) -> dict[str, Any]:
    """Warehouse (weather, planes), registry with two real models, and the request records.

    The models are what the pipeline would serve: the project's Optuna search (default
    settings) on January, early-stopped on its last week. ``toy_model``: 30 rounds of 15 leaves
    instead, the model of the measurements before 2026-11-27.
    """
    from mlops_assets.train.model import SearchSettings, search
    from tests.realdata import January, serving_stores, small_lightgbm

    def searched(seed: int) -> Any:
        def make(data: January) -> tuple[Any, dict[str, Any]]:
            found = search(data.matrix((1, 24)), data.matrix((25, 31)), SearchSettings(seed=seed))
            return found.booster, {**found.params, "num_boost_round": found.booster.num_trees()}

        return make

    if home.exists():
        shutil.rmtree(home)
    makers = [small_lightgbm(s, 15, 30) if toy_model else searched(s) for s in (13, 14)]
    built = serving_stores(home, makers)
    (home / "records.json").write_text(json.dumps(built.bookings(N_RECORDS, seed=5)))
    # Large requests: distinct January bookings, BATCH_BODIES bodies' worth.
    batch = built.bookings(BATCH_BODIES * 1000, seed=6)
    (home / "records-batch.json").write_text(json.dumps(batch))
    return {"registry": built.registry, "warehouse": built.warehouse, "versions": built.versions}


# --------------------------------------------------------------------------- baselines (a), (b)


def serve_baseline(kind: str, home: Path, port: int, version: str) -> None:
    """Run the naive (pandas) or bare (numpy) FastAPI app under uvicorn until SIGTERM."""
    import lightgbm as lgb
    import numpy as np
    import pandas as pd
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from mlops_assets.features.preprocess import Preprocessor
    from mlops_assets.features.transform import CATEGORICAL_FEATURES, FEATURE_NAMES
    from resources.registry import ModelRegistryResource

    stored = ModelRegistryResource(root=str(home / "registry")).load(version)
    booster = lgb.Booster(model_str=stored.model_text)
    preprocessor = Preprocessor.from_json(stored.preprocessor_json)
    codes = {
        c: {v: float(i) for i, v in enumerate(preprocessor.categories[c])}
        for c in CATEGORICAL_FEATURES
    }
    nan = math.nan

    def features(r: dict[str, Any]) -> dict[str, float]:
        dep, arr = r["sched_dep_time"], r["sched_arr_time"]
        dep_min, arr_min = dep // 100 * 60 + dep % 100, arr // 100 * 60 + arr % 100
        row = dict.fromkeys(FEATURE_NAMES, nan)
        row.update(
            dep_hour=float(dep // 100),
            dep_minute_of_day=float(dep_min),
            arr_minute_of_day=float(arr_min),
            sched_block_minutes=float((arr_min - dep_min) % 1440),
            weekday=float(dt.date(r["year"], r["month"], r["day"]).isoweekday()),
            distance=float(r["distance"]),
            **{c: codes[c].get(r[c], nan) for c in CATEGORICAL_FEATURES},
        )
        return row

    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await request.json()
        rows = [features(r) for r in body["flights"]]
        if kind == "naive":
            x: Any = pd.DataFrame(rows, columns=list(FEATURE_NAMES))
        else:
            x = np.array([list(row.values()) for row in rows], dtype=np.float64)
        p = booster.predict(x, num_threads=1)
        return JSONResponse(
            {
                "model_version": version,
                "predictions": [
                    {"delay_probability": float(v), "delayed": bool(v >= 0.5)} for v in p
                ],
            }
        )

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class Baseline:
    """A baseline server in a child process."""

    def __init__(self, kind: str, home: Path, version: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_serving", "--serve-baseline", kind,
             "--home", str(home), "--port", str(self.port), "--version", version],
            cwd=REPO,
        )  # fmt: skip
        _wait_http(f"{self.url}/docs", 60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_http(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s")
        time.sleep(0.2)


# --------------------------------------------------------------------------- the client


def _proc_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


async def _load(
    url: str, concurrency: int, warmup: float, seconds: float, watch: list[int]
) -> dict[str, Any]:
    import aiohttp

    records = json.loads(Path(os.environ["BENCH_RECORDS"]).read_text())
    size = int(os.environ.get("BENCH_BATCH", "1"))
    chunks = [records[i : i + size] for i in range(0, len(records) - size + 1, size)]
    if os.environ.get("BENCH_FORMAT", "json") == "arrow":
        from mlops_assets.serve.columnar import ARROW_MEDIA_TYPE, to_arrow

        bodies = [to_arrow(chunk) for chunk in chunks]
        headers = {"content-type": ARROW_MEDIA_TYPE}
    else:
        bodies = [json.dumps({"flights": chunk}).encode() for chunk in chunks]
        headers = {"content-type": "application/json"}
    latencies: list[float] = []
    bad: list[str] = []
    window: dict[str, float] = {}
    state = {"measuring": False, "stop": False}

    async def worker(k: int, session: aiohttp.ClientSession) -> None:
        i = k
        while not state["stop"]:
            body = bodies[i % len(bodies)]
            i += concurrency
            started = time.perf_counter()
            async with session.post(f"{url}/predict", data=body, headers=headers) as response:
                payload = await response.read()
                status = response.status
            elapsed = time.perf_counter() - started
            if state["measuring"]:
                latencies.append(elapsed)
                if status != 200:
                    bad.append(f"{status}: {payload[:200]!r}")

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(worker(k, session)) for k in range(concurrency)]
        await asyncio.sleep(warmup)
        state["measuring"] = True
        window.update(
            wall=time.perf_counter(),
            client=time.process_time(),
            machine=_machine_busy_s(),
            **{f"pid{p}": _proc_cpu_s(p) for p in watch},
        )
        await asyncio.sleep(seconds)
        state["measuring"] = False
        wall = time.perf_counter() - window["wall"]
        client_cpu = time.process_time() - window["client"]
        machine = _machine_busy_s() - window["machine"]
        servers = sum(_proc_cpu_s(p) - window[f"pid{p}"] for p in watch)
        count = len(latencies)
        state["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    return {
        "requests": count,
        "errors": len(bad),
        "error_sample": bad[:3],
        "rps": count / wall,
        "p50_ms": 1000 * latencies[count // 2] if count else math.nan,
        "p99_ms": 1000 * latencies[min(count - 1, int(count * 0.99))] if count else math.nan,
        "client_cores": client_cpu / wall,
        "server_cores": servers / wall,
        "machine_cores": machine / wall,
        "client_us_per_request": 1e6 * client_cpu / count if count else math.nan,
    }


def run_client(
    url: str,
    records: Path,
    concurrency: int,
    warmup: float,
    seconds: float,
    watch: list[int],
    batch: int = 1,
    body_format: str = "json",
) -> dict[str, Any]:
    """One measurement, by a client process of its own."""
    command = [
        sys.executable, "-m", "benchmarks.bench_serving", "--client", url,
        "--concurrency", str(concurrency), "--warmup", str(warmup), "--seconds", str(seconds),
        *(f"--watch-pid={p}" for p in watch),
    ]  # fmt: skip
    out = subprocess.run(
        command,
        cwd=REPO,
        env={
            **os.environ,
            "BENCH_RECORDS": str(records),
            "BENCH_BATCH": str(batch),
            "BENCH_FORMAT": body_format,
        },
        capture_output=True,
        text=True,
        timeout=warmup + seconds + 120,
    )
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"client failed ({out.returncode}):\n{out.stderr[-3000:]}")


# --------------------------------------------------------------------------- Ray phases


def _ray_pids(config: Any, state_dir: str) -> list[int]:
    """The replica(s) and the proxy: the server side of a Ray Serve request."""
    from mlops_assets.serve.deployment import replica_infos
    from mlops_assets.serve.ray_runtime import local_ray, session_pids

    pids = {int(r["pid"]) for r in replica_infos(config)}
    head = local_ray(state_dir)
    for pid in session_pids(head.session_id, head.temp_dir) if head else []:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ProxyActor"):
                pids.add(pid)
        except OSError:
            continue
    return sorted(pids)


class RayPhase:
    """A local Ray head (with or without direct ingress) serving the project's app."""

    def __init__(
        self,
        home: Path,
        version: str,
        direct: bool,
        knobs: dict[str, Any] | None = None,
        optimized: bool = False,
    ) -> None:
        import ray

        from mlops_assets.serve import assets as serve_assets
        from mlops_assets.serve.deployment import deploy
        from resources.prediction_log import PredictionLogResource
        from resources.ray import RayResource
        from resources.registry import ModelRegistryResource
        from resources.warehouse import WarehouseResource

        self.tmp = Path(tempfile.mkdtemp(prefix="mlbench", dir="/tmp"))  # short: Ray sockets
        self.resource = RayResource(
            state_dir=str(self.tmp / "ray"),
            temp_dir=str(self.tmp / "rt"),
            http_port=free_port(),
            direct_ingress=direct,
            direct_ingress_min_port=free_port() if direct else 30000,
            throughput_optimized=optimized,
        )
        started = time.monotonic()
        # A direct-ingress replica drains >= 30 s by default when Serve shuts down (for load
        # balancers; there is none here), and Serve gives up waiting at 30 s: as in the tests.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
        self.resource.ensure_connected()
        self.config = serve_assets.serve_config(
            ModelRegistryResource(root=str(home / "registry")),
            WarehouseResource(root=str(home / "warehouse"), reports_root=str(home / "reports")),
            self.resource,
            PredictionLogResource(folder=str(home / ("predlog-di" if direct else "predlog"))),
            serve_assets.ServedModelConfig(**(knobs or {})),
        )
        result = deploy(self.config, version)
        deadline = time.monotonic() + 30
        direct_urls = result["direct_endpoints"]
        while direct and not direct_urls and time.monotonic() < deadline:
            from mlops_assets.serve.deployment import direct_ingress_urls

            time.sleep(0.5)
            direct_urls = direct_ingress_urls(self.config)
        if direct and not direct_urls:
            raise RuntimeError("direct ingress is on but Serve reports no replica port")
        self.urls = {"serve+di" if direct else "serve": self.config.url}
        if direct:
            self.urls["direct"] = direct_urls[0]
            _wait_http(f"{direct_urls[0]}/healthz", 30)
        self.pids = _ray_pids(self.config, self.resource.state_dir)
        self.ready_s = time.monotonic() - started
        self.trees = self._wait_compiled()
        print(f"replica trees: {self.trees}", flush=True)
        self._ray = ray

    def _wait_compiled(self, timeout_s: float = 120.0) -> str:
        """Measure what the replica settles on: its compiled trees once the compile finished."""
        from mlops_assets.serve.deployment import replica_infos

        deadline = time.monotonic() + timeout_s
        while True:
            statuses = [str(r.get("trees")) for r in replica_infos(self.config)]
            pending = [s for s in statuses if s.endswith("not compiled")]
            if not self.config.compile_trees or not pending or time.monotonic() > deadline:
                return "; ".join(statuses)
            time.sleep(0.5)

    def stop(self) -> None:
        from ray import serve

        from mlops_assets.serve.ray_runtime import stop_local_ray

        try:
            serve.shutdown()
        finally:
            self._ray.shutdown()
            stop_local_ray(self.resource.state_dir)
            shutil.rmtree(self.tmp, ignore_errors=True)


def swap_under_load(phase: RayPhase, records: Path, version: str) -> dict[str, Any]:
    """An in-place swap while a client loads the replica's own port: nothing lost, same port."""
    from mlops_assets.serve.deployment import deploy, direct_ingress_urls

    url = phase.urls["direct"]
    command = [
        sys.executable, "-m", "benchmarks.bench_serving", "--client", url, "--concurrency", "8",
        "--warmup", "0.5", "--seconds", "6",
    ]  # fmt: skip
    client = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, "BENCH_RECORDS": str(records)},
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    result = deploy(phase.config, version)
    stdout, _ = client.communicate(timeout=120)
    line = next(x for x in stdout.splitlines() if x.startswith(RESULT_PREFIX))
    load = json.loads(line[len(RESULT_PREFIX) :])
    return {
        "mode": result["mode"],
        "deploy_s": result["seconds"],
        "requests": load["requests"],
        "errors": load["errors"],
        "same_port": direct_ingress_urls(phase.config) == [url],
        "version": result["health"]["model_version"],
    }


# --------------------------------------------------------------------------- report


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[tuple[str, int], list[dict[str, Any]]], notes: list[str]) -> str:
    names = {
        "naive": "(a) naive FastAPI+pandas",
        "bare": "(b) bare FastAPI+numpy",
        "serve": "(c) Ray Serve, proxy",
        "serve+di": "(c') Ray Serve, proxy (DI head)",
        "direct": "(d) Ray Serve, direct ingress",
    }
    lines = [
        f"{'server':<32}{'conc':>5}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'vs (a)':>8}"
        f"{'vs (b)':>8}{'client':>8}{'server':>8}{'machine':>8}{'runs':>5}{'errors':>7}",
    ]
    lines.append("-" * len(lines[0]))
    for concurrency in sorted({c for _, c in results}):
        base = {
            k: _median(results[(k, concurrency)], "rps")
            for k in ("naive", "bare")
            if (k, concurrency) in results
        }
        for name in names:
            runs = results.get((name, concurrency))
            if not runs:
                continue
            rps = _median(runs, "rps")
            vs = [f"{rps / base[k]:.2f}x" if k in base else "-" for k in ("naive", "bare")]
            lines.append(
                f"{names[name]:<32}{concurrency:>5}{rps:>8.0f}{_median(runs, 'p50_ms'):>8.2f}"
                f"{_median(runs, 'p99_ms'):>8.2f}{vs[0]:>8}{vs[1]:>8}"
                f"{_median(runs, 'client_cores'):>8.2f}{_median(runs, 'server_cores'):>8.2f}"
                f"{_median(runs, 'machine_cores'):>8.2f}{len(runs):>5}"
                f"{sum(r['errors'] for r in runs):>7}"
            )
    lines.append(
        "client/server/machine: CPU cores busy over the timed window (client process; server "
        "process(es): uvicorn, or Ray replica + proxy; whole machine, 2 cores)"
    )
    targets = []
    for name in ("serve", "direct"):
        big, one = results.get((name, 32)), results.get((name, 1))
        naive, bare = results.get(("naive", 32)), results.get(("bare", 1))
        if big and naive:
            ok = _median(big, "rps") >= _median(naive, "rps")
            targets.append(
                f"target {name}: c=32 req/s >= naive: {'PASS' if ok else 'FAIL'} "
                f"({_median(big, 'rps'):.0f} vs {_median(naive, 'rps'):.0f})"
            )
        if one and bare:
            gap = _median(one, "p50_ms") - _median(bare, "p50_ms")
            targets.append(
                f"target {name}: c=1 p50 within {TARGET_P50_MS:.0f} ms of bare: "
                f"{'PASS' if gap <= TARGET_P50_MS else 'FAIL'} (+{gap:.2f} ms)"
            )
    return "\n".join([*lines, *targets, *notes])


def main_bench(args: argparse.Namespace) -> None:
    home = Path(args.home).resolve()
    started = time.monotonic()
    stores = prepare(home, args.toy_model)
    v1, v2 = stores["versions"]
    records = home / "records.json"
    print(f"setup: 2 models trained on January ({time.monotonic() - started:.1f}s)", flush=True)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    notes: list[str] = []

    def measure(name: str, url: str, pids: list[int]) -> None:
        for concurrency in args.concurrency:
            r = run_client(url, records, concurrency, args.warmup, args.seconds, pids)
            results.setdefault((name, concurrency), []).append(r)
            print(
                f"  {name:<9} c={concurrency:<3} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f} ms"
                f"  p99 {r['p99_ms']:6.2f} ms  client {r['client_cores']:.2f} "
                f"({r['client_us_per_request']:.0f} us/req)  server {r['server_cores']:.2f}  "
                f"machine {r['machine_cores']:.2f}  errors {r['errors']} {r['error_sample']}",
                flush=True,
            )

    if "naive" in args.variants or "bare" in args.variants:
        servers = {k: Baseline(k, home, v1) for k in ("naive", "bare") if k in args.variants}
        try:
            for repeat in range(args.repeats):
                print(f"baselines, round {repeat + 1}", flush=True)
                for name, server in servers.items():
                    measure(name, server.url, [server.proc.pid])
        finally:
            for server in servers.values():
                server.stop()
    for direct in (False, True):
        if ("direct" if direct else "serve") not in args.variants:
            continue
        wait_ms = args.batch_wait_ms
        knobs: dict[str, Any] = {"compile_trees": args.trees == "compiled"}
        if wait_ms is not None:
            knobs["batch_wait_timeout_s"] = wait_ms / 1e3
        phase = RayPhase(home, v1, direct, knobs, args.throughput_optimized)
        print(f"Ray head ({'direct ingress' if direct else 'proxy'}): {phase.urls}, ready in "
              f"{phase.ready_s:.1f}s, server pids {phase.pids}", flush=True)  # fmt: skip
        try:
            for repeat in range(args.repeats):
                print(f"Ray, round {repeat + 1}", flush=True)
                for name, url in phase.urls.items():
                    measure(name, url, phase.pids)
            if direct:
                swap = swap_under_load(phase, records, v2)
                notes.append(
                    f"in-place swap {v1} -> {v2} under load (8 clients) on the replica's own "
                    f"port: mode {swap['mode']}, {swap['requests']} requests, {swap['errors']} "
                    f"failed, same port after: {swap['same_port']}, now {swap['version']}"
                )
                print(notes[-1], flush=True)
        finally:
            phase.stop()
    table = report(results, notes)
    print(f"\n{table}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {f"{k[0]}@{k[1]}": v for k, v in results.items()} | {"notes": notes}, indent=1
            )
        )


def _rows_per_s(fn: Any, rows: int, seconds: float) -> float:
    """Best of three windows of back-to-back calls: the in-process limits."""
    best = 0.0
    for _ in range(3):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / 3:
            fn()
            calls += 1
        best = max(best, calls * rows / elapsed)
    return best


def main_batch(args: argparse.Namespace) -> None:
    """Large requests: rows/s through HTTP against in-process ``Booster.predict`` on the rows."""
    from mlops_assets.serve.deployment import ModelTarget, load_predictor

    home = Path(args.home).resolve()
    size = args.batch
    stores = prepare(home, args.toy_model)
    version = stores["versions"][0]
    records_path = home / "records-batch.json"
    records = json.loads(records_path.read_text())
    bodies = [records[i : i + size] for i in range(0, len(records) - size + 1, size)]
    target = ModelTarget(
        model_version=version,
        registry_root=str(home / "registry"),
        warehouse_root=str(home / "warehouse"),
    )
    predictor = load_predictor(target, num_threads=2)
    matrices = [predictor.matrix(body) for body in bodies]
    booster = predictor.booster
    turn = {"i": 0}

    def limit() -> None:
        booster.predict(matrices[turn["i"] % len(matrices)], num_threads=2)
        turn["i"] += 1

    def in_process() -> None:
        predictor.predict(bodies[turn["i"] % len(bodies)])
        turn["i"] += 1

    rows: dict[str, list[float]] = {}
    knobs = {
        "max_records": size,
        "compile_trees": args.trees == "compiled",
        "num_replicas": args.replicas,
    }
    phases = [("serve", False), ("direct", True)]
    phases = [(name, direct) for name, direct in phases if name in args.variants]
    for name, direct in phases:
        phase = RayPhase(home, version, direct, knobs, args.throughput_optimized)
        print(f"Ray head ({name}): {phase.urls}", flush=True)
        try:
            for repeat in range(args.repeats):
                # The limits are measured in every round, beside the HTTP runs: machines drift.
                for key, fn in (("Booster.predict, in process (the limit)", limit),
                                ("features + predict, in process", in_process)):  # fmt: skip
                    rows.setdefault(key, []).append(_rows_per_s(fn, size, args.seconds))
                    print(f"round {repeat + 1}: {key:<40} {rows[key][-1]:10,.0f} rows/s")
                for label, url in phase.urls.items():
                    for concurrency, body_format in itertools.product(
                        args.concurrency, args.formats
                    ):
                        r = run_client(
                            url, records_path, concurrency, args.warmup, args.seconds,
                            phase.pids, batch=size, body_format=body_format,
                        )  # fmt: skip
                        if r["errors"]:
                            raise RuntimeError(f"{label}: {r['error_sample']}")
                        key = f"HTTP {label}, {body_format}, {concurrency} client(s)"
                        rows.setdefault(key, []).append(r["rps"] * size)
                        print(
                            f"round {repeat + 1}: {key:<40} {r['rps'] * size:10,.0f} rows/s  "
                            f"p50 {r['p50_ms']:7.1f} ms  server {r['server_cores']:.2f}  "
                            f"client {r['client_cores']:.2f}",
                            flush=True,
                        )
        finally:
            phase.stop()
    base = statistics.median(rows["Booster.predict, in process (the limit)"])
    lines = [
        f"{size}-record requests, medians of {args.repeats} rounds",
        f"{'path':<42} {'rows/s':>10} {'vs limit':>9}",
        "-" * 63,
    ]
    for key, values in rows.items():
        value = statistics.median(values)
        lines.append(f"{key:<42} {value:10,.0f} {value / base:8.2f}x")
    best = max((statistics.median(v), k) for k, v in rows.items() if k.startswith("HTTP"))
    verdict = "PASS" if best[0] >= TARGET_BATCH_SHARE * base else "FAIL"
    lines.append(
        f"target: HTTP >= {TARGET_BATCH_SHARE:.0%} of the limit: {verdict} "
        f"({best[1]}: {best[0] / base:.2f}x)"
    )
    print("\n" + "\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    from resources.ray import RayResource

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", default=str(REPO / ".mlops" / "bench" / "serving"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["naive", "bare", "serve", "direct"],
        choices=["naive", "bare", "serve", "direct"],
    )
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--throughput-optimized",
        action=argparse.BooleanOptionalAction,
        default=RayResource.model_fields["throughput_optimized"].default,
        help="start the Ray heads with RAY_SERVE_THROUGHPUT_OPTIMIZED (RayResource flag; "
        "on by default like the resource)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="measure N-record requests (rows/s vs in-process Booster.predict) instead",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["json", "arrow"],
        choices=["json", "arrow"],
        help="request body formats for --batch (JSON records, Arrow IPC stream)",
    )
    parser.add_argument(
        "--toy-model",
        action="store_true",
        help="serve a 30-round, 15-leaf model instead of the project's searched one",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="serving replicas for --batch (Serve's proxy "
        "balances them; direct ingress measures the first replica's port)",
    )
    parser.add_argument(
        "--trees",
        default="compiled",
        choices=["compiled", "lightgbm"],
        help="the replica scores with compiled trees once verified (the default) or LightGBM",
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=None, help="@serve.batch wait (default: the app's)"
    )
    # internal: the child processes
    parser.add_argument("--serve-baseline", choices=["naive", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--version", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument(
        "--watch-pid", type=int, action="append", default=[], help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, Path(args.home), args.port, args.version)
    elif args.client:
        (concurrency,) = args.concurrency
        result = asyncio.run(
            _load(args.client, concurrency, args.warmup, args.seconds, args.watch_pid)
        )
        sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    elif args.batch:
        main_batch(args)
    else:
        main_bench(args)


if __name__ == "__main__":
    main()
