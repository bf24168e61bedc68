"""Detect-to-serve latency of the closed loop, against the same steps as plain functions.

1. **Orchestrated**: a real ``dagster-daemon`` (temp DAGSTER_HOME with the project's
   ``dagster.yaml``) and Ray Serve on 127.0.0.1. Jan–Jun land and bootstrap the first champion
   (not timed). Then one month lands (``land_month``, as ``mlops land`` does) and the clock
   runs until ``GET /healthz`` answers with the new champion: landing sensor → ingest run
   (file → validated → features → drift → performance → retrain decision, then in the same
   run: training set → training (the champion's parameters, or an Optuna search, then a fit
   on train + valid) → evaluation and gate → the refit on every landed month, promotion →
   in-place swap).
2. **Bare**: the state before that month is restored and the same work runs as plain function
   calls (the project's functions that the assets call; no Dagster), ending with the same
   in-place swap on the same Ray Serve app: once in a fresh process, timed from its start to
   its exit (it pays its imports and its Ray connection once, as a run worker does), then again
   in this warm process (imports done, Ray connected).

    .venv/bin/python -m benchmarks.bench_loop --month 2013-07

The ratio orchestrated / bare is the orchestration cost (sensor ticks, queue, run worker start,
imports, event log). Target: at most 90 s and at most 1.5x.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mlops_assets.serve.ray_runtime import free_port

ROOT = Path(__file__).resolve().parents[1]
FIRST = [f"2013-0{m}" for m in range(1, 7)]
REFERENCE = ["raw_planes", "planes", "raw_airports", "airports", "raw_airlines", "airlines"]
SNAPSHOT_DIRS = ("landing", "warehouse", "registry", "reports", "sources")


def served(endpoint: str) -> str | None:
    try:
        return httpx.get(f"{endpoint}/healthz", timeout=5).json().get("model_version")
    except (httpx.HTTPError, ValueError):
        return None


def wait(what: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def orchestrated(home: Path, month: str, endpoint: str) -> dict[str, float | str]:
    import dagster as dg

    from mlops_assets.definitions import defs
    from resources import default_resources
    from resources.files import land_month
    from resources.registry import ModelRegistryResource

    registry = ModelRegistryResource(root=str(home / "registry"))
    with dg.DagsterInstance.get() as instance:
        assert dg.materialize(list(defs.assets), selection=REFERENCE, instance=instance,
                              resources=default_resources()).success  # fmt: skip
    log = open(home / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w",
         str(ROOT / "workspace.yaml")],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        for first in FIRST:
            land_month(first, home / "landing")
        print("bootstrapping the first champion on Jan–Jun (not timed) ...", flush=True)
        wait("the first champion", lambda: registry.champion() is not None
             and served(endpoint) == registry.champion(), 900)  # fmt: skip
        before = registry.champion()
        time.sleep(8)  # let the sensors settle on a quiet state
        os.killpg(daemon.pid, signal.SIGSTOP)  # freeze while the state is copied
        snapshot = Path(tempfile.mkdtemp(prefix="snap-", dir=home.parent))
        for name in SNAPSHOT_DIRS:
            if (home / name).exists():
                shutil.copytree(home / name, snapshot / name)
        os.killpg(daemon.pid, signal.SIGCONT)
        time.sleep(6)
        print(f"landing {month} (champion {before}) ...", flush=True)
        started, landed_at = time.perf_counter(), time.time()
        land_month(month, home / "landing")
        wait("the new champion to answer", lambda: served(endpoint) not in (None, before)
             or _rejected(registry, month), 900)  # fmt: skip
        seconds = time.perf_counter() - started
        after = served(endpoint)
        with dg.DagsterInstance.get() as instance:
            steps = timeline(instance, landed_at)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
    return {"seconds": seconds, "before": before, "after": str(after), "snapshot": str(snapshot),
            "timeline": steps}  # fmt: skip


TIMELINE_EVENTS = ("PIPELINE_ENQUEUED", "PIPELINE_STARTING", "PIPELINE_START", "ENGINE_EVENT",
                   "RESOURCE_INIT_STARTED", "RESOURCE_INIT_SUCCESS", "STEP_START", "STEP_SUCCESS",
                   "STEP_SKIPPED", "PIPELINE_SUCCESS", "PIPELINE_FAILURE")  # fmt: skip


def timeline(instance: Any, since: float) -> list[tuple[float, str]]:
    """Seconds after the landing at which each run and step of the loop began and ended."""
    import dagster as dg

    marks: list[tuple[float, str]] = []
    records = instance.get_run_records(
        filters=dg.RunsFilter(created_after=dt.datetime.fromtimestamp(since, dt.UTC))
    )
    for record in records:
        run = record.dagster_run
        marks.append((record.create_timestamp.timestamp() - since, f"{run.job_name}: created"))
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event is None or event.event_type_value not in TIMELINE_EVENTS:
                continue
            what = event.event_type_value.lower().replace("pipeline_", "run_")
            if event.step_key:
                what = f"{event.step_key} {what.removeprefix('step_')}"
            if event.event_type_value == "ENGINE_EVENT":
                what = f"engine: {(entry.user_message or '')[:60]}"
            marks.append((entry.timestamp - since, f"{run.job_name}: {what}"))
    return sorted(marks)


def _rejected(registry, month: str) -> bool:
    """The loop decided not to serve a new model for ``month`` (no retrain, or the gate)."""
    decided = [d for d in registry.decisions() if d.get("month") == month]
    if not decided:
        return False
    if decided[-1]["action"] == "no_retrain" and not decided[-1].get("retrain_in_run"):
        return True
    gates = [d for d in registry.decisions() if d["action"] == "gate"]
    return bool(gates) and gates[-1]["at"] > decided[-1]["at"] and not gates[-1]["passed"]


def bare(home: Path, month: str, before: str) -> dict[str, float]:
    """The same work as plain function calls, timed per step."""
    import lightgbm as lgb
    import numpy as np
    import polars as pl
    from sklearn.linear_model import LogisticRegression

    from mlops_assets.evaluate.gate import GateRules, decide
    from mlops_assets.evaluate.metrics import (
        Scored,
        best_f1_threshold,
        binary_metrics,
        plot_calibration_and_confusion,
        plot_curves,
    )  # fmt: skip
    from mlops_assets.features.preprocess import Preprocessor
    from mlops_assets.features.splits import assign_splits, split_months
    from mlops_assets.features.transform import FEATURES, LABEL, build_features
    from mlops_assets.monitor.drift import measure_drift
    from mlops_assets.serve.assets import serve_config
    from mlops_assets.serve.deployment import deploy
    from mlops_assets.train.model import (
        BASE_PARAMS,
        Matrix,
        SearchSettings,
        fit,
        fit_with_params,
        search,
    )
    from mlops_assets.validate.quarantine import validate_table
    from mlops_assets.validate.schemas import TABLES
    from resources import default_resources
    from resources.files import land_month

    r = default_resources()
    warehouse, registry = r["warehouse"], r["registry"]
    steps: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        steps[name] = now - clock
        clock = now

    land_month(month, home / "landing")
    clock = time.perf_counter()
    raw = r["landing"].read_month(month)
    flights = validate_table(raw.frame, TABLES["flights"], source=raw.source, partition=month)
    raw_weather = r["weather_api"].read_month(month)
    weather = validate_table(raw_weather.frame, TABLES["weather"], source=raw_weather.source,
                             partition=month)  # fmt: skip
    warehouse.write("flights", flights.valid, month)
    warehouse.write("weather", weather.valid, month)
    lap("ingest + validate")
    features = build_features(flights.valid, weather.valid, warehouse.read("planes"))
    features = features.filter(pl.col(LABEL).is_not_null())
    warehouse.write("flight_features", features, month)
    lap("features")
    champion = registry.load(before)
    booster = lgb.Booster(model_str=champion.model_text)
    importance = dict(zip(booster.feature_name(), booster.feature_importance("gain").tolist(),
                          strict=True))  # fmt: skip
    trained = champion.manifest["training"]["months"]
    reference = warehouse.read("flight_features", sorted({*trained["train"], *trained["valid"]}))
    kinds = {f.name: f.kind for f in FEATURES}
    drift = measure_drift(features, reference, kinds, importance, max_rows=20_000)
    drift.save_html(warehouse.report_dir("drift") / f"{month}.html")
    old_pre = Preprocessor.from_json(champion.preprocessor_json)
    month_matrix = Matrix.from_features(features, old_pre)
    binary_metrics(month_matrix.y, booster.predict(month_matrix.x), 0.5)
    lap("drift + performance")
    everything = warehouse.read("flight_features")
    split = split_months(everything.get_column("month_key").unique().to_list(), valid_months=1,
                         test_months=1)  # fmt: skip
    frame = assign_splits(everything, split)
    train = frame.filter(pl.col("split") == "train")
    preprocessor = Preprocessor.fit(train)
    lap("training set")
    valid = Matrix.from_features(frame.filter(pl.col("split") == "valid"), preprocessor)
    train_matrix = Matrix.from_features(train, preprocessor)
    # As the loop's run does: the champion's tuned parameters, or a search (MLOPS_RETRAIN_SEARCH).
    result = (
        fit_with_params(champion.manifest["params"], train_matrix, valid, SearchSettings())
        if r["retrain_policy"].reuse_champion_params
        else search(train_matrix, valid, SearchSettings())
    )
    binary_metrics(valid.y, result.booster.predict(valid.x), 0.5)
    # Then fit on train + valid, as challenger_model does.
    fitted = frame.filter(pl.col("split") != "test")
    fit_pre = Preprocessor.fit(fitted)
    defaults = SearchSettings()
    rounds, seed, threads = result.best_iteration, defaults.seed, defaults.num_threads
    challenger = fit(result.params, Matrix.from_features(fitted, fit_pre), rounds, seed=seed,
                     num_threads=threads)  # fmt: skip
    manifest = registry.register(
        challenger.model_to_string(), fit_pre.to_json(),
        {"params": {**BASE_PARAMS, **result.params}, "features": [f.name for f in FEATURES],
         "metrics": {"valid_auc": result.best_valid_auc},
         "training": {"months": {"train": split.train, "valid": split.valid,
                                 "test": split.test}}},
    )  # fmt: skip
    lap("train + register")
    test = frame.filter(pl.col("split") == "test")
    y = test.get_column(LABEL).cast(pl.Float64).to_numpy()
    challenger_p = challenger.predict(Matrix.from_features(test, fit_pre).x)
    champion_p = booster.predict(Matrix.from_features(test, old_pre).x)
    linear = LogisticRegression(C=1.0, max_iter=500, random_state=0, solver="newton-cholesky")
    linear.fit(fit_pre.transform_linear(fitted), fitted.get_column(LABEL).to_numpy())
    logistic_p = linear.predict_proba(fit_pre.transform_linear(test))[:, 1]
    threshold = best_f1_threshold(valid.y, result.booster.predict(valid.x))
    scores = {"challenger": challenger_p, "champion": champion_p, "logistic": logistic_p,
              "base_rate": np.full(len(y), float(fitted.get_column(LABEL).mean()))}  # fmt: skip
    metrics = {k: binary_metrics(y, p, threshold) for k, p in scores.items()}
    plot_curves([Scored(k, y, p) for k, p in scores.items()], "frozen set")
    plot_calibration_and_confusion(Scored("challenger", y, challenger_p), threshold, "frozen")
    verdict = decide(metrics["challenger"], metrics["champion"],
                     {"base_rate": metrics["base_rate"], "logistic": metrics["logistic"]},
                     GateRules(), newer_months=[month])  # fmt: skip
    lap("evaluation + gate")
    if verdict.passed:
        # As champion_model does: the same parameters and rounds refit on every landed month.
        all_pre = Preprocessor.fit(frame)
        refit = fit(result.params, Matrix.from_features(frame, all_pre), rounds, seed=seed,
                    num_threads=threads)  # fmt: skip
        refit.predict(Matrix.from_features(test, all_pre).x)
        of = {"refit_of": {"version": manifest["version"]}}
        manifest = registry.register(refit.model_to_string(), all_pre.to_json(), manifest | of)
        registry.promote(manifest["version"], verdict.reason)
        settings = serve_config(registry, warehouse, r["ray_serve"], r["prediction_log_files"])
        r["ray_serve"].ensure_connected()
        deploy(settings, manifest["version"])
    lap("promote + swap")
    steps["gate passed"] = float(verdict.passed)
    return steps


def restore(home: Path, snapshot: Path, before: str) -> None:
    """The state before the month landed, with the old champion back on serving."""
    from mlops_assets.serve.assets import serve_config
    from mlops_assets.serve.deployment import deploy
    from resources import default_resources

    for name in SNAPSHOT_DIRS:
        shutil.rmtree(home / name, ignore_errors=True)
        if (snapshot / name).exists():
            shutil.copytree(snapshot / name, home / name)
    r = default_resources()
    r["ray_serve"].ensure_connected()
    deploy(serve_config(r["registry"], r["warehouse"], r["ray_serve"],
                        r["prediction_log_files"]), before)  # fmt: skip


def cold_bare(month: str, before: str) -> float:
    """Seconds for the bare steps in a fresh process, from its start to its exit.

    Each Dagster run worker is such a process (it imports the code location and connects to
    Ray); the warm in-process figure leaves those costs out.
    """
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_loop", "--bare-process", "--month", month,
         "--before", before],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--month", default="2013-07")
    parser.add_argument("--keep", action="store_true", help="keep the temp folders")
    parser.add_argument("--bare-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_process:  # cold_bare's child: the environment points at the benchmark's home
        import ray

        bare(Path(os.environ["MLOPS_HOME"]), args.month, args.before)
        ray.shutdown()
        return
    root = Path(tempfile.mkdtemp(prefix="bench-loop-", dir=ROOT / ".mlops"))
    home, dagster_home = root / "mlops", root / "dagster"
    dagster_home.mkdir(parents=True)
    shutil.copyfile(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    port = free_port()
    os.environ.update({
        "MLOPS_HOME": str(home), "DAGSTER_HOME": str(dagster_home),
        "MLOPS_SERVE_PORT": str(port), "MLOPS_RETRAIN_COOLDOWN_SECONDS": "0",
    })  # fmt: skip
    for name in ("RAY_ADDRESS", "MLOPS_REFERENCE_DB_URL", "MLOPS_WEATHER_API_URL"):
        os.environ.pop(name, None)
    endpoint = f"http://127.0.0.1:{port}"
    from mlops_assets.serve.ray_runtime import stop_local_ray

    try:
        run = orchestrated(home, args.month, endpoint)
        restore(home, Path(run["snapshot"]), str(run["before"]))
        cold = cold_bare(args.month, str(run["before"]))
        restore(home, Path(run["snapshot"]), str(run["before"]))
        steps = bare(home, args.month, str(run["before"]))
    finally:
        import ray

        ray.shutdown()  # disconnect this driver before its head goes away
        stop_local_ray(home / "ray")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = sum(v for k, v in steps.items() if k != "gate passed")
    print(f"\nmonth {args.month}: champion {run['before']} -> served {run['after']}")
    print("\n| path | seconds |\n|---|---|")
    for name, seconds in steps.items():
        if name != "gate passed":
            print(f"| bare: {name} | {seconds:.2f} |")
    print(f"| **bare total** | **{total:.2f}** |")
    print(f"| **orchestrated: land → new model answers /predict** | **{run['seconds']:.2f}** |")
    print("\nwhere the orchestrated seconds went (after `land`):")
    for at, what in run["timeline"]:
        print(f"  {at:7.2f} s  {what}")
    print(f"| bare in a fresh process (imports and Ray connection included) | {cold:.2f} |")
    ratio = run["seconds"] / total if total else math.nan
    print(f"\nratio orchestrated / bare: {ratio:.2f}x against the warm process, "
          f"{run['seconds'] / cold:.2f}x against a fresh one (target ≤ 1.5x); "
          f"latency {run['seconds']:.1f} s (target ≤ 90 s)")  # fmt: skip


if __name__ == "__main__":
    main()
