"""Drift report cost on a 1M-row partition, and whether sampling changes any verdict.

Uses the 10M scale data (``benchmarks.scale_data --rows 10000000 --out .mlops/scale/10m``), whose
injected drift is ground truth: ``temp`` +6 °F from 2015-04, carrier mix (EV × 0.4, B6 × 1.6)
from 2016-04, EWR delays +10 min from 2015-10 (concept drift: features unchanged).

1. Features are built once with the project's feature function and written as Parquet, as the
   ``flight_features`` partitions are.
2. **Cost**: on a ~1M-row current partition (2016-04..2019-03, after every injected event)
   against a reference year (2014): reading the feature columns with polars (the floor), the
   drift report with the default sampling (20k rows a side), and the report on every row.
3. **Verdicts**: same-season windows, pre-drift control (2015-01..03 vs 2014-01..03) and
   post-drift (2016-04..06 vs 2014-04..06) and the 1M partition vs 2014: the drifted columns
   with and without sampling, and whether each known event is detected where it should be
   (and not in the control).

    .venv/bin/python -m benchmarks.bench_drift --data .mlops/scale/10m --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import polars as pl

from benchmarks.bench_features import data_files
from mlops_assets.features.transform import FEATURE_NAMES, FEATURES, LABEL, feature_frame
from mlops_assets.monitor.drift import measure_drift

KINDS = {f.name: f.kind for f in FEATURES}


def months(first: str, last: str) -> list[str]:
    out, (y, m) = [], map(int, first.split("-"))
    while f"{y}-{m:02d}" <= last:
        out.append(f"{y}-{m:02d}")
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def features_file(data: Path, window: list[str], out: Path) -> Path:
    if out.exists():
        return out
    flights, weather, planes = data_files(data, window)
    frame = feature_frame(
        pl.scan_parquet(flights), pl.scan_parquet(weather), pl.scan_parquet(planes)
    ).filter(pl.col(LABEL).is_not_null())
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.sink_parquet(out)
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(".mlops/scale/10m"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-rows", type=int, default=20_000)
    args = parser.parse_args()
    cache = Path(".mlops/bench/drift")
    windows = {
        "reference_2014": months("2014-01", "2014-12"),
        "current_1m": months("2016-04", "2019-03"),
        "control_ref": months("2014-01", "2014-03"),
        "control_cur": months("2015-01", "2015-03"),
        "post_ref": months("2014-04", "2014-06"),
        "post_cur": months("2016-04", "2016-06"),
    }
    files = {n: features_file(args.data, w, cache / f"{n}.parquet") for n, w in windows.items()}
    read = {
        n: (lambda p=p: pl.read_parquet(p, columns=list(FEATURE_NAMES))) for n, p in files.items()
    }
    reference = read["reference_2014"]()
    current = read["current_1m"]()
    print(f"current partition: {current.height:,} rows; reference: {reference.height:,} rows")

    floor, _ = timed(read["current_1m"], args.repeats)
    sampled_s, sampled = timed(
        lambda: measure_drift(read["current_1m"](), reference, KINDS, max_rows=args.max_rows),
        args.repeats,
    )
    full_s, full = timed(
        lambda: measure_drift(read["current_1m"](), reference, KINDS, max_rows=None), 1
    )
    print("\n| run | seconds | vs polars read |")
    print("|---|---|---|")
    print(f"| polars read of the feature columns (floor) | {floor:.3f} | 1.0x |")
    print(f"| drift report, sampled {args.max_rows:,} a side | {sampled_s:.2f} | "
          f"{sampled_s / floor:.1f}x |")  # fmt: skip
    print(f"| drift report, every row | {full_s:.2f} | {full_s / floor:.1f}x |")

    cases = {
        "control (2015-01..03 vs 2014-01..03, before every event)": ("control_cur", "control_ref"),
        "post (2016-04..06 vs 2014-04..06, after temp and carrier events)": (
            "post_cur",
            "post_ref",
        ),
        "1M partition (2016-04..2019-03 vs 2014)": ("current_1m", "reference_2014"),
    }
    print("\n| case | drifted, sampled | drifted, every row | same verdicts |")
    print("|---|---|---|---|")
    verdicts = {}
    for label, (cur, ref) in cases.items():
        if cur == "current_1m":
            a, b = sampled, full
        else:
            cur_frame, ref_frame = read[cur](), read[ref]()
            a = measure_drift(cur_frame, ref_frame, KINDS, max_rows=args.max_rows)
            b = measure_drift(cur_frame, ref_frame, KINDS, max_rows=None)
        da = sorted(c.column for c in a.columns if c.drifted)
        db = sorted(c.column for c in b.columns if c.drifted)
        verdicts[cur] = set(da)
        print(f"| {label} | {', '.join(da) or 'none'} | {', '.join(db) or 'none'} | "
              f"{'yes' if da == db else 'NO'} |")  # fmt: skip
    print("\nknown events (sampled verdicts):")
    checks = [
        ("temp not drifted before its event (control)", "temp" not in verdicts["control_cur"]),
        ("carrier not drifted before its event (control)",
         "carrier" not in verdicts["control_cur"]),
        ("temp drifted after +6 °F", "temp" in verdicts["post_cur"]),
        ("carrier drifted after the carrier mix change", "carrier" in verdicts["post_cur"]),
        ("temp and carrier drifted in the 1M partition",
         {"temp", "carrier"} <= verdicts["current_1m"]),
    ]  # fmt: skip
    for text, ok in checks:
        print(f"  {'ok  ' if ok else 'MISS'} {text}")


if __name__ == "__main__":
    main()
