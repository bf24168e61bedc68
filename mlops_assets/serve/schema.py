"""The serving contract's request and response bodies (pydantic v2).

A record is a flight as a booking system knows it before departure: exactly the booking columns
of :data:`mlops_assets.features.transform.BOOKING_COLUMNS`, optionally with the origin weather
fields. Everything else the model needs is looked up from the reference tables deployed with the
model. Validation is strict (no coercion of ``"5"`` to ``5``, no booleans as numbers), unknown
fields are refused and NaN/infinity are rejected, so a malformed record never reaches the model.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

DEFAULT_MAX_RECORDS = 1000


@dataclass(frozen=True)
class ServingDefaults:
    """Serving knobs' defaults (they suit a 2-core machine), shared by the deployment's
    ``ServeConfig`` and the ``served_model`` asset's run config without importing Ray here."""

    num_replicas: int = 1
    replica_num_cpus: float = 1.0
    # @serve.batch: up to max_batch_size records scored together, waiting at most this long for
    # company.
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.002
    # Ray's default max_ongoing_requests (5) throttles a batching replica to ~13 req/s; past
    # max_queued_requests waiting at the proxy, callers get a fast 503 instead of a pile-up.
    max_ongoing_requests: int = 128
    max_queued_requests: int = 256
    max_records: int = DEFAULT_MAX_RECORDS


SERVING = ServingDefaults()

# Same patterns as the pandera schemas the training data passed (validate/schemas.py), so a
# record the service accepts is one the pipeline would have accepted too.
CARRIER_PATTERN = r"^[A-Z0-9]{2}$"
AIRPORT_PATTERN = r"^[A-Z0-9]{3,4}$"
TAILNUM_PATTERN = r"^[A-Z0-9]{2,7}$"

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

HHMM = Annotated[int, Field(ge=0, le=2359, description="local clock time written HHMM")]


def _weather(low: float, high: float, what: str) -> Any:
    return Field(default=None, ge=low, le=high, description=f"origin weather that hour: {what}")


class FlightRecord(BaseModel):
    """One flight as booked: what is known before departure."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [
                {
                    "year": 2013, "month": 1, "day": 1, "sched_dep_time": 515,
                    "sched_arr_time": 819, "carrier": "UA", "flight": 1545,
                    "tailnum": "N14228", "origin": "EWR", "dest": "IAH", "distance": 1400.0,
                }
            ]
        },
    )  # fmt: skip

    year: int = Field(ge=1990, le=2100)
    month: int = Field(ge=1, le=12)
    day: int = Field(ge=1, le=31, description="day of month; must form a valid date")
    sched_dep_time: HHMM
    sched_arr_time: HHMM
    carrier: str = Field(pattern=CARRIER_PATTERN, description="two-character carrier code")
    flight: int = Field(ge=1, le=9999)
    tailnum: str | None = Field(default=None, pattern=TAILNUM_PATTERN)
    origin: str = Field(pattern=AIRPORT_PATTERN, description="FAA airport code, upper case")
    dest: str = Field(pattern=AIRPORT_PATTERN, description="FAA airport code, upper case")
    distance: float = Field(gt=0, le=10_000, description="route distance, miles")
    # Optional weather; when given it wins over the looked-up value (ranges as validate/schemas).
    temp: float | None = _weather(-60, 130, "temperature, °F")
    dewp: float | None = _weather(-80, 100, "dew point, °F")
    humid: float | None = _weather(0, 100, "relative humidity, %")
    wind_dir: float | None = _weather(0, 360, "wind direction, degrees")
    wind_speed: float | None = _weather(0, 200, "wind speed, mph")
    wind_gust: float | None = _weather(0, 250, "wind gust, mph")
    precip: float | None = _weather(0, 10, "precipitation, inches")
    pressure: float | None = _weather(870, 1090, "sea level pressure, millibars")
    visib: float | None = _weather(0, 100, "visibility, miles")

    @field_validator("day")
    @classmethod
    def _valid_date(cls, day: int, info: ValidationInfo) -> int:
        year, month = info.data.get("year"), info.data.get("month")
        if year is None or month is None:
            return day  # the year or month error is already reported; do not pile on
        try:
            dt.date(year, month, day)
        except ValueError:
            raise ValueError(f"{year:04d}-{month:02d}-{day:02d} is not a valid date") from None
        return day

    @field_validator("sched_dep_time", "sched_arr_time")
    @classmethod
    def _valid_hhmm(cls, value: int) -> int:
        if value % 100 > 59:
            raise ValueError(f"{value:04d} is not a valid HHMM clock time (minutes above 59)")
        return value


class PredictRequest(BaseModel):
    """A batch of flights to score; answers come back in the same order."""

    model_config = _STRICT

    flights: list[FlightRecord] = Field(min_length=1, max_length=DEFAULT_MAX_RECORDS)


@cache
def predict_request_model(max_records: int = DEFAULT_MAX_RECORDS) -> type[PredictRequest]:
    """``PredictRequest`` with its own record limit (shown in OpenAPI as ``maxItems``).

    pydantic checks a list's length before validating its items, so an oversized batch is
    refused in constant time per item, and the error names the path ``flights``.
    """
    if max_records < 1:
        raise ValueError(f"max_records must be at least 1, got {max_records}")
    if max_records == DEFAULT_MAX_RECORDS:
        return PredictRequest
    return create_model(
        "PredictRequest",
        __base__=PredictRequest,
        __doc__=PredictRequest.__doc__,
        flights=(list[FlightRecord], Field(min_length=1, max_length=max_records)),
    )


@cache
def parsing_request_model(max_records: int = DEFAULT_MAX_RECORDS) -> type[BaseModel]:
    """``predict_request_model(max_records)`` without ``FlightRecord``'s Python validators.

    Same fields, types and constraints, checked in Rust only: a valid body parses ~1.5x faster.
    The two rules left out (the date exists, the clock times exist) must then be checked on the
    columns (:func:`~mlops_assets.serve.columnar.impossible_calendar_rows`), and any body that
    fails either check is validated again by the full model for its exact errors.
    """
    fields: dict[str, Any] = {
        name: (info.annotation, info) for name, info in FlightRecord.model_fields.items()
    }
    record = create_model("FlightRecordFields", __config__=_STRICT, **fields)
    full = predict_request_model(max_records).model_fields["flights"]
    return create_model("PredictRequestFields", __config__=_STRICT, flights=(list[record], full))


class Prediction(BaseModel):
    delay_probability: float = Field(ge=0.0, le=1.0, description="P(arrival > 15 min late)")
    delayed: bool = Field(description="delay_probability at or above the model's threshold")


class PredictResponse(BaseModel):
    model_version: str
    predictions: list[Prediction]


class Health(BaseModel):
    status: str
    model_version: str | None


class ErrorItem(BaseModel):
    type: str
    loc: list[str | int]
    msg: str


class ErrorBody(BaseModel):
    detail: str | list[ErrorItem]
