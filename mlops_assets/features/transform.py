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


def feature_frame(
    flights: pl.LazyFrame | pl.DataFrame,
    weather: pl.LazyFrame | pl.DataFrame,
    planes: pl.LazyFrame | pl.DataFrame,
) -> pl.LazyFrame:
    """Join flights with origin weather at the scheduled hour and with planes; derive features.

    Weather fields present on a flight row (a booking request may carry them) win over the
    looked-up values. When ``arr_delay`` is present the label ``delayed`` is added (null where
    the flight has no arrival delay: cancelled or diverted).
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
    looked_up = weather.lazy().select(
        "origin", "time_hour", *(pl.col(w).alias(f"__wx_{w}") for w in WEATHER_FIELDS)
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
    weather_exprs = [
        (pl.coalesce(pl.col(w).cast(pl.Float64), pl.col(f"__wx_{w}")) if w in schema
         else pl.col(f"__wx_{w}").cast(pl.Float64)).alias(w)
        for w in WEATHER_FIELDS
    ]  # fmt: skip
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
        *weather_exprs,
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
