"""The one feature function, shared by training, batch scoring and the serving endpoint.

Input rows are flights as a booking system knows them before departure: the date, scheduled
times, carrier, flight, tailnum, origin, dest and distance (optionally weather fields). Nothing
observed after departure (``dep_time``, ``dep_delay``, ``arr_time``, ``arr_delay``, ``air_time``)
is ever a feature; ``arr_delay`` only becomes the label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import polars as pl

# The three origins are New York airports; scheduled times are local clock times there.
ORIGIN_TIME_ZONE = "America/New_York"
DELAY_THRESHOLD_MINUTES = 15.0
LABEL = "delayed"

BOOKING_COLUMNS: dict[str, pl.DataType] = {
    "year": pl.Int64(),
    "month": pl.Int64(),
    "day": pl.Int64(),
    "sched_dep_time": pl.Int64(),
    "sched_arr_time": pl.Int64(),
    "carrier": pl.String(),
    "flight": pl.Int64(),
    "tailnum": pl.String(),
    "origin": pl.String(),
    "dest": pl.String(),
    "distance": pl.Float64(),
}
WEATHER_FIELDS = (
    "temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip", "pressure", "visib",
)  # fmt: skip
# The origin's recent weather, from the hourly weather table: what the hours before the scheduled
# one left behind (wet runways, a front passing, ground stops that linger). Looked up only, never
# sent: each combines the scheduled hour's value (sent or looked up) with the hours before it.
WEATHER_HISTORY: dict[str, str] = {
    "precip_3h": "precipitation over the scheduled hour and the 2 before it",
    "precip_6h": "precipitation over the scheduled hour and the 5 before it",
    "visib_min_3h": "lowest visibility over the scheduled hour and the 2 before it",
    "wind_max_3h": "highest wind speed over the scheduled hour and the 2 before it",
    "pressure_chg_3h": "pressure at the scheduled hour minus 3 hours before (the tendency)",
    "temp_chg_3h": "temperature at the scheduled hour minus 3 hours before",
}
WEATHER_HISTORY_FIELDS = tuple(WEATHER_HISTORY)
# The looked-up columns behind them: aggregates of the hours *before* the scheduled one, derived
# once per weather row by :func:`weather_history`. Which scheduled-hour field each combines with,
# and how (see :func:`combine_history`).
PAST_WEATHER: dict[str, tuple[str, str, str]] = {
    # past column: (feature, scheduled-hour field, combination)
    "precip_prev_2h": ("precip_3h", "precip", "sum"),
    "precip_prev_5h": ("precip_6h", "precip", "sum"),
    "visib_min_prev_2h": ("visib_min_3h", "visib", "min"),
    "wind_max_prev_2h": ("wind_max_3h", "wind_speed", "max"),
    "pressure_3h_before": ("pressure_chg_3h", "pressure", "minus"),
    "temp_3h_before": ("temp_chg_3h", "temp", "minus"),
}
PAST_WEATHER_FIELDS = tuple(PAST_WEATHER)
# Observed after departure: never a feature (a test pins this).
POST_DEPARTURE = frozenset({"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time"})
# Carried along to identify and split rows; not model inputs.
ID_COLUMNS = ("flight_date", "month_key", "flight", "tailnum", "time_hour")


@dataclass(frozen=True)
class Feature:
    name: str
    kind: Literal["numeric", "categorical"]
    missing: str  # the missing-value policy, shown in the UI and the model manifest
    description: str


FEATURES: tuple[Feature, ...] = (
    Feature("dep_hour", "numeric", "never missing", "scheduled departure hour (local)"),
    Feature("dep_minute_of_day", "numeric", "never missing", "scheduled departure, minutes"),
    Feature("arr_minute_of_day", "numeric", "never missing", "scheduled arrival, minutes"),
    Feature("sched_block_minutes", "numeric", "never missing",
            "scheduled arrival minus departure clock time, modulo a day"),
    Feature("weekday", "numeric", "never missing", "ISO weekday of the flight date, 1=Monday"),
    Feature("distance", "numeric", "never missing", "route distance, miles"),
    *(
        Feature(w, "numeric", "null when the origin reported no value that hour; LightGBM "
                "routes nulls natively, the linear baseline imputes the training median",
                f"origin weather at the scheduled hour: {w}")
        for w in WEATHER_FIELDS
    ),
    *(
        Feature(h, "numeric", "null when the origin reported none of the hours it covers "
                "(precipitation, visibility, wind) or not both of its two hours (changes)",
                f"origin weather history: {description}")
        for h, description in WEATHER_HISTORY.items()
    ),
    Feature("plane_age", "numeric", "null for planes missing from the registry or without a "
            "build year; median for the linear baseline", "flight year minus plane build year"),
    Feature("seats", "numeric", "as plane_age", "plane seat count"),
    Feature("engines", "numeric", "as plane_age", "plane engine count"),
    Feature("carrier", "categorical", "never missing; unseen carriers map to null",
            "carrier code"),
    Feature("origin", "categorical", "never missing; unseen airports map to null",
            "origin airport"),
    Feature("dest", "categorical", "never missing; unseen airports map to null",
            "destination airport"),
)  # fmt: skip
FEATURE_NAMES = tuple(f.name for f in FEATURES)
NUMERIC_FEATURES = tuple(f.name for f in FEATURES if f.kind == "numeric")
CATEGORICAL_FEATURES = tuple(f.name for f in FEATURES if f.kind == "categorical")


def _hour_key(year: pl.Expr, month: pl.Expr, day: pl.Expr, hour: pl.Expr) -> pl.Expr:
    """Pack a local date and hour into one integer (YYYYMMDDHH), a cheap join key."""
    return year * 1_000_000 + month * 10_000 + day * 100 + hour


def _minutes(hhmm: pl.Expr) -> pl.Expr:
    return (hhmm // 100) * 60 + hhmm % 100


def weather_history(weather: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """The hourly weather with :data:`PAST_WEATHER_FIELDS`: per origin, aggregates of the hours
    before each hour, by clock time (a missing hour is missing, never skipped over).

    Sums and extremes skip hours with no value and are null when no hour has one. An hour the
    table lacks but that follows a recorded one by up to 5 hours gets a row too, with null
    weather fields: a flight at that hour still has the hours before it.
    """
    weather = weather.lazy()
    hours = (
        pl.concat(
            [weather.select("origin", pl.col("time_hour") + pl.duration(hours=k)) for k in range(6)]
        )
        .unique()
        .sort("origin", "time_hour")
    )

    def before(k: int, field: str) -> pl.LazyFrame:
        return weather.select(
            "origin",
            (pl.col("time_hour") + pl.duration(hours=k)).alias("time_hour"),
            pl.col(field).cast(pl.Float64).alias(f"__{field}_{k}"),
        )

    wanted = [(k, "precip") for k in range(1, 6)] + [
        (1, "visib"), (2, "visib"), (1, "wind_speed"), (2, "wind_speed"),
        (3, "pressure"), (3, "temp"),
    ]  # fmt: skip
    for k, field in wanted:
        hours = hours.join(before(k, field), on=["origin", "time_hour"], how="left",
                           maintain_order="left")  # fmt: skip

    def total(*columns: str) -> pl.Expr:
        return (
            pl.when(pl.any_horizontal(pl.col(c).is_not_null() for c in columns))
            .then(pl.sum_horizontal(columns))
            .otherwise(None)
        )

    past = hours.select(
        "origin",
        "time_hour",
        total("__precip_1", "__precip_2").alias("precip_prev_2h"),
        total(*(f"__precip_{k}" for k in range(1, 6))).alias("precip_prev_5h"),
        pl.min_horizontal("__visib_1", "__visib_2").alias("visib_min_prev_2h"),
        pl.max_horizontal("__wind_speed_1", "__wind_speed_2").alias("wind_max_prev_2h"),
        pl.col("__pressure_3").alias("pressure_3h_before"),
        pl.col("__temp_3").alias("temp_3h_before"),
    )
    return past.join(weather, on=["origin", "time_hour"], how="left", maintain_order="left")


def combine_history(current: str, past: str, how: str) -> pl.Expr:
    """A history feature from the scheduled hour's value and the past aggregate (same null
    rules as the aggregate: a missing side is skipped by sum/min/max, and nulls a change)."""
    now, before = pl.col(current), pl.col(past)
    if how == "sum":
        return (
            pl.when(now.is_null() & before.is_null())
            .then(None)
            .otherwise(now.fill_null(0.0) + before.fill_null(0.0))
        )
    if how == "min":
        return pl.min_horizontal(now, before)
    if how == "max":
        return pl.max_horizontal(now, before)
    return now - before


def feature_frame(
    flights: pl.LazyFrame | pl.DataFrame,
    weather: pl.LazyFrame | pl.DataFrame,
    planes: pl.LazyFrame | pl.DataFrame,
) -> pl.LazyFrame:
    """Join flights with origin weather at the scheduled hour and with planes; derive features.

    Weather fields present on a flight row (a booking request may carry them) win over the
    looked-up values; the weather history combines them with the hours before. ``weather``
    either carries :data:`PAST_WEATHER_FIELDS` already (serving derives them once, from the
    whole table, then passes slices of it) or is the whole hourly table, and they are derived.
    When ``arr_delay`` is present the label ``delayed`` is added (null where the flight has no
    arrival delay: cancelled or diverted).
    """
    flights = flights.lazy()
    schema = flights.collect_schema()
    missing = [c for c in BOOKING_COLUMNS if c not in schema]
    if missing:
        raise ValueError(f"flights lack booking column(s) {missing}")
    dep_hour = pl.col("sched_dep_time") // 100
    base = flights.with_columns(pl.col(c).cast(t) for c, t in BOOKING_COLUMNS.items()).with_columns(
        _hour_key(pl.col("year"), pl.col("month"), pl.col("day"), dep_hour).alias("__hour_key")
    )
    # Calendar and time-zone work runs once per distinct scheduled hour (a few thousand a year),
    # not once per flight, and is joined back: the same values, several times cheaper at scale.
    calendar = (
        base.select("__hour_key")
        .unique()
        .with_columns(
            (pl.col("__hour_key") // 1_000_000).alias("__y"),
            (pl.col("__hour_key") // 10_000 % 100).alias("__m"),
            (pl.col("__hour_key") // 100 % 100).alias("__d"),
            (pl.col("__hour_key") % 100).alias("__h"),
        )
        .select(
            "__hour_key",
            pl.date("__y", "__m", "__d").alias("flight_date"),
            pl.format("{}-{}", "__y", pl.col("__m").cast(pl.String).str.zfill(2)).alias(
                "month_key"
            ),
            pl.date("__y", "__m", "__d").dt.weekday().cast(pl.Float64).alias("weekday"),
            pl.datetime("__y", "__m", "__d", "__h", time_unit="us")
            .dt.replace_time_zone(ORIGIN_TIME_ZONE, ambiguous="earliest", non_existent="null")
            .dt.convert_time_zone("UTC")
            .alias("time_hour"),
        )
    )
    # Rows keep the caller's order through every join: serving answers in request order.
    base = base.join(calendar, on="__hour_key", how="left", maintain_order="left")
    weather = weather.lazy()
    if not set(PAST_WEATHER_FIELDS) <= set(weather.collect_schema().names()):
        weather = weather_history(weather)
    looked_up = weather.select(
        "origin",
        "time_hour",
        *(pl.col(w).alias(f"__wx_{w}") for w in WEATHER_FIELDS),
        *(pl.col(p).cast(pl.Float64).alias(f"__past_{p}") for p in PAST_WEATHER_FIELDS),
    )
    plane_info = planes.lazy().select(
        "tailnum",
        pl.col("year").alias("__plane_year"),
        pl.col("seats").cast(pl.Float64),
        pl.col("engines").cast(pl.Float64),
    )
    joined = base.join(
        looked_up, on=["origin", "time_hour"], how="left", maintain_order="left"
    ).join(plane_info, on="tailnum", how="left", maintain_order="left")
    # A weather field sent with the booking wins over the looked-up one; the history then
    # combines that final value with the hours before it.
    joined = joined.with_columns(
        (pl.coalesce(pl.col(w).cast(pl.Float64), pl.col(f"__wx_{w}")) if w in schema
         else pl.col(f"__wx_{w}").cast(pl.Float64)).alias(w)
        for w in WEATHER_FIELDS
    )  # fmt: skip
    history_exprs = [
        combine_history(current, f"__past_{past}", how).alias(feature)
        for past, (feature, current, how) in PAST_WEATHER.items()
    ]
    label = (
        [
            pl.when(pl.col("arr_delay").is_null())
            .then(None)
            .otherwise(pl.col("arr_delay").cast(pl.Float64) > DELAY_THRESHOLD_MINUTES)
            .alias(LABEL)
        ]
        if "arr_delay" in schema
        else []
    )
    dep_minutes = _minutes(pl.col("sched_dep_time"))
    arr_minutes = _minutes(pl.col("sched_arr_time"))
    return joined.select(
        pl.col("flight_date"),
        pl.col("month_key"),
        pl.col("flight"),
        pl.col("tailnum"),
        pl.col("time_hour"),
        dep_hour.cast(pl.Float64).alias("dep_hour"),
        dep_minutes.cast(pl.Float64).alias("dep_minute_of_day"),
        arr_minutes.cast(pl.Float64).alias("arr_minute_of_day"),
        ((arr_minutes - dep_minutes) % 1440).cast(pl.Float64).alias("sched_block_minutes"),
        pl.col("weekday"),
        pl.col("distance"),
        *(pl.col(w) for w in WEATHER_FIELDS),
        *history_exprs,
        (pl.col("year") - pl.col("__plane_year")).cast(pl.Float64).alias("plane_age"),
        pl.col("seats"),
        pl.col("engines"),
        pl.col("carrier"),
        pl.col("origin"),
        pl.col("dest"),
        *label,
    )


def build_features(
    flights: pl.LazyFrame | pl.DataFrame,
    weather: pl.LazyFrame | pl.DataFrame,
    planes: pl.LazyFrame | pl.DataFrame,
) -> pl.DataFrame:
    """:func:`feature_frame`, collected."""
    return feature_frame(flights, weather, planes).collect()
