"""Model inputs for a few records without polars: the shared feature function's values, faster.

:func:`~mlops_assets.features.transform.build_features` plus :meth:`Preprocessor.transform`
cost ~3-4 ms per call whatever the size, almost all of it polars planning a lazy query with
three joins. A one-record request needs microseconds of arithmetic and two lookups, so
:class:`FastMatrix` computes the same matrix in plain Python and numpy.

It is a second implementation of the same definitions, so it is never trusted blindly:

- it knows exactly one feature list; if :data:`FEATURE_NAMES` (or the preprocessing's column
  order) is anything else, it is not built and serving uses the feature function;
- it is built only when the reference tables have unique join keys and the typed ``time_hour``
  the feature function produces (otherwise the polars path's own checks apply);
- :meth:`FastMatrix.verify` compares it, bit for bit, with the feature function on a sample of
  records spanning the reference tables (every origin, DST days, unknown planes and codes),
  every time a model is loaded; on any difference the predictor falls back to the polars path.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
    ORIGIN_TIME_ZONE,
    WEATHER_FIELDS,
)

# The feature list this module implements, in the preprocessing's column order.
KNOWN_FEATURES = (
    "dep_hour", "dep_minute_of_day", "arr_minute_of_day", "sched_block_minutes", "weekday",
    "distance", *WEATHER_FIELDS, "plane_age", "seats", "engines", "carrier", "origin", "dest",
)  # fmt: skip
_NAN = math.nan
_LOCAL = ZoneInfo(ORIGIN_TIME_ZONE)
_UTC = dt.UTC
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=_UTC)
_US = dt.timedelta(microseconds=1)


@lru_cache(maxsize=1 << 16)
def utc_hour_us(year: int, month: int, day: int, hour: int) -> int | None:
    """The local scheduled hour in UTC microseconds, as ``feature_frame`` computes ``time_hour``.

    Ambiguous (fall back) hours take the earliest instant, like ``ambiguous="earliest"``; hours
    skipped by spring forward have no instant (None), like ``non_existent="null"``.
    """
    wall = dt.datetime(year, month, day, hour)
    instant = wall.replace(tzinfo=_LOCAL, fold=0).astimezone(_UTC)
    if instant.astimezone(_LOCAL).replace(tzinfo=None) != wall:
        return None  # the wall time does not exist here (it round-trips to another hour)
    return (instant - _EPOCH) // _US


class FastMatrix:
    """Builds the model matrix of :meth:`Preprocessor.transform` for a few booking records."""

    def __init__(
        self, weather: pl.DataFrame, planes: pl.DataFrame, preprocessor: Preprocessor
    ) -> None:
        self.weather_keys: dict[str, np.ndarray] = {}
        self.weather_values: dict[str, np.ndarray] = {}
        frame = weather.select(
            "origin",
            pl.col("time_hour").dt.epoch("us").alias("__us"),
            *(pl.col(w).cast(pl.Float64) for w in WEATHER_FIELDS),
        ).sort("origin", "__us")
        for (origin,), part in frame.group_by("origin", maintain_order=True):
            if origin is None:
                continue
            keys = part.get_column("__us").to_numpy()
            self.weather_keys[origin] = keys
            self.weather_values[origin] = (
                part.select(WEATHER_FIELDS).to_numpy(order="c").astype(np.float64, copy=False)
            )
        self.planes: dict[str, tuple[float | None, float, float]] = {}
        for tailnum, year, seats, engines in planes.select(
            "tailnum", "year", "seats", "engines"
        ).iter_rows():
            if tailnum is not None:
                self.planes[tailnum] = (
                    year,
                    _NAN if seats is None else float(seats),
                    _NAN if engines is None else float(engines),
                )
        self.codes = {
            c: {v: float(i) for i, v in enumerate(preprocessor.categories[c])}
            for c in CATEGORICAL_FEATURES
        }

    @classmethod
    def build(
        cls, weather: pl.DataFrame, planes: pl.DataFrame, preprocessor: Preprocessor
    ) -> tuple[FastMatrix | None, str]:
        """The fast path for these tables, or None and why it cannot be used."""
        if FEATURE_NAMES != KNOWN_FEATURES or (
            (*NUMERIC_FEATURES, *CATEGORICAL_FEATURES) != KNOWN_FEATURES
        ):
            return None, f"the feature list changed: {FEATURE_NAMES}"
        if weather.schema.get("time_hour") != pl.Datetime("us", "UTC"):
            return None, f"weather time_hour is {weather.schema.get('time_hour')}"
        if weather.select("origin", "time_hour").is_duplicated().any():
            return None, "weather has duplicate (origin, time_hour) rows"
        if planes.get_column("tailnum").drop_nulls().is_duplicated().any():
            return None, "planes has duplicate tailnums"
        return cls(weather, planes, preprocessor), "ok"

    def _weather(self, origin: str, hour_us: int | None) -> np.ndarray | None:
        keys = self.weather_keys.get(origin)
        if keys is None or hour_us is None:
            return None
        i = int(np.searchsorted(keys, hour_us))
        if i < len(keys) and keys[i] == hour_us:
            return self.weather_values[origin][i]
        return None

    def matrix(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``Preprocessor.transform(build_features(records, ...)).to_numpy()``, float64, C order."""
        x = np.empty((len(records), len(KNOWN_FEATURES)), dtype=np.float64)
        carriers, origins, dests = (self.codes[c] for c in CATEGORICAL_FEATURES)
        for i, r in enumerate(records):
            year, month, day = r["year"], r["month"], r["day"]
            dep, arr = r["sched_dep_time"], r["sched_arr_time"]
            dep_hour = dep // 100
            dep_min = dep_hour * 60 + dep % 100
            arr_min = arr // 100 * 60 + arr % 100
            origin = r["origin"]
            looked_up = self._weather(origin, utc_hour_us(year, month, day, dep_hour))
            weather = [
                float(given)
                if (given := r.get(w)) is not None
                else (_NAN if looked_up is None else looked_up[k])
                for k, w in enumerate(WEATHER_FIELDS)
            ]
            plane = self.planes.get(r["tailnum"]) if r.get("tailnum") is not None else None
            if plane is None:
                plane_age, seats, engines = _NAN, _NAN, _NAN
            else:
                built, seats, engines = plane
                plane_age = _NAN if built is None else float(year - built)
            x[i] = (
                float(dep_hour),
                float(dep_min),
                float(arr_min),
                float((arr_min - dep_min) % 1440),
                float(dt.date(year, month, day).isoweekday()),
                float(r["distance"]),
                *weather,
                plane_age,
                seats,
                engines,
                carriers.get(r["carrier"], _NAN),
                origins.get(origin, _NAN),
                dests.get(r["dest"], _NAN),
            )
        return x


def sample_records(weather: pl.DataFrame, planes: pl.DataFrame, n: int = 96) -> list[dict]:
    """Booking records that exercise every branch of the features against these tables.

    Flights at the local hours of weather rows spread over the table (every origin), on both
    daylight-saving changes of each year present, an origin and a carrier the model never saw,
    known and unknown tails, a tail with no build year, and weather sent with the booking.
    """
    local = weather.select(
        "origin", pl.col("time_hour").dt.convert_time_zone(ORIGIN_TIME_ZONE).alias("t")
    ).drop_nulls()
    picked = local.gather_every(max(1, local.height // n)) if local.height else local
    tails = planes.get_column("tailnum").drop_nulls().to_list()
    no_year = planes.filter(pl.col("year").is_null()).get_column("tailnum").drop_nulls()
    tails = [*tails[:: max(1, len(tails) // 20)], *no_year.head(2).to_list(), "N0NE", None]
    records: list[dict[str, Any]] = []
    for k, (origin, t) in enumerate(picked.iter_rows()):
        records.append(
            {
                "year": t.year, "month": t.month, "day": t.day,
                "sched_dep_time": t.hour * 100 + (k * 7) % 60,
                "sched_arr_time": ((t.hour + 2 + k % 5) % 24) * 100 + (k * 13) % 60,
                "carrier": ["UA", "B6", "EV", "ZZ"][k % 4], "flight": k + 1,
                "tailnum": tails[k % len(tails)], "origin": origin if k % 17 else "XYZ",
                "dest": ["ORD", "ATL", "LAX", "QQQ"][k % 4], "distance": 200.0 + k,
                **({"temp": 50.5, "visib": 3} if k % 11 == 0 else {}),
            }
        )  # fmt: skip
    years = sorted({r["year"] for r in records})
    for year in years:
        for month, day in ((3, 8), (3, 9), (3, 10), (3, 11), (3, 14), (11, 1), (11, 2), (11, 3)):
            for hhmm in (0, 130, 159, 200, 230, 259, 300, 2359):
                records.append(
                    {
                        "year": year, "month": month, "day": day, "sched_dep_time": hhmm,
                        "sched_arr_time": 1200, "carrier": "AA", "flight": len(records) + 1,
                        "tailnum": None, "origin": "JFK", "dest": "MIA", "distance": 1089.0,
                    }
                )  # fmt: skip
    return records
