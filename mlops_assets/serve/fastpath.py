"""Model inputs without polars: the shared feature function's values, vectorized with numpy.

:func:`~mlops_assets.features.transform.build_features` plus :meth:`Preprocessor.transform`
cost ~3-4 ms per call for a few records (polars planning a lazy query with three joins) and
~14 ms for 1,000. :class:`FastMatrix` computes the same matrix from the records' columns
(:class:`~mlops_assets.serve.columnar.Bookings`) with numpy: ~0.1 ms for one record, ~1 ms for
1,000 (calendar arithmetic, one ``searchsorted`` per origin into the weather hours, dictionary
lookups for planes and category codes).

It is a second implementation of the same definitions, so it is never trusted blindly:

- it knows exactly one feature list; if :data:`FEATURE_NAMES` (or the preprocessing's column
  order) is anything else, it is not built and serving uses the feature function;
- it is built only when the reference tables have unique join keys and the typed ``time_hour``
  the feature function produces (otherwise the polars path's own checks apply);
- the predictor compares it, bit for bit, with the feature function on a sample of
  records spanning the reference tables (every origin, DST days, unknown planes and codes),
  every time a model is loaded; on any difference the predictor falls back to the polars path.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    NUMERIC_FEATURES,
    ORIGIN_TIME_ZONE,
    PAST_WEATHER_FIELDS,
    WEATHER_FIELDS,
    WEATHER_HISTORY,
    WEATHER_HISTORY_FIELDS,
    weather_history,
)
from mlops_assets.serve.columnar import Bookings

# The feature list this module implements, in the preprocessing's column order.
KNOWN_FEATURES = (
    "dep_hour", "dep_minute_of_day", "arr_minute_of_day", "sched_block_minutes", "weekday",
    "distance", *WEATHER_FIELDS, *WEATHER_HISTORY_FIELDS, "plane_age", "seats", "engines",
    "carrier", "origin", "dest",
)  # fmt: skip
_NAN = math.nan
_WX = len(WEATHER_FIELDS)
# Each history feature, in feature order: (scheduled-hour field's index, past column's index in
# the looked-up row, combination).
_HISTORY = tuple(
    (WEATHER_FIELDS.index(h.field), _WX + i, h.how) for i, h in enumerate(WEATHER_HISTORY.values())
)


@lru_cache(maxsize=1 << 16)
def utc_hour_us(year: int, month: int, day: int, hour: int) -> int | None:
    """The local scheduled hour in UTC microseconds, as ``feature_frame`` computes ``time_hour``.

    Ambiguous (fall back) hours take the earliest instant, like ``ambiguous="earliest"``; hours
    skipped by spring forward have no instant (None), like ``non_existent="null"``. Read from
    the year's table, which polars computes: past 2037 its time zone rules differ from
    ``zoneinfo``'s (no daylight saving time), and the feature function is polars.
    """
    first = dt.date(year, 1, 1).toordinal()
    us = int(_year_hours_us(year)[(dt.date(year, month, day).toordinal() - first) * 24 + hour])
    return None if us == _NO_INSTANT else us


class FastMatrix:
    """Builds the model matrix of :meth:`Preprocessor.transform` for booking records."""

    def __init__(
        self, weather: pl.DataFrame, planes: pl.DataFrame, preprocessor: Preprocessor
    ) -> None:
        self.weather_keys: dict[str, np.ndarray] = {}
        # Per origin and hour: the weather fields, then the past-hours aggregates.
        self.weather_values: dict[str, np.ndarray] = {}
        if not set(PAST_WEATHER_FIELDS) <= set(weather.columns):
            weather = weather_history(weather).collect()
        looked_up = (*WEATHER_FIELDS, *PAST_WEATHER_FIELDS)
        frame = weather.select(
            "origin",
            pl.col("time_hour").dt.epoch("us").alias("__us"),
            *(pl.col(w).cast(pl.Float64) for w in looked_up),
        ).sort("origin", "__us")
        for (origin,), part in frame.group_by("origin", maintain_order=True):
            if origin is None:
                continue
            keys = part.get_column("__us").to_numpy()
            self.weather_keys[origin] = keys
            self.weather_values[origin] = (
                part.select(looked_up).to_numpy(order="c").astype(np.float64, copy=False)
            )
        self.weather_origin_index = {o: i for i, o in enumerate(self.weather_keys)}
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
        # The same values as rows of one array, for the vectorized path: a tail's row number,
        # then one gather (the last row, all NaN, is the unknown tail's).
        self.plane_row = {tail: i for i, tail in enumerate(self.planes)}
        self.plane_table = np.array(
            [*self.planes.values(), (_NAN, _NAN, _NAN)], dtype=np.float64
        ).reshape(-1, 3)
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

    def matrix(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``Preprocessor.transform(build_features(records, ...)).to_numpy()``, float64, C order."""
        return self.bookings_matrix(Bookings.from_records(records))

    def bookings_matrix(self, bookings: Bookings) -> np.ndarray:
        """The same matrix from booking columns: record by record for a few, else vectorized."""
        if bookings.n <= ROWS_MAX_RECORDS:
            return self.rows_matrix(bookings)
        return self.columns_matrix(bookings)

    def _weather(self, origin: str, hour_us: int | None) -> np.ndarray | None:
        keys = self.weather_keys.get(origin)
        if keys is None or hour_us is None:
            return None
        i = int(np.searchsorted(keys, hour_us))
        if i < len(keys) and keys[i] == hour_us:
            return self.weather_values[origin][i]
        return None

    def rows_matrix(self, bookings: Bookings) -> np.ndarray:
        """The matrix in plain Python, record by record (~12 us each, no numpy call overhead)."""
        x = np.empty((bookings.n, len(KNOWN_FEATURES)), dtype=np.float64)
        carriers, origins, dests = (self.codes[c] for c in CATEGORICAL_FEATURES)
        rows = zip(*(bookings.columns[c] for c in _ROW_FIELDS), strict=True)
        for i, (year, month, day, dep, arr, carrier, tailnum, origin, dest, distance, *sent) in (
            enumerate(rows)
        ):  # fmt: skip
            dep_hour = dep // 100
            dep_min = dep_hour * 60 + dep % 100
            arr_min = arr // 100 * 60 + arr % 100
            looked_up = self._weather(origin, utc_hour_us(year, month, day, dep_hour))
            weather = [
                float(given)
                if given is not None and given == given  # None or NaN: not sent
                else (_NAN if looked_up is None else looked_up[k])
                for k, given in enumerate(sent)
            ]
            history = [
                _combine(weather[now], _NAN if looked_up is None else looked_up[past], how)
                for now, past, how in _HISTORY
            ]
            plane = self.planes.get(tailnum) if tailnum is not None else None
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
                float(distance),
                *weather,
                *history,
                plane_age,
                seats,
                engines,
                carriers.get(carrier, _NAN),
                origins.get(origin, _NAN),
                dests.get(dest, _NAN),
            )
        return x

    def columns_matrix(self, bookings: Bookings) -> np.ndarray:
        """The matrix vectorized over the columns (~90 us fixed, then ~1-2 us a record)."""
        columns, n = bookings.columns, bookings.n
        x = np.empty((n, len(KNOWN_FEATURES)), dtype=np.float64)
        if n == 0:
            return x
        year, month, day, dep, arr = (
            _ints(columns[c]) for c in ("year", "month", "day", "sched_dep_time", "sched_arr_time")
        )
        dep_hour = dep // 100
        dep_min = dep_hour * 60 + dep % 100
        arr_min = arr // 100 * 60 + arr % 100
        x[:, 0] = dep_hour
        x[:, 1] = dep_min
        x[:, 2] = arr_min
        x[:, 3] = (arr_min - dep_min) % 1440
        days = _days_since_epoch(year, month, day)
        x[:, 4] = (days + 3) % 7 + 1  # 1970-01-01 was a Thursday
        x[:, 5] = _floats(columns["distance"])
        origins = columns["origin"]
        looked_up = self._weather_rows(origins, year, days, dep_hour)
        x[:, 6 : 6 + _WX] = looked_up[:, :_WX]
        for k, w in enumerate(WEATHER_FIELDS):
            given = columns[w]
            if not (isinstance(given, list) and given.count(None) == n):
                values = _floats(given)
                sent = ~np.isnan(values)
                x[sent, 6 + k] = values[sent]
        for j, (now, past, how) in enumerate(_HISTORY):
            x[:, 6 + _WX + j] = _combine_columns(x[:, 6 + now], looked_up[:, past], how)
        plane_at = 6 + _WX + len(_HISTORY)
        # map(dict.get, ...) runs the lookups in C: ~3x faster than a comprehension; row
        # numbers then one gather: ~4x faster than building an array from the value tuples.
        rows = np.fromiter(
            map(self.plane_row.get, columns["tailnum"], itertools.repeat(-1, n)), np.int64, n
        )
        found = self.plane_table[rows]
        x[:, plane_at] = year - found[:, 0]  # no build year: NaN
        x[:, plane_at + 1 : plane_at + 3] = found[:, 1:]
        for k, c in enumerate(CATEGORICAL_FEATURES):
            x[:, plane_at + 3 + k] = np.fromiter(
                map(self.codes[c].get, columns[c], itertools.repeat(_NAN, n)), np.float64, n
            )
        return x

    def _weather_rows(
        self,
        origins: Sequence[str | None],
        year: np.ndarray,
        days: np.ndarray,
        hour: np.ndarray,
    ) -> np.ndarray:
        """Origin weather at each record's scheduled local hour, then the past-hours aggregates
        (NaN where none is recorded)."""
        n = len(origins)
        out = np.full((n, _WX + len(PAST_WEATHER_FIELDS)), _NAN)
        # The instant of each local hour, from a table per year (one gather, no Python loop).
        slot = (days - _days_since_epoch(year, np.ones_like(year), np.ones_like(year))) * 24 + hour
        years = np.unique(year).tolist()
        if len(years) == 1:
            instants = _year_hours_us(years[0])[slot]
        else:
            instants = np.empty(n, dtype=np.int64)
            for y in years:
                mine = year == y
                instants[mine] = _year_hours_us(y)[slot[mine]]
        index = self.weather_origin_index
        origin_at = np.fromiter(map(index.get, origins, itertools.repeat(-1)), np.int64, n)
        known = instants != _NO_INSTANT
        for origin in index.keys() & set(origins):  # only the origins present
            rows = np.flatnonzero((origin_at == index[origin]) & known)
            if rows.size == 0:
                continue
            hours = self.weather_keys[origin]
            at = np.minimum(np.searchsorted(hours, instants[rows]), len(hours) - 1)
            hit = hours[at] == instants[rows]
            out[rows[hit]] = self.weather_values[origin][at[hit]]
        return out


_NO_INSTANT = np.iinfo(np.int64).min  # no such local hour (skipped by spring forward)


@lru_cache(maxsize=256)
def _year_hours_us(year: int) -> np.ndarray:
    """The UTC instant of every local hour of ``year``, at ``(day of year - 1) * 24 + hour``.

    Computed as ``feature_frame`` computes ``time_hour`` (polars, ~4 ms a year, ~70 KB), so a
    request's hours are one numpy gather instead of a call per distinct hour (~0.2 ms for
    1,000 records).
    """
    local = pl.datetime_range(
        dt.datetime(year, 1, 1), dt.datetime(year, 12, 31, 23), "1h", time_unit="us", eager=True
    )
    instants = local.dt.replace_time_zone(
        ORIGIN_TIME_ZONE, ambiguous="earliest", non_existent="null"
    ).dt.epoch("us")
    table = instants.fill_null(_NO_INSTANT).to_numpy().astype(np.int64)
    table.flags.writeable = False  # shared by every request
    return table


# Up to this many records the plain-Python loop beats numpy's per-call overhead (measured: one
# record 12 us vs ~90 us).
ROWS_MAX_RECORDS = 8
_ROW_FIELDS = (
    "year", "month", "day", "sched_dep_time", "sched_arr_time", "carrier", "tailnum", "origin",
    "dest", "distance", *WEATHER_FIELDS,
)  # fmt: skip


def _combine(now: float, past: float, how: str) -> float:
    """:func:`~mlops_assets.features.transform.combine_history` for one record (NaN = null)."""
    if how == "change":
        return now - past
    if now != now:  # a missing side is skipped
        return past
    if past != past:
        return now
    return _COMBINE[how](now, past)


_COMBINE = {"sum": operator.add, "min": min, "max": max}


def _combine_columns(now: np.ndarray, past: np.ndarray, how: str) -> np.ndarray:
    """:func:`~mlops_assets.features.transform.combine_history` over columns (NaN = null)."""
    if how == "change":
        return now - past
    if how == "min":
        return np.fmin(now, past)
    if how == "max":
        return np.fmax(now, past)
    both_missing = np.isnan(now) & np.isnan(past)
    total = np.where(np.isnan(now), 0.0, now) + np.where(np.isnan(past), 0.0, past)
    return np.where(both_missing, _NAN, total)


def _ints(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _floats(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)  # None becomes NaN


def _days_since_epoch(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days from 1970-01-01 to each (valid) date, by numpy's calendar arithmetic."""
    first = np.datetime64("1970-01", "M") + ((year - 1970) * 12 + month - 1)
    return first.astype("datetime64[D]").astype(np.int64) + (day - 1)


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
                **({"temp": 50.5, "visib": 3, "precip": 0.02, "pressure": 1012.5}
                   if k % 11 == 0 else {}),
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
