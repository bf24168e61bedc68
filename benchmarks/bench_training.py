"""Training benchmarks: the Dagster asset vs a bare script, and LightGBM throughput at scale.

``overhead``: the ``challenger_model`` asset materialized with ``dg.materialize`` (A) against
a bare script doing the same work without Dagster (B): read the ``training_set`` Parquet,
``Preprocessor.from_json``, ``Matrix.from_features`` for train and valid, ``search`` with the
same ``SearchSettings``, ``model_to_string``, write the model to a file. Both run in one warm
process on the same warehouse (the six demo months of real flights, materialized up to
``training_set`` by the pipeline itself), alternating A, B, A, B, ... Reports medians, the
ratio A/B, where A's fixed cost goes (from the run's event log timestamps and the asset's
extra steps timed on their own) and whether A and B give the same model bytes.

``throughput``: for each scale-data folder, in a fresh child process (peak RSS from
``os.wait4``, address space capped with ``RLIMIT_AS``): ``feature_frame`` on the monthly
Parquet files, labelled rows only, ``Preprocessor.fit``, ``Matrix.from_features``, then
``fit(params, matrix, rounds=100, seed=13, num_threads=2)`` with fixed parameters.

    python -m benchmarks.bench_training overhead --json .mlops/bench/training_overhead.json
    python -m benchmarks.bench_training throughput --data .mlops/scale/1m --data .mlops/scale/10m
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO / ".mlops" / "bench" / "training"
DEMO_MONTHS = [f"2013-0{m}" for m in range(1, 7)]
TARGET_RATIO = 1.1
RESULT_PREFIX = "@@result "
PHASE_PREFIX = "@@phase "
FIXED_PARAMS: dict[str, Any] = {"learning_rate": 0.1, "num_leaves": 63}
MIB = 1024**2
# B imports nothing that imports Dagster; run_overhead checks this equals the asset's name.
BARE_PREPROCESSOR_FILE = "preprocessor.json"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str, width: int = 0) -> str:
    return format("-" if value is None else format(value, spec), f">{width}")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_for_idle(max_busy: float, timeout: float, window: float = 2.0) -> float:
    """Sleep until the other processes on the machine use < ``max_busy`` cores (measured over
    ``window`` s while this process is idle), or ``timeout`` s pass; returns the last
    measurement. The machine is shared: this keeps timed runs away from others' busy spells
    (it cannot stop one starting during a run)."""
    deadline = time.monotonic() + timeout
    cpus = os.cpu_count() or 1
    while True:
        busy0, total0 = _cpu_ticks()
        time.sleep(window)
        busy1, total1 = _cpu_ticks()
        used = cpus * (busy1 - busy0) / max(1, total1 - total0)
        if used < max_busy or time.monotonic() >= deadline:
            return used


# =========================================================================== overhead


@contextlib.contextmanager
def _mlops_home(home: Path) -> Iterator[None]:
    old = os.environ.get("MLOPS_HOME")
    os.environ["MLOPS_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLOPS_HOME", None)
        else:
            os.environ["MLOPS_HOME"] = old


@contextlib.contextmanager
def _stderr_to(log: Any) -> Iterator[None]:
    """Send Dagster's console log (written to ``sys.stderr`` during a run) to a file."""
    with contextlib.redirect_stderr(log):
        yield


def prepare_home(home: Path, rebuild: bool, log: Any) -> None:
    """Land the six demo months and materialize the pipeline up to ``training_set``, once."""
    import dagster as dg

    from mlops_assets.definitions import defs
    from resources import default_resources
    from resources.files import land_month

    done = home / "PREPARED"
    if done.exists() and not rebuild:
        print(f"reusing the prepared warehouse in {home} (--rebuild to start over)")
        return
    if home.exists():
        shutil.rmtree(home)
    dagster_home = home / "dagster_home"
    dagster_home.mkdir(parents=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    started = time.perf_counter()
    assets = list(defs.assets)
    with _mlops_home(home / "mlops"), _stderr_to(log):
        for month in DEMO_MONTHS:
            land_month(month, home / "mlops" / "landing")
        resources = default_resources()
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        reference = ["raw_planes", "planes", "raw_airlines", "airlines"]
        result = dg.materialize(assets, selection=reference, resources=resources, instance=instance)
        assert result.success
        for month in DEMO_MONTHS:
            result = dg.materialize(
                assets,
                selection=["raw_flights", "raw_weather", "flights", "weather", "flight_features"],
                partition_key=month,
                resources=resources,
                instance=instance,
            )
            assert result.success, month
        result = dg.materialize(
            assets, selection=["training_set"], resources=resources, instance=instance
        )
        assert result.success
    done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    print(f"prepared {home} in {time.perf_counter() - started:.1f} s")


def bare_train(warehouse_root: Path, n_trials: int, out: Path) -> dict[str, Any]:
    """(B) The asset's training work with no Dagster: same inputs, settings and model bytes."""
    import polars as pl

    from mlops_assets.features.preprocess import Preprocessor
    from mlops_assets.train.model import Matrix, SearchSettings, fit, search

    started = time.perf_counter()
    table = warehouse_root / "training_set"
    frame = pl.read_parquet(table / "all.parquet")
    preprocessor = Preprocessor.from_json((table / BARE_PREPROCESSOR_FILE).read_text())
    train = Matrix.from_features(frame.filter(pl.col("split") == "train"), preprocessor)
    valid = Matrix.from_features(frame.filter(pl.col("split") == "valid"), preprocessor)
    result = search(train, valid, SearchSettings(n_trials=n_trials, seed=13, num_threads=2))
    # As challenger_model: the choice fit on train + valid, with that split's own preprocessing.
    fit_frame = pl.concat([frame.filter(pl.col("split") == s) for s in ("train", "valid")])
    booster = fit(result.params, Matrix.from_features(fit_frame, Preprocessor.fit(fit_frame)),
                  result.best_iteration, seed=13, num_threads=2)  # fmt: skip
    text = booster.model_to_string()
    out.write_text(text)
    return {
        "seconds": time.perf_counter() - started,
        "search_seconds": result.seconds,
        "sha256": _sha256(text),
        "trials": result.trials.height,
    }


def _run_phases(
    instance: Any, run_id: str, called: float, returned: float, search_seconds: float
) -> dict[str, float] | None:
    """Split one materialize call by its event log timestamps (seconds per phase)."""
    marks: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        kind = entry.dagster_event_type.value if entry.dagster_event_type else None
        if kind and kind not in marks:
            marks[kind] = entry.timestamp
        elif kind is None and "registered m" in (entry.user_message or ""):
            marks.setdefault("REGISTERED", entry.timestamp)
    order = ["PIPELINE_START", "STEP_START", "REGISTERED", "ASSET_MATERIALIZATION"]
    order += ["STEP_SUCCESS", "PIPELINE_SUCCESS"]
    if any(k not in marks for k in order):
        return None
    body = marks["REGISTERED"] - marks["STEP_START"]
    return {
        "call -> run start (job build, run record)": marks["PIPELINE_START"] - called,
        "run start -> step start (resources, plan)": marks["STEP_START"] - marks["PIPELINE_START"],
        "step start -> registered (asset body: read, search, register)": marks["REGISTERED"]
        - marks["STEP_START"],
        "  of which search() (search_seconds)": search_seconds,
        "  of which the rest (read, matrices, lineage queries, register)": body - search_seconds,
        "registered -> materialization (plot, metadata)": marks["ASSET_MATERIALIZATION"]
        - marks["REGISTERED"],
        "materialization -> step success (event writes)": marks["STEP_SUCCESS"]
        - marks["ASSET_MATERIALIZATION"],
        "step success -> run success": marks["PIPELINE_SUCCESS"] - marks["STEP_SUCCESS"],
        "run success -> call returns": returned - marks["PIPELINE_SUCCESS"],
    }


def _lineage_found(registry: Any, version: str) -> bool:
    """Did the asset find the feature partitions' data versions on this instance?"""
    partitions = registry.manifest(version)["training"]["partitions"]
    return bool(partitions) and all(p["data_version"] for p in partitions)


def asset_extras(home: Path, instance: Any, repeats: int) -> dict[str, float]:
    """Time, on their own, the steps the asset does beyond B (median seconds of ``repeats``)."""
    import dagster as dg
    import lightgbm as lgb
    import polars as pl

    from mlops_assets.features.preprocess import Preprocessor
    from mlops_assets.metadata import latest_materialization, markdown_table
    from mlops_assets.train.model import Matrix
    from mlops_assets.version import code_version
    from resources.registry import ModelRegistryResource

    registry = ModelRegistryResource(root=str(home / "extras_registry"))
    registry_dir = Path(registry.root)
    versions = [
        Path(p) for p in sorted((home / "mlops" / "registry" / "models").glob("m*/model.txt"))
    ]
    model_text = versions[-1].read_text()  # the last model A registered
    table = home / "mlops" / "warehouse" / "training_set"
    preprocessor_json = (table / "preprocessor.json").read_text()
    trials = pl.DataFrame(
        {
            "trial": list(range(8)),
            "state": ["COMPLETE"] * 6 + ["PRUNED"] * 2,
            "valid_auc": [0.70 + i / 100 for i in range(8)],
            "rounds": [100] * 8,
        }
    )
    frame = pl.read_parquet(table / "all.parquet")
    valid = Matrix.from_features(
        frame.filter(pl.col("split") == "valid"), Preprocessor.from_json(preprocessor_json)
    )
    booster = lgb.Booster(model_str=model_text)

    def validation_metrics() -> None:
        from mlops_assets.evaluate.metrics import binary_metrics

        binary_metrics(valid.y, booster.predict(valid.x), threshold=0.5)

    def partition_versions() -> None:
        key = dg.AssetKey("flight_features")
        for month in DEMO_MONTHS[:5]:
            latest_materialization(instance, key, month)
        latest_materialization(instance, dg.AssetKey("training_set"))

    def split_and_months() -> None:
        splits = {s: frame.filter(pl.col("split") == s) for s in ("train", "valid", "test")}
        {s: sorted(f.get_column("month_key").unique().to_list()) for s, f in splits.items()}

    steps: dict[str, Callable[[], object]] = {
        "registry.register (3 atomic files, lock)": lambda: registry.register(
            model_text, preprocessor_json, {"params": {}}
        ),
        "validation predict + binary_metrics (manifest metrics)": validation_metrics,
        "partition data versions (6 instance queries)": partition_versions,
        "markdown tables (params, trials)": lambda: (markdown_table(trials, 50),),
        "splits + months (test split too)": split_and_months,
        "code_version (cached)": code_version,
    }
    out: dict[str, float] = {}
    for name, step in steps.items():
        step()  # warm
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        out[name] = statistics.median(times)
    shutil.rmtree(registry_dir, ignore_errors=True)
    return out


def run_overhead(args: argparse.Namespace) -> dict[str, Any]:
    home: Path = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    log_path = home.parent / "training_dagster.log"
    print(f"Dagster's console log goes to {log_path}")
    with open(log_path, "w") as log:
        prepare_home(home, args.rebuild, log)
        started = time.perf_counter()
        import dagster as dg
        import lightgbm
        import optuna

        from mlops_assets.definitions import defs
        from mlops_assets.features.assets import PREPROCESSOR_FILE
        from resources import default_resources

        assert PREPROCESSOR_FILE == BARE_PREPROCESSOR_FILE
        import_seconds = time.perf_counter() - started
        bare_dir = home / "bare_models"
        shutil.rmtree(bare_dir, ignore_errors=True)
        shutil.rmtree(home / "mlops" / "registry", ignore_errors=True)
        bare_dir.mkdir()
        assets = list(defs.assets)
        with _mlops_home(home / "mlops"):
            resources = default_resources()
        warehouse_root = Path(resources["warehouse"].root)
        instance = dg.DagsterInstance.from_config(str(home / "dagster_home"))
        # The same run/event storage, but no compute log capture: Dagster's default local
        # compute log manager starts `tail -F` and a Python watcher process per captured
        # stream (stdout and stderr) for every step.
        no_capture_home = home / "dagster_home_no_capture"
        no_capture_home.mkdir(exist_ok=True)
        (no_capture_home / "dagster.yaml").write_text(
            "telemetry:\n  enabled: false\n"
            f"storage:\n  sqlite:\n    base_dir: {home / 'dagster_home'}\n"
            "compute_logs:\n  module: dagster._core.storage.noop_compute_log_manager\n"
            "  class: NoOpComputeLogManager\n"
        )
        no_capture = dg.DagsterInstance.from_config(str(no_capture_home))
        print(
            f"dagster {dg.__version__}, lightgbm {lightgbm.__version__}, optuna "
            f"{optuna.__version__}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.2f}; warehouse {warehouse_root}"
        )

        def asset_run(n_trials: int, on: Any = instance) -> dict[str, Any]:
            gc.collect()
            others = wait_for_idle(args.max_busy, args.idle_timeout)
            called_wall = time.time()
            started = time.perf_counter()
            with _stderr_to(log):
                result = dg.materialize(
                    assets,
                    selection=["challenger_model"],
                    resources=resources,
                    instance=on,
                    run_config={"ops": {"challenger_model": {"config": {"n_trials": n_trials}}}},
                )
            seconds = time.perf_counter() - started
            returned_wall = called_wall + seconds
            assert result.success
            event = next(
                e
                for e in result.get_asset_materialization_events()
                if e.asset_key == dg.AssetKey("challenger_model")
            )
            meta = {k: v.value for k, v in event.materialization.metadata.items()}
            search_seconds = float(meta["search_seconds"])
            return {
                "seconds": seconds,
                "search_seconds": search_seconds,
                "sha256": meta["sha256"],
                "trials": meta["trials"],
                "lineage_found": _lineage_found(resources["registry"], meta["version"]),
                "others_busy_cores": others,
                "phases": _run_phases(
                    on, result.run_id, called_wall, returned_wall, search_seconds
                ),
            }

        def bare_run(n_trials: int, index: int) -> dict[str, Any]:
            gc.collect()
            others = wait_for_idle(args.max_busy, args.idle_timeout)
            out = bare_dir / f"model_{n_trials}_{index}.txt"
            return {**bare_train(warehouse_root, n_trials, out), "others_busy_cores": others}

        # Warm: imports are done; one materialize and one bare run (first-call costs: the
        # job build caches, matplotlib's first figure, LightGBM/Optuna first use, file cache).
        warm = min(args.trials)
        started = time.perf_counter()
        asset_run(warm)
        first_asset = time.perf_counter() - started
        bare_run(warm, -1)
        print(
            f"warm-up: imports {import_seconds:.2f} s (after the setup's), first materialize "
            f"{first_asset:.2f} s (n_trials={warm})"
        )

        configs: list[dict[str, Any]] = []
        for n_trials in args.trials:
            runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
            for i in range(args.repeats):
                for path in ("A", "B"):
                    r = asset_run(n_trials) if path == "A" else bare_run(n_trials, i)
                    r["load_average"] = os.getloadavg()[0]
                    runs[path].append(r)
                    print(
                        f"  n_trials={n_trials} run {i + 1} {path}: {r['seconds']:6.2f} s "
                        f"(search {r['search_seconds']:6.2f} s, other "
                        f"{r['seconds'] - r['search_seconds']:5.2f} s) sha256 {r['sha256'][:12]} "
                        f"load {r['load_average']:.2f}, others busy before "
                        f"{r['others_busy_cores']:.2f} cores",
                        flush=True,
                    )
            configs.append(summarize_config(n_trials, runs))
        # A's fixed cost: the smallest search, A with and without compute log capture, and B.
        fixed_runs: dict[str, list[dict[str, Any]]] = {"A": [], "A, no log capture": [], "B": []}
        for i in range(args.repeats):
            for path in fixed_runs:
                if path == "B":
                    r = bare_run(args.fixed_trials, 100 + i)
                else:
                    r = asset_run(args.fixed_trials, instance if path == "A" else no_capture)
                r["load_average"] = os.getloadavg()[0]
                fixed_runs[path].append(r)
                print(
                    f"  fixed cost, n_trials={args.fixed_trials} run {i + 1} {path:<17}: "
                    f"{r['seconds']:5.2f} s (search {r['search_seconds']:5.2f} s, other "
                    f"{r['seconds'] - r['search_seconds']:5.2f} s) load {r['load_average']:.2f}, "
                    f"others busy before {r['others_busy_cores']:.2f} cores",
                    flush=True,
                )
        fixed = {
            path: {
                "seconds": _median([r["seconds"] for r in rs]),
                "search_seconds": _median([r["search_seconds"] for r in rs]),
                "other_seconds": _median([r["seconds"] - r["search_seconds"] for r in rs]),
                "lineage_found": all(r.get("lineage_found", True) for r in rs),
                "runs": rs,
            }
            for path, rs in fixed_runs.items()
        }
        extras = asset_extras(home, instance, args.extras_repeats)
    return {
        "load_average_end": os.getloadavg(),
        "import_seconds": import_seconds,
        "first_materialize_seconds": first_asset,
        "configs": configs,
        "fixed_trials": args.fixed_trials,
        "fixed": fixed,
        "extras": extras,
    }


def summarize_config(n_trials: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    a = _median([r["seconds"] for r in runs["A"]])
    b = _median([r["seconds"] for r in runs["B"]])
    a_search = _median([r["search_seconds"] for r in runs["A"]])
    b_search = _median([r["search_seconds"] for r in runs["B"]])
    hashes = {path: sorted({r["sha256"] for r in rs}) for path, rs in runs.items()}
    phases = [r["phases"] for r in runs["A"] if r["phases"]]
    # The search is the same work on both paths (same model bytes), yet on a shared 2-core
    # machine its time swings with other load by far more than A's fixed cost. So also: the
    # median of the A_i/B_i pairs, the ratio of the fastest runs, and the ratio that the
    # stable non-search parts give around the fastest (least disturbed) search of all runs.
    pairs = zip(runs["A"], runs["B"], strict=True)
    paired = _median([x["seconds"] / y["seconds"] for x, y in pairs])
    search_all = min(r["search_seconds"] for rs in runs.values() for r in rs)
    searches = sorted(r["search_seconds"] for rs in runs.values() for r in rs)
    a_other = _median([r["seconds"] - r["search_seconds"] for r in runs["A"]])
    b_other = _median([r["seconds"] - r["search_seconds"] for r in runs["B"]])
    assert search_all is not None and a_other is not None and b_other is not None
    return {
        "n_trials": n_trials,
        "a_seconds": a,
        "b_seconds": b,
        "a_search_seconds": a_search,
        "b_search_seconds": b_search,
        "a_other_seconds": a_other,
        "b_other_seconds": b_other,
        "ratio": a / b if a and b else None,
        "paired_ratio": paired,
        "min_ratio": min(r["seconds"] for r in runs["A"]) / min(r["seconds"] for r in runs["B"]),
        "fastest_search_seconds": search_all,
        "search_range": [searches[0], searches[-1]],
        "fixed_cost_ratio": (search_all + a_other) / (search_all + b_other),
        "same_model": len(hashes["A"]) == 1 and hashes["A"] == hashes["B"],
        "sha256": hashes,
        "phases": {k: statistics.median(p[k] for p in phases) for k in phases[0]} if phases else {},
        "runs": runs,
    }


def print_overhead(report: dict[str, Any]) -> None:
    head = (
        f"{'n_trials':>8} {'A s':>6} {'B s':>6} {'A/B':>6} {'paired':>6} {'min':>6} {'fixed':>6} "
        f"{'A search':>8} {'B search':>8} {'A other':>7} {'B other':>7} {'same model':>10}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for c in report["configs"]:
        print(
            f"{c['n_trials']:>8} {c['a_seconds']:6.2f} {c['b_seconds']:6.2f} "
            f"{c['ratio']:5.2f}x {c['paired_ratio']:5.2f}x {c['min_ratio']:5.2f}x "
            f"{c['fixed_cost_ratio']:5.2f}x "
            f"{c['a_search_seconds']:8.2f} {c['b_search_seconds']:8.2f} "
            f"{c['a_other_seconds']:7.2f} {c['b_other_seconds']:7.2f} "
            f"{'yes' if c['same_model'] else 'NO':>10}"
        )
    print(
        "A: dg.materialize(challenger_model) wall s; B: bare script wall s; A/B: ratio of the "
        "medians; paired: median of A_i/B_i; min: fastest A / fastest B; fixed: (S + A other)"
        "/(S + B other), S = the fastest search of all runs; search: search() s (A: the "
        "asset's search_seconds metadata); other: wall - search; A s, B s, search, other: "
        "medians; same model: one sha256 across all A and B runs"
    )
    for c in report["configs"]:
        low, high = c["search_range"]
        print(
            f"  n_trials={c['n_trials']}: search() took {low:.2f}..{high:.2f} s over the runs; "
            f"sha256 A {c['sha256']['A']} B {c['sha256']['B']}"
        )
    for c in report["configs"]:
        verdicts = [
            f"{name} {c[key]:.2f}x {'PASS' if c[key] <= TARGET_RATIO else 'FAIL'}"
            for name, key in [("A/B", "ratio"), ("paired", "paired_ratio"),
                              ("min", "min_ratio"), ("fixed", "fixed_cost_ratio")]
        ]  # fmt: skip
        print(f"target A/B <= {TARGET_RATIO}x at n_trials={c['n_trials']}: " + ", ".join(verdicts))
    fixed = [c["a_other_seconds"] - c["b_other_seconds"] for c in report["configs"]]
    needed = [
        (c["a_other_seconds"] - TARGET_RATIO * c["b_other_seconds"]) / (TARGET_RATIO - 1)
        for c in report["configs"]
    ]
    print(
        f"A's fixed cost over B: {', '.join(f'{x:.2f}' for x in fixed)} s; the search must "
        f"take >= {max(needed):.1f} s for A/B <= {TARGET_RATIO}x"
    )

    print(
        f"\nA's fixed cost (n_trials={report['fixed_trials']}, medians of the runs; other = wall"
        " - search):"
    )
    b_other = report["fixed"]["B"]["other_seconds"]
    for path, f in report["fixed"].items():
        over = f"{f['other_seconds'] - b_other:+.2f} s vs B" if path != "B" else ""
        print(
            f"  {path:<19} wall {f['seconds']:5.2f} s  search {f['search_seconds']:5.2f} s  "
            f"other {f['other_seconds']:5.2f} s  {over}"
        )

    configs = [c for c in report["configs"] if c["phases"]]
    if configs:
        print("\nwhere A's time goes (median of the A runs, from the run's event log), s:")
        print(f"  {'n_trials':<66}" + "".join(f"{c['n_trials']:>8}" for c in configs))
        for name in configs[0]["phases"]:
            print(f"  {name:<66}" + "".join(f"{c['phases'][name]:8.3f}" for c in configs))
    print("\nthe asset's steps that B does not do, timed on their own (median):")
    for name, seconds in report["extras"].items():
        print(f"  {name:<66}{seconds:8.3f} s")


# =========================================================================== throughput


def _proc_status_mib(field: str) -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith(field + ":")), None)
    return int(line.split()[1]) / 1024 if line else None


class RssSampler:
    """Samples this process's RSS every ``interval`` s in a thread: the peak inside each phase
    (VmHWM only says what the peak so far is, and resetting it would also reset ru_maxrss)."""

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.interval = interval
        self.page_mib = os.sysconf("SC_PAGE_SIZE") / MIB
        self.phase_peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page_mib

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.phase_peak = max(self.phase_peak, self.read())

    def take_phase_peak(self) -> float:
        """The peak since the last call (sampled), and start a new phase at the current RSS."""
        peak = max(self.phase_peak, self.read())
        self.phase_peak = self.read()
        return peak


SAMPLER: RssSampler | None = None


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _phase(name: str, **extra: Any) -> dict[str, Any]:
    """Announce a finished phase (the parent keeps the last one if the child dies)."""
    mark = {
        "phase": name,
        "cpu_seconds": _cpu_seconds(),
        "load_average": os.getloadavg()[0],
        "rss_mib": _proc_status_mib("VmRSS"),
        "phase_peak_mib": SAMPLER.take_phase_peak() if SAMPLER else None,
        "hwm_mib": _proc_status_mib("VmHWM"),
        "vm_peak_mib": _proc_status_mib("VmPeak"),
        **extra,
    }
    print(PHASE_PREFIX + json.dumps(mark), flush=True)
    return mark


def throughput_child(data: Path, rounds: int, threads: int, seed: int) -> dict[str, Any]:
    import lightgbm as lgb
    import polars as pl

    from mlops_assets.features.preprocess import Preprocessor
    from mlops_assets.features.transform import LABEL, feature_frame
    from mlops_assets.train.model import Matrix, dataset, fit

    global SAMPLER
    SAMPLER = RssSampler()
    out: dict[str, Any] = {"phases": [_phase("imports")]}
    started = time.perf_counter()
    features = feature_frame(
        pl.scan_parquet(sorted((data / "flights").glob("*.parquet"))),
        pl.scan_parquet(sorted((data / "weather").glob("*.parquet"))),
        pl.scan_parquet(data / "planes.parquet"),
    ).collect()
    all_rows = features.height
    features = features.filter(pl.col(LABEL).is_not_null())
    out["feature_seconds"] = time.perf_counter() - started
    out.update(flights=all_rows, rows=features.height)
    out["phases"].append(
        _phase("features", frame_mib=features.estimated_size() / MIB, rows=features.height)
    )

    started = time.perf_counter()
    preprocessor = Preprocessor.fit(features)
    out["preprocess_fit_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    matrix = Matrix.from_features(features, preprocessor)
    out["matrix_seconds"] = time.perf_counter() - started
    transformed_mib = preprocessor.transform(features.head(100_000)).estimated_size() / MIB
    out["phases"].append(
        _phase(
            "matrix",
            x_mib=matrix.x.nbytes / MIB,
            x_dtype=str(matrix.x.dtype),
            x_shape=list(matrix.x.shape),
            transformed_mib=transformed_mib * features.height / 100_000,
        )
    )

    # The Dataset on its own (binning), then fit() as specified: Dataset + 100 rounds.
    started = time.perf_counter()
    binned = dataset(matrix).construct()
    out["dataset_seconds"] = time.perf_counter() - started
    del binned
    gc.collect()
    out["phases"].append(_phase("dataset"))
    started, cpu = time.perf_counter(), _cpu_seconds()
    booster = fit(FIXED_PARAMS, matrix, rounds, seed=seed, num_threads=threads)
    out["fit_seconds"] = time.perf_counter() - started
    out["fit_cpu_seconds"] = _cpu_seconds() - cpu
    out["trees"] = booster.num_trees()
    out["lightgbm"] = lgb.__version__
    out["phases"].append(_phase("fit"))
    return out


def throughput_child_main(args: argparse.Namespace) -> None:
    limit = int(args.mem_limit_gib * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = throughput_child(args.data[0], args.rounds, args.threads, args.seed)
        result["status"] = "ok"
    except MemoryError as exc:
        result = {"status": f"MemoryError under RLIMIT_AS={args.mem_limit_gib} GiB: {exc}"[:300]}
    except Exception as exc:  # LightGBM/polars allocation failures vary
        result = {"status": f"{type(exc).__name__}: {exc}"[:300]}
    result["self_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["vm_peak_mib"] = _proc_status_mib("VmPeak")
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def spawn_throughput(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_training",
        "throughput",
        "--child",
        "--data",
        str(data),
        "--rounds",
        str(args.rounds),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--mem-limit-gib",
        str(args.mem_limit_gib),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    result: dict[str, Any] | None = None
    phases: list[dict[str, Any]] = []
    for line in proc.stdout:
        if line.startswith(PHASE_PREFIX):
            phase = json.loads(line[len(PHASE_PREFIX) :])
            phases.append(phase)
            print(
                f"    {phase['phase']:<9} done at {time.perf_counter() - started:6.1f} s: RSS "
                f"{phase['rss_mib']:7.0f} MiB, peak in phase {phase['phase_peak_mib']:7.0f} MiB"
                f" (sampled), peak so far {phase['hwm_mib']:7.0f} MiB",
                flush=True,
            )
        elif line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if result is None:
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = phases[-1]["phase"] if phases else "start"
        result = {"status": f"crashed after phase {last!r} ({why})", "phases": phases}
    result["data"] = str(data)
    result["peak_mib"] = usage.ru_maxrss / 1024
    result["process_seconds"] = time.perf_counter() - started
    return result


def run_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    # The parent imports no polars/LightGBM: a child's ru_maxrss starts from its parent's RSS.
    print(
        f"{os.cpu_count()} CPUs, {args.threads} LightGBM threads, {args.rounds} rounds, params "
        f"{FIXED_PARAMS}, child RLIMIT_AS {args.mem_limit_gib} GiB, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    results = []
    for data in args.data:
        others = wait_for_idle(args.max_busy, args.idle_timeout)
        print(f"  {data} (others busy before: {others:.2f} cores):", flush=True)
        result = spawn_throughput(data.resolve(), args)
        results.append({**result, "others_busy_cores": others})
    return results


def print_throughput(results: list[dict[str, Any]], rounds: int) -> None:
    head = (
        f"{'rows':>11} {'features s':>10} {'matrix s':>8} {'Dataset s':>9} "
        f"{'Dataset+train s':>15} {'CPU s':>6} {'rows/s':>9} {'rounds':>6} {'x MiB':>6} "
        f"{'peak MiB':>8} {'load':>5} {'status':>6}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        phases = {p["phase"]: p for p in r.get("phases", [])}
        x_mib = phases.get("matrix", {}).get("x_mib")
        fit_s = r.get("fit_seconds")
        rows = r.get("rows")
        print(
            f"{_fmt(rows, ',', 11)} {_fmt(r.get('feature_seconds'), '.2f', 10)} "
            f"{_fmt(r.get('matrix_seconds'), '.2f', 8)} {_fmt(r.get('dataset_seconds'), '.2f', 9)} "
            f"{_fmt(fit_s, '.2f', 15)} {_fmt(r.get('fit_cpu_seconds'), '.1f', 6)} "
            f"{_fmt(rows / fit_s if rows and fit_s else None, ',.0f', 9)} "
            f"{rounds:>6} {_fmt(x_mib, '.0f', 6)} {r['peak_mib']:8.0f} "
            f"{_fmt(_median([p['load_average'] for p in r.get('phases', [])]), '.1f', 5)} "
            f"{'ok' if r['status'] == 'ok' else 'FAILED':>6}"
        )
    print(
        "rows: labelled flights; features s: feature_frame collect + label filter; matrix s: "
        "Matrix.from_features; Dataset s: dataset().construct() alone (binning); "
        "Dataset+train s: fit() (Dataset + rounds), wall; CPU s: its process CPU time (2 "
        "threads: ~2x wall when the cores are free); rows/s: rows / (Dataset+train s); "
        "x MiB: the float64 matrix; peak MiB: child's ru_maxrss; load: 1-min load average "
        "during the child (median at phase ends)"
    )
    for r in results:
        if r["status"] != "ok":
            print(f"  {r['data']}: {r['status']} (peak {r['peak_mib']:.0f} MiB)")
        print(f"  {r['data']}: RSS by phase, MiB (peak inside the phase, sampled / at its end):")
        for p in r.get("phases", []):
            extra = ""
            if p["phase"] == "features":
                extra = f"; feature frame {p['frame_mib']:.0f} MiB ({p['rows']:,} rows)"
            elif p["phase"] == "matrix":
                extra = (
                    f"; x {p['x_mib']:.0f} MiB {p['x_dtype']} {p['x_shape']}, transformed "
                    f"polars frame ~{p['transformed_mib']:.0f} MiB"
                )
            print(
                f"    {p['phase']:<9} peak {_fmt(p.get('phase_peak_mib'), '.0f', 6)} / end "
                f"{p['rss_mib']:6.0f}{extra}"
            )
        print(f"    virtual memory peak {_fmt(r.get('vm_peak_mib'), '.0f')} MiB")


# =========================================================================== CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overhead", help="the Dagster asset (A) vs a bare script (B)")
    over.add_argument("--trials", type=int, nargs="+", default=[8, 2], help="n_trials values")
    over.add_argument("--repeats", type=int, default=3, help="A/B pairs per n_trials")
    over.add_argument("--fixed-trials", type=int, default=1, help="n_trials for fixed cost")
    over.add_argument("--extras-repeats", type=int, default=5, help="runs per extra step")
    over.add_argument("--home", type=Path, default=DEFAULT_HOME, help="prepared MLOPS/DAGSTER")
    over.add_argument("--rebuild", action="store_true", help="prepare the warehouse again")
    over.add_argument("--json", type=Path, help="also write the results here")
    thr = sub.add_parser("throughput", help="feature build + fit at scale, peak memory")
    thr.add_argument("--data", type=Path, action="append", required=True, help="scale_data dir")
    thr.add_argument("--rounds", type=int, default=100)
    thr.add_argument("--threads", type=int, default=2)
    thr.add_argument("--seed", type=int, default=13)
    thr.add_argument("--mem-limit-gib", type=float, default=16.0, help="child RLIMIT_AS")
    thr.add_argument("--json", type=Path, help="also write the results here")
    thr.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for command in (over, thr):
        command.add_argument(
            "--max-busy",
            type=float,
            default=0.3,
            help="before each timed run, wait until other processes use fewer cores than this",
        )
        command.add_argument(
            "--idle-timeout", type=float, default=90.0, help="wait at most this long (s)"
        )
    args = parser.parse_args(argv)

    if args.command == "throughput" and args.child:
        throughput_child_main(args)
        return
    if args.command == "overhead":
        report: Any = run_overhead(args)
        print_overhead(report)
    else:
        report = run_throughput(args)
        print_throughput(report, args.rounds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
