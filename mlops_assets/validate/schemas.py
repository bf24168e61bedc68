"""pandera (polars backend) schemas for every table, with the keys that must be unique."""

from __future__ import annotations

from dataclasses import dataclass

import pandera.polars as pa
import polars as pl
from pandera.api.polars.types import PolarsData

UTC_DATETIME = pl.Datetime("us", "UTC")
AIRPORT_CODE = r"^[A-Z0-9]{3,4}$"


def _hhmm(data: PolarsData) -> pl.LazyFrame:
    """A clock time written HHMM (0000-2359; 2400 is the actual-time midnight)."""
    col = pl.col(data.key)
    return data.lazyframe.select(((col // 100 <= 23) & (col % 100 <= 59)) | (col == 2400))


HHMM = pa.Check(_hhmm, name="valid_hhmm", error="not a valid HHMM clock time")


def _col(dtype: pl.DataType | type[pl.DataType], *checks: pa.Check, nullable: bool = False):
    return pa.Column(dtype, checks=list(checks), nullable=nullable)


@dataclass(frozen=True)
class TableSpec:
    """A validated table: its pandera schema and the columns that identify a row."""

    name: str
    schema: pa.DataFrameSchema
    keys: tuple[str, ...]

    @property
    def dtypes(self) -> dict[str, pl.DataType]:
        return {name: col.dtype.type for name, col in self.schema.columns.items()}


FLIGHTS = TableSpec(
    name="flights",
    keys=("year", "month", "day", "carrier", "flight", "origin", "sched_dep_time"),
    schema=pa.DataFrameSchema(
        {
            "year": _col(pl.Int64, pa.Check.in_range(1990, 2100)),
            "month": _col(pl.Int64, pa.Check.in_range(1, 12)),
            "day": _col(pl.Int64, pa.Check.in_range(1, 31)),
            "dep_time": _col(pl.Int64, HHMM, nullable=True),
            "sched_dep_time": _col(pl.Int64, HHMM),
            "dep_delay": _col(pl.Float64, pa.Check.in_range(-240, 3000), nullable=True),
            "arr_time": _col(pl.Int64, HHMM, nullable=True),
            "sched_arr_time": _col(pl.Int64, HHMM),
            "arr_delay": _col(pl.Float64, pa.Check.in_range(-240, 3000), nullable=True),
            "carrier": _col(pl.String, pa.Check.str_matches(r"^[A-Z0-9]{2}$")),
            "flight": _col(pl.Int64, pa.Check.in_range(1, 9999)),
            "tailnum": _col(pl.String, pa.Check.str_matches(r"^[A-Z0-9]{2,7}$"), nullable=True),
            "origin": _col(pl.String, pa.Check.str_matches(AIRPORT_CODE)),
            "dest": _col(pl.String, pa.Check.str_matches(AIRPORT_CODE)),
            "air_time": _col(pl.Float64, pa.Check.in_range(1, 1200), nullable=True),
            "distance": _col(pl.Float64, pa.Check.in_range(1, 10_000)),
            "hour": _col(pl.Int64, pa.Check.in_range(0, 23)),
            "minute": _col(pl.Int64, pa.Check.in_range(0, 59)),
            "time_hour": _col(UTC_DATETIME),
        },
        strict=True,
        name="flights",
    ),
)

WEATHER = TableSpec(
    name="weather",
    keys=("origin", "time_hour"),
    schema=pa.DataFrameSchema(
        {
            "origin": _col(pl.String, pa.Check.str_matches(AIRPORT_CODE)),
            "year": _col(pl.Int64, pa.Check.in_range(1990, 2100)),
            "month": _col(pl.Int64, pa.Check.in_range(1, 12)),
            "day": _col(pl.Int64, pa.Check.in_range(1, 31)),
            "hour": _col(pl.Int64, pa.Check.in_range(0, 23)),
            "temp": _col(pl.Float64, pa.Check.in_range(-60, 130), nullable=True),
            "dewp": _col(pl.Float64, pa.Check.in_range(-80, 100), nullable=True),
            "humid": _col(pl.Float64, pa.Check.in_range(0, 100), nullable=True),
            "wind_dir": _col(pl.Float64, pa.Check.in_range(0, 360), nullable=True),
            # The 2013 data holds a 1,048 mph reading; no surface wind comes near 200.
            "wind_speed": _col(pl.Float64, pa.Check.in_range(0, 200), nullable=True),
            "wind_gust": _col(pl.Float64, pa.Check.in_range(0, 250), nullable=True),
            "precip": _col(pl.Float64, pa.Check.in_range(0, 10), nullable=True),
            "pressure": _col(pl.Float64, pa.Check.in_range(870, 1090), nullable=True),
            "visib": _col(pl.Float64, pa.Check.in_range(0, 100), nullable=True),
            "time_hour": _col(UTC_DATETIME),
        },
        strict=True,
        name="weather",
    ),
)

PLANES = TableSpec(
    name="planes",
    keys=("tailnum",),
    schema=pa.DataFrameSchema(
        {
            "tailnum": _col(pl.String, pa.Check.str_matches(r"^[A-Z0-9]{2,7}$")),
            "year": _col(pl.Int64, pa.Check.in_range(1900, 2100), nullable=True),
            "type": _col(pl.String, nullable=True),
            "manufacturer": _col(pl.String, nullable=True),
            "model": _col(pl.String, nullable=True),
            "engines": _col(pl.Int64, pa.Check.in_range(0, 8), nullable=True),
            "seats": _col(pl.Int64, pa.Check.in_range(1, 1000), nullable=True),
            "speed": _col(pl.Int64, pa.Check.in_range(0, 1000), nullable=True),
            "engine": _col(pl.String, nullable=True),
        },
        strict=True,
        name="planes",
    ),
)

AIRPORTS = TableSpec(
    name="airports",
    keys=("faa",),
    schema=pa.DataFrameSchema(
        {
            "faa": _col(pl.String, pa.Check.str_matches(AIRPORT_CODE)),
            "name": _col(pl.String),
            "lat": _col(pl.Float64, pa.Check.in_range(-90, 90)),
            "lon": _col(pl.Float64, pa.Check.in_range(-180, 180)),
            "alt": _col(pl.Int64, pa.Check.in_range(-1500, 30_000)),
            "tz": _col(pl.Int64, pa.Check.in_range(-12, 14)),
            "dst": _col(pl.String, pa.Check.isin(["A", "E", "N", "O", "S", "U", "Z"])),
            "tzone": _col(pl.String, nullable=True),
        },
        strict=True,
        name="airports",
    ),
)

AIRLINES = TableSpec(
    name="airlines",
    keys=("carrier",),
    schema=pa.DataFrameSchema(
        {
            "carrier": _col(pl.String, pa.Check.str_matches(r"^[A-Z0-9]{2}$")),
            "name": _col(pl.String),
        },
        strict=True,
        name="airlines",
    ),
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (FLIGHTS, WEATHER, PLANES, AIRPORTS, AIRLINES)}
