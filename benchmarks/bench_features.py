"""Feature step at scale: the project's polars pipeline vs the same features in pandas.

For each ``--data`` folder (written by :mod:`benchmarks.scale_data`):

(a) ``feature_frame`` on lazy scans of the monthly Parquet files, collected;
(b) a straightforward pandas implementation of exactly the same features (below);
(c) ``validate_table`` on the same flights (typed input, already in memory) and, for scale,
    ``feature_frame`` on the in-memory frames.

Every measurement runs in a fresh child process (``--impl``), so its peak RSS is its own: the
parent reads it from ``os.wait4`` (``ru_maxrss``). Children alternate (polars, pandas, polars,
pandas, ...) and the table shows medians. Each child caps its address space
(``RLIMIT_AS``, ``--mem-limit-gib``) so a run that would not fit fails on its own instead of
taking the machine down; the failure is reported. The outputs must agree before the times
mean anything: every full-size run reports per-column fingerprints (row count, nulls, sums)
that must match across implementations, and a ``verify`` child compares both outputs row by
row on a few sample months (DST months included).

    python -m benchmarks.bench_features --data .mlops/scale/1m --data .mlops/scale/10m
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "@@result "
TARGET_RATIO = 5.0
TARGET_PEAK_MIB = 8 * 1024
TARGET_ROWS = 10_000_000
FLOAT_RTOL = 1e-9


# --------------------------------------------------------------------------- inputs


def data_files(data: Path, months: list[str] | None = None) -> tuple[list[Path], list[Path], Path]:
    """Monthly flights and weather files (all, or only ``months``), and the planes file."""
    flights = sorted((data / "flights").glob("*.parquet"))
    weather = sorted((data / "weather").glob("*.parquet"))
    if months is not None:
        flights = [p for p in flights if p.stem in months]
        weather = [p for p in weather if p.stem in months]
    if not flights or not weather:
        raise SystemExit(f"no flights/weather Parquet under {data}: run benchmarks.scale_data")
    return flights, weather, data / "planes.parquet"


def sample_months(data: Path, count: int) -> list[str]:
    """Spring-forward and fall-back months, a summer of the last year, the last month."""
    stems = [p.stem for p in sorted((data / "flights").glob("*.parquet"))]
    first, last = stems[0][:4], stems[-1][:4]
    picks = [f"{first}-03", f"{first}-11", f"{last}-07", stems[-1], stems[0]]
    return list(dict.fromkeys(m for m in picks if m in stems))[:count]


# --------------------------------------------------------------------------- implementations


def polars_features(flights: list[Path], weather: list[Path], planes: Path) -> Any:
    """(a) The project's pipeline: lazy scans in, one collect out."""
    import polars as pl

    from mlops_assets.features.transform import feature_frame

    return feature_frame(
        pl.scan_parquet(flights), pl.scan_parquet(weather), pl.scan_parquet(planes)
    ).collect()


def pandas_features(
    flights: list[Path], weather: list[Path], planes: Path, stages: dict[str, float] | None = None
) -> Any:
    """(b) The same features in plain pandas (numpy dtypes, read only the columns needed)."""
    from zoneinfo import ZoneInfo

    import numpy as np
    import pandas as pd

    from mlops_assets.features.transform import (
        BOOKING_COLUMNS,
        DELAY_THRESHOLD_MINUTES,
        LABEL,
        ORIGIN_TIME_ZONE,
        WEATHER_FIELDS,
        WEATHER_HISTORY_FIELDS,
    )

    stages = {} if stages is None else stages
    mark = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now

    df = pd.read_parquet(flights, columns=[*BOOKING_COLUMNS, "arr_delay"])
    wx = pd.read_parquet(weather, columns=["origin", "time_hour", *WEATHER_FIELDS])
    registry = pd.read_parquet(planes, columns=["tailnum", "year", "seats", "engines"])
    stage("read")

    dep_hour = df["sched_dep_time"] // 100
    df["flight_date"] = pd.to_datetime(df[["year", "month", "day"]])
    local = df["flight_date"] + pd.to_timedelta(dep_hour, unit="h")
    # A ZoneInfo, not the string: pandas 2 turns a string into a pytz zone, whose rules stop
    # in 2037 (no daylight time after it; the 10M data runs to 2043). pandas localizes a
    # ZoneInfo element by element (~10 us each: 104 s at 10M rows), so localize the distinct
    # local hours and map back. ambiguous=True: the daylight-time (first) instant of a doubled
    # hour, i.e. polars' "earliest".
    codes, hours = pd.factorize(local)
    utc = (
        pd.Series(hours)
        .dt.tz_localize(
            ZoneInfo(ORIGIN_TIME_ZONE), ambiguous=np.ones(len(hours), dtype=bool), nonexistent="NaT"
        )
        .dt.tz_convert("UTC")
    )
    df["time_hour"] = utc.take(codes).set_axis(df.index)
    stage("time_hour")

    wx["time_hour"] = wx["time_hour"].astype(df["time_hour"].dtype)
    # Weather history, on the small hourly table before the merge (these flights send no
    # weather, so the scheduled hour's value is the table's). The hours before a row are looked
    # up by clock time in an (origin, time_hour) index, not by shift() within an origin: shift
    # would reach across a missing hour, which must stay missing.
    by_hour = wx.set_index(["origin", "time_hour"])[
        ["precip", "visib", "wind_speed", "pressure", "temp"]
    ].astype("float64")
    # Every recorded hour and the 5 after it: an hour missing from the table still has the
    # hours before it.
    grid = (
        pd.concat(
            [wx[["origin"]].assign(time_hour=wx["time_hour"] + pd.Timedelta(hours=k))
             for k in range(6)]
        )
        .drop_duplicates()
        .reset_index(drop=True)
    )  # fmt: skip
    window = [
        by_hour.reindex(
            pd.MultiIndex.from_arrays([grid["origin"], grid["time_hour"] - pd.Timedelta(hours=k)])
        ).set_axis(grid.index)
        for k in range(6)
    ]  # window[k]: the weather k hours before each grid hour at its origin (k=0: its own)

    def hours(field: str, count: int) -> pd.DataFrame:
        return pd.concat([window[k][field] for k in range(count)], axis=1)

    # Sums and extremes skip missing hours and are missing only when every hour is (min_count=1:
    # an all-NaN sum is otherwise 0); a change is missing when either of its hours is.
    history = {
        "precip_3h": hours("precip", 3).sum(axis=1, min_count=1),
        "precip_6h": hours("precip", 6).sum(axis=1, min_count=1),
        "visib_min_3h": hours("visib", 3).min(axis=1),
        "wind_max_3h": hours("wind_speed", 3).max(axis=1),
        "pressure_chg_3h": window[0]["pressure"] - window[3]["pressure"],
        "temp_chg_3h": window[0]["temp"] - window[3]["temp"],
    }
    wx = grid.assign(**{f"__hist_{h}": history[h] for h in WEATHER_HISTORY_FIELDS}).merge(
        wx, on=["origin", "time_hour"], how="left"
    )
    stage("history")

    wx = wx.rename(columns={w: f"__wx_{w}" for w in WEATHER_FIELDS})
    registry = registry.rename(columns={"year": "__plane_year"})
    df = df.merge(wx, on=["origin", "time_hour"], how="left")
    df = df.merge(registry, on="tailnum", how="left")
    stage("merge")

    def minutes(hhmm: pd.Series) -> pd.Series:
        return (hhmm // 100) * 60 + hhmm % 100

    dep_minutes = minutes(df["sched_dep_time"])
    arr_minutes = minutes(df["sched_arr_time"])
    out = pd.DataFrame(
        {
            "flight_date": df["flight_date"],
            # Not dt.strftime("%Y-%m"): it formats element by element (~6.5 s per 1M rows).
            "month_key": df["flight_date"].dt.to_period("M").astype(str),
            "flight": df["flight"],
            "tailnum": df["tailnum"],
            "time_hour": df["time_hour"],
            "dep_hour": dep_hour.astype("float64"),
            "dep_minute_of_day": dep_minutes.astype("float64"),
            "arr_minute_of_day": arr_minutes.astype("float64"),
            "sched_block_minutes": ((arr_minutes - dep_minutes) % 1440).astype("float64"),
            "weekday": (df["flight_date"].dt.weekday + 1).astype("float64"),
            "distance": df["distance"].astype("float64"),
            **{w: df[f"__wx_{w}"].astype("float64") for w in WEATHER_FIELDS},
            **{h: df[f"__hist_{h}"] for h in WEATHER_HISTORY_FIELDS},
            "plane_age": (df["year"] - df["__plane_year"]).astype("float64"),
            "seats": df["seats"].astype("float64"),
            "engines": df["engines"].astype("float64"),
            "carrier": df["carrier"],
            "origin": df["origin"],
            "dest": df["dest"],
            LABEL: (df["arr_delay"] > DELAY_THRESHOLD_MINUTES)
            .astype("boolean")
            .mask(df["arr_delay"].isna()),
        }
    )
    stage("derive")
    return out


# --------------------------------------------------------------------------- fingerprints


def polars_fingerprint(frame: Any) -> dict[str, Any]:
    """Rows, and per column: nulls and a sum (string lengths, epoch days/seconds, trues)."""
    import polars as pl

    exprs = []
    for name, dtype in frame.schema.items():
        col = pl.col(name)
        if dtype == pl.String:
            total = col.str.len_chars().sum()
        elif dtype == pl.Date:
            total = col.cast(pl.Int64).sum()
        elif isinstance(dtype, pl.Datetime):
            total = col.dt.epoch("s").sum()
        else:
            total = col.cast(pl.Float64).sum()
        exprs += [col.null_count().alias(f"{name}|nulls"), total.alias(f"{name}|sum")]
    row = frame.select(exprs).row(0, named=True)
    return {"rows": frame.height, **{k: _plain(v) for k, v in row.items()}}


def pandas_fingerprint(frame: Any) -> dict[str, Any]:
    import pandas as pd

    out: dict[str, Any] = {"rows": len(frame)}
    for name in frame.columns:
        col = frame[name]
        out[f"{name}|nulls"] = int(col.isna().sum())
        present = col.dropna()
        if name == "flight_date":
            total = int((present.to_numpy().astype("datetime64[D]").astype("int64")).sum())
        elif isinstance(col.dtype, pd.DatetimeTZDtype):
            total = int(
                (present.dt.tz_convert(None).to_numpy().astype("datetime64[s]"))
                .astype("int64")
                .sum()
            )
        elif col.dtype == object:
            total = int(present.str.len().sum())
        else:
            total = float(present.astype("float64").sum())
        out[f"{name}|sum"] = total
    return out


def _plain(value: Any) -> Any:
    return value if isinstance(value, int | float | None) else float(value)


def fingerprint_mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    bad = [f"columns differ: {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if isinstance(x, float) or isinstance(y, float):
            if not math.isclose(x or 0.0, y or 0.0, rel_tol=FLOAT_RTOL, abs_tol=1e-6):
                bad.append(f"{key}: {x} != {y}")
        elif x != y:
            bad.append(f"{key}: {x} != {y}")
    return bad


# --------------------------------------------------------------------------- child process


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_peak_mib() -> float | None:
    """Peak virtual size (what RLIMIT_AS limits; allocators reserve far more than they touch)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((ln for ln in status.splitlines() if ln.startswith("VmPeak:")), None)
    return int(line.split()[1]) / 1024 if line else None


def run_impl(impl: str, data: Path, verify_months: int) -> dict[str, Any]:
    """Body of one child process; returns what the parent records."""
    import importlib

    import polars as pl

    # Imports happen before any clock starts (the pandas code takes its constants from the
    # project's feature module, so both children load polars: ~27 MiB of baseline RSS).
    importlib.import_module("mlops_assets.features.transform")
    if impl in ("pandas", "verify"):
        importlib.import_module("pandas")

    result: dict[str, Any] = {"impl": impl}
    if impl == "verify":
        from polars.testing import assert_frame_equal

        months = sample_months(data, verify_months)
        files = data_files(data, months)
        ours = polars_features(*files)
        theirs = pl.from_pandas(pandas_features(*files)).cast(ours.schema)
        by = ours.columns
        assert_frame_equal(ours.sort(by), theirs.select(by).sort(by), rel_tol=FLOAT_RTOL)
        return {**result, "months": months, "rows": ours.height, "columns": len(by)}

    files = data_files(data)
    if impl == "validate":
        from mlops_assets.features.transform import feature_frame
        from mlops_assets.validate.quarantine import validate_table
        from mlops_assets.validate.schemas import TABLES

        flights = pl.read_parquet(files[0])
        weather, planes = pl.read_parquet(files[1]), pl.read_parquet(files[2])
        result["baseline_mib"] = _rss_mib()
        start = time.perf_counter()
        outcome = validate_table(flights, TABLES["flights"], source="bench", partition=None)
        result["seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        feats = feature_frame(outcome.valid, weather, planes).collect()
        result["feature_in_memory_seconds"] = time.perf_counter() - start
        result.update(
            rows=flights.height,
            valid=outcome.valid.height,
            quarantined=outcome.quarantine.height,
            feature_rows=feats.height,
        )
        return result

    result["baseline_mib"] = _rss_mib()
    stages: dict[str, float] = {}
    start = time.perf_counter()
    frame = polars_features(*files) if impl == "polars" else pandas_features(*files, stages)
    result["seconds"] = time.perf_counter() - start
    result["stages"] = stages
    result["fingerprint"] = (
        polars_fingerprint(frame) if impl == "polars" else pandas_fingerprint(frame)
    )
    result["rows"] = result["fingerprint"]["rows"]
    return result


def child_main(impl: str, data: Path, mem_limit_gib: float, verify_months: int) -> None:
    limit = int(mem_limit_gib * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        result = run_impl(impl, data, verify_months)
        result["status"] = "ok"
    except MemoryError:
        result = {"impl": impl, "status": f"MemoryError under RLIMIT_AS={mem_limit_gib} GiB"}
    except AssertionError as exc:
        result = {"impl": impl, "status": "outputs differ", "detail": str(exc)[:2000]}
    result["self_peak_mib"] = _rss_mib()
    result["vm_peak_mib"] = _vm_peak_mib()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def spawn(impl: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; peak RSS from the kernel's rusage of it."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_features",
        "--impl",
        impl,
        "--data",
        str(data),
        "--mem-limit-gib",
        str(args.mem_limit_gib),
        "--verify-months",
        str(args.verify_months),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if lines:
        result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    else:
        code = proc.returncode
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        result = {"impl": impl, "status": f"crashed ({why}, cap {args.mem_limit_gib} GiB)"}
    result["peak_mib"] = usage.ru_maxrss / 1024
    result["process_seconds"] = time.perf_counter() - started
    return result


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get("status") == "ok" and key in r]
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str, width: int = 0) -> str:
    return format("failed" if value is None else format(value, spec), f">{width}")


def bench_dataset(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    manifest = (
        json.loads((data / "drift.json").read_text()) if (data / "drift.json").exists() else {}
    )
    print(f"\n== {data} ({manifest.get('rows', '?'):,} rows)" if manifest else f"\n== {data}")
    runs: dict[str, list[dict[str, Any]]] = {"polars": [], "pandas": [], "validate": []}
    for i in range(args.repeats):
        order = ["polars", "pandas"] if i % 2 == 0 else ["pandas", "polars"]
        if i < args.validate_repeats:
            order.append("validate")
        for impl in order:
            r = spawn(impl, data, args)
            runs[impl].append(r)
            extra = ""
            if r.get("stages"):
                extra = "  (" + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()) + ")"
            if impl == "validate" and r.get("status") == "ok":
                extra = (
                    f"  (valid {r['valid']:,}, quarantined {r['quarantined']:,}; "
                    f"feature_frame in memory {r['feature_in_memory_seconds']:.2f} s)"
                )
            secs = r.get("seconds")
            print(
                f"  run {i + 1} {impl:8s} {_fmt(secs, '.2f', 8)} s  peak {r['peak_mib']:7.0f} MiB"
                f"  (baseline {r.get('baseline_mib', 0):4.0f},"
                f" virtual {r.get('vm_peak_mib') or 0:6.0f})"
                f"  {r['status']}{extra}",
                flush=True,
            )

    checks: list[str] = []
    ok_prints = [
        r["fingerprint"] for k in ("polars", "pandas") for r in runs[k] if "fingerprint" in r
    ]
    for other in ok_prints[1:]:
        checks += fingerprint_mismatches(ok_prints[0], other)
    verify = spawn("verify", data, args)
    if verify["status"] != "ok":
        checks.append(f"row-level check: {verify['status']} {verify.get('detail', '')}")
    both = all(any("fingerprint" in r for r in runs[k]) for k in ("polars", "pandas"))
    agree = "NO" if checks else "yes" if both else "sample"
    print(
        f"  full-size fingerprints of {len(ok_prints)} runs: "
        f"{'DIFFER' if checks else 'identical'}; row-level check on {verify.get('months')}: "
        f"{verify.get('rows', 0):,} rows x {verify.get('columns', 0)} columns "
        f"{verify['status']}"
    )
    for line in checks[:20]:
        print(f"    ! {line}")

    summary = {
        "data": str(data),
        "rows": ok_prints[0]["rows"] if ok_prints else manifest.get("rows"),
        "polars_s": _median(runs["polars"], "seconds"),
        "pandas_s": _median(runs["pandas"], "seconds"),
        "polars_peak_mib": statistics.median(r["peak_mib"] for r in runs["polars"]),
        "pandas_peak_mib": statistics.median(r["peak_mib"] for r in runs["pandas"]),
        "pandas_status": sorted({r["status"] for r in runs["pandas"]}),
        "validate_s": _median(runs["validate"], "seconds"),
        "feature_in_memory_s": _median(runs["validate"], "feature_in_memory_seconds"),
        "outputs_agree": agree,
        "verify": verify,
        "runs": runs,
    }
    p, q = summary["polars_s"], summary["pandas_s"]
    summary["ratio"] = q / p if p and q else None
    v = summary["validate_s"]
    summary["validate_share"] = v / p if v and p else None
    return summary


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'dataset rows':>13} {'polars s':>9} {'pandas s':>9} {'ratio':>6} "
        f"{'polars MiB':>11} {'pandas MiB':>11} {'valid. s':>9} {'valid/feat':>10} "
        f"{'agree':>6}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for s in results:
        print(
            f"{s['rows']:>13,} "
            f"{_fmt(s['polars_s'], '.2f', 9)} {_fmt(s['pandas_s'], '.2f', 9)} "
            f"{_fmt(s['ratio'], '.1f', 5)}x {s['polars_peak_mib']:>11.0f} "
            f"{s['pandas_peak_mib']:>11.0f} {_fmt(s['validate_s'], '.2f', 9)} "
            f"{_fmt(s['validate_share'], '.0%', 10)} {s['outputs_agree']:>6}"
        )
    print(
        "times: medians of the runs (each in a fresh process, reading Parquet included);"
        " MiB: peak RSS of that process (median); ratio: pandas/polars;"
        " valid/feat: validate_table s / polars feature s;"
        " agree: full-size fingerprints and the row-level sample match ('sample': only the"
        " sample could be compared)"
    )
    for s in results:
        for impl, runs in s["runs"].items():
            for r in runs:
                if r["status"] != "ok":
                    print(f"{s['rows']:,} rows, {impl}: {r['status']} at {r['peak_mib']:.0f} MiB")
    for s in results:
        if s["rows"] and s["rows"] >= TARGET_ROWS:
            ratio_ok = s["ratio"] is not None and s["ratio"] >= TARGET_RATIO
            peak_ok = s["polars_peak_mib"] <= TARGET_PEAK_MIB
            print(
                f"target at {s['rows']:,} rows: polars >= {TARGET_RATIO:.0f}x pandas: "
                f"{'PASS' if ratio_ok else 'FAIL'} ({_fmt(s['ratio'], '.1f')}x); "
                f"polars peak <= 8 GiB: {'PASS' if peak_ok else 'FAIL'} "
                f"({s['polars_peak_mib']:.0f} MiB)"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        help="a scale_data folder; repeat for several",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per implementation")
    parser.add_argument("--validate-repeats", type=int, default=1, help="validate_table runs")
    parser.add_argument(
        "--mem-limit-gib", type=float, default=16.0, help="RLIMIT_AS of each child process"
    )
    parser.add_argument("--verify-months", type=int, default=4, help="months compared row by row")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--impl", choices=["polars", "pandas", "validate", "verify"], help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.impl:
        child_main(args.impl, args.data[0], args.mem_limit_gib, args.verify_months)
        return

    # The parent imports neither library: on Linux a child's ru_maxrss starts from the RSS of
    # the process that spawned it, so a lean parent keeps the children's peaks their own.
    print(
        f"polars {version('polars')}, pandas {version('pandas')}, pyarrow {version('pyarrow')}, "
        f"{os.cpu_count()} CPUs, child RLIMIT_AS {args.mem_limit_gib} GiB, "
        f"{args.repeats} repeats (parent RSS {_rss_mib():.0f} MiB)"
    )
    results = [bench_dataset(data.resolve(), args) for data in args.data]
    print_table(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
