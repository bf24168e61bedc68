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


@dataclass(frozen=True)
class History:
    """A weather-history feature: the scheduled hour's ``field`` combined with the hours before
    it. ``how`` sum/min/max: over the scheduled hour and the ``hours - 1`` before it (a missing
    hour is skipped; null when all are missing); change: the scheduled hour minus ``hours``
    before (null when either is missing)."""

    field: str
    hours: int
    how: Literal["sum", "min", "max", "change"]
    description: str

    @property
    def past_hours(self) -> range:
        """How many hours before the scheduled one the looked-up part reads."""
        return range(self.hours, self.hours + 1) if self.how == "change" else range(1, self.hours)


# The origin's recent weather, from the hourly weather table: what the hours before the scheduled
# one left behind (wet runways, a front passing, ground stops that linger). Looked up only, never
# sent; the scheduled hour's own value may be sent.
WEATHER_HISTORY: dict[str, History] = {
    "precip_3h": History("precip", 3, "sum",
                         "precipitation over the scheduled hour and the 2 before it"),
    "precip_6h": History("precip", 6, "sum",
                         "precipitation over the scheduled hour and the 5 before it"),
    "visib_min_3h": History("visib", 3, "min",
                            "lowest visibility over the scheduled hour and the 2 before it"),
    "wind_max_3h": History("wind_speed", 3, "max",
                           "highest wind speed over the scheduled hour and the 2 before it"),
    "pressure_chg_3h": History("pressure", 3, "change",
                               "pressure at the scheduled hour minus 3 hours before"),
    "temp_chg_3h": History("temp", 3, "change",
                           "temperature at the scheduled hour minus 3 hours before"),
}  # fmt: skip
WEATHER_HISTORY_FIELDS = tuple(WEATHER_HISTORY)
# The looked-up part of each (the hours before the scheduled one), derived once per weather
# row by :func:`weather_history`, in the same order.
PAST_WEATHER_FIELDS = tuple(f"past_{feature}" for feature in WEATHER_HISTORY)
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
        Feature(name, "numeric", "null when the origin reported none of the hours it covers "
                "(precipitation, visibility, wind) or not both of its two hours (changes)",
                f"origin weather history: {history.description}")
        for name, history in WEATHER_HISTORY.items()
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
    """The hourly weather with :data:`PAST_WEATHER_FIELDS`: per origin, the part of each
    :data:`WEATHER_HISTORY` feature that the hours before each hour hold, by clock time (a
    missing hour is missing, never skipped over).

    An hour the table lacks but that follows a recorded one within the longest window gets a
    row too, with null weather fields: a flight at that hour still has the hours before it.
    """
    weather = weather.lazy()
    reach = max(max(h.past_hours) for h in WEATHER_HISTORY.values())
    hours = (
        pl.concat(
            weather.select("origin", pl.col("time_hour") + pl.duration(hours=k))
            for k in range(reach + 1)
        )
        .unique()
        .sort("origin", "time_hour")
    )
    # One self-join per (field, hours before) that some feature reads.
    for field, k in sorted({(h.field, k) for h in WEATHER_HISTORY.values() for k in h.past_hours}):
        earlier = weather.select(
            "origin",
            (pl.col("time_hour") + pl.duration(hours=k)).alias("time_hour"),
            pl.col(field).cast(pl.Float64).alias(f"__{field}_{k}"),
        )
        hours = hours.join(earlier, on=["origin", "time_hour"], how="left", maintain_order="left")

    def past(h: History) -> pl.Expr:
        columns = [f"__{h.field}_{k}" for k in h.past_hours]
        if h.how == "min":
            return pl.min_horizontal(columns)
        if h.how == "max":
            return pl.max_horizontal(columns)
        if h.how == "sum":
            return pl.when(pl.any_horizontal(pl.col(c).is_not_null() for c in columns)).then(
                pl.sum_horizontal(columns)
            )
        return pl.col(columns[0])

    derived = hours.select(
        "origin",
        "time_hour",
        *(past(h).alias(p) for h, p in zip(WEATHER_HISTORY.values(), PAST_WEATHER_FIELDS,
                                           strict=True)),
    )  # fmt: skip
    return derived.join(weather, on=["origin", "time_hour"], how="left", maintain_order="left")


def combine_history(history: History, now: pl.Expr, past: pl.Expr) -> pl.Expr:
    """A history feature from the scheduled hour's value and its looked-up past (a missing side
    is skipped by sum/min/max, and nulls a change)."""
    if history.how == "sum":
        return (
            pl.when(now.is_null() & past.is_null())
            .then(None)
            .otherwise(now.fill_null(0.0) + past.fill_null(0.0))
        )
    if history.how == "min":
        return pl.min_horizontal(now, past)
    if history.how == "max":
        return pl.max_horizontal(now, past)
    return now - past


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
        *(pl.col(p).cast(pl.Float64).alias(f"__{p}") for p in PAST_WEATHER_FIELDS),
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
        combine_history(h, pl.col(h.field), pl.col(f"__{p}")).alias(name)
        for (name, h), p in zip(WEATHER_HISTORY.items(), PAST_WEATHER_FIELDS, strict=True)
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
