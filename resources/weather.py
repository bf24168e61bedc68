"""The HTTP API source: hourly weather read from a paginated JSON API, or from the package's file.

The API contract (``resources.weather_api_server`` serves it for demos and tests)::

    GET {base_url}/weather?month=YYYY-MM&page=N&page_size=K      (pages start at 1)
    Authorization: Bearer <api_token>                             (only when a token is set)

    200 {"records": [{"origin": "EWR", "year": "2013", ..., "time_hour": "..."}, ...],
         "page": N,
         "next_page": N + 1 or null}

Each record is an object holding at least the ``WEATHER_COLUMNS`` (extra keys are ignored);
values are strings, numbers or null. ``next_page`` is followed until it is null; ``page``, when
present, must echo the requested page. 429, 5xx, timeouts and transport errors are retried per
page with exponential backoff and jitter (a numeric ``Retry-After`` on 429/503 is honoured);
any other non-200 answer, and any payload that breaks the contract, is a ``SourceError``.

An empty ``base_url`` is the embedded default: the month is read from the package's
``weather.csv`` instead, every column as text like the raw flights.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import dagster as dg
import httpx
import polars as pl
import tenacity

from resources.extract import Extract, SourceError, frame_checksum, sha256_bytes
from resources.files import parse_month
from resources.package_data import NULL_VALUES, package_file

logger = logging.getLogger(__name__)

WEATHER_COLUMNS = [
    "origin", "year", "month", "day", "hour", "temp", "dewp", "humid", "wind_dir",
    "wind_speed", "wind_gust", "precip", "pressure", "visib", "time_hour",
]  # fmt: skip
# Statuses worth another try: the server is busy or broken now, the request itself is fine.
_RETRY_AFTER_STATUSES = (429, 503)
_EXCERPT_CHARS = 200


class _RetryableStatus(Exception):
    """A 429 or 5xx answer; carries what the wait strategy and the final error need."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


def _retry_after_seconds(response: httpx.Response) -> float | None:
    """A numeric ``Retry-After`` on 429/503; HTTP-date forms fall back to our own backoff."""
    if response.status_code not in _RETRY_AFTER_STATUSES:
        return None
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else flat[:_EXCERPT_CHARS] + "..."


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are a Python extension, not JSON: a server sending them is broken.
    raise ValueError(f"{name} is not valid JSON")


def _describe_failure(exc: BaseException | None, timeout_seconds: float) -> str:
    if isinstance(exc, _RetryableStatus):
        return f"last status HTTP {exc.status}"
    if isinstance(exc, httpx.TimeoutException):
        return f"last error: timed out after {timeout_seconds}s ({type(exc).__name__})"
    return f"last error: {type(exc).__name__}: {exc}"


def _as_text(value: object, where: str, index: int, column: str) -> str | None:
    """Cell value as text, so the raw layer has the same string columns as the files."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise SourceError(
        f"{where}: record {index} column {column!r} is {type(value).__name__} {value!r}; "
        "expected a string, a number or null"
    )


def parse_weather_page(
    body: bytes, where: str, page: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Validate one page body against the contract; returns its records and the next page."""
    try:
        # Floats stay as their literal text ("10.357019999999999"), exactly as a CSV has them;
        # a float round trip would rewrite them and break equality with the file source.
        payload = json.loads(body, parse_float=str, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep to decode
        text = body.decode("utf-8", "replace")
        raise SourceError(
            f"{where}: the body is not valid JSON ({exc}): {_excerpt(text)!r}"
        ) from exc
    if not isinstance(payload, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(payload).__name__}")
    if "records" not in payload:
        raise SourceError(f"{where}: the JSON object has no 'records'; keys: {sorted(payload)}")
    records = payload["records"]
    if not isinstance(records, list):
        raise SourceError(f"{where}: 'records' must be a list, got {type(records).__name__}")
    echoed = payload.get("page", page)
    if type(echoed) is not int or echoed != page:
        raise SourceError(f"{where}: asked for page {page} but the API answered page {echoed!r}")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise SourceError(
                f"{where}: record {index} must be an object, got {type(record).__name__}"
            )
        missing = [c for c in WEATHER_COLUMNS if c not in record]
        if missing:
            raise SourceError(f"{where}: record {index} is missing column(s) {missing}")
    next_page = payload.get("next_page")
    if next_page is not None and type(next_page) is not int:
        raise SourceError(f"{where}: 'next_page' must be an integer or null, got {next_page!r}")
    # Only "the next page" or "done" are accepted, so a broken server cannot loop us forever.
    if next_page is not None and next_page != page + 1:
        raise SourceError(f"{where}: 'next_page' must be {page + 1} or null, got {next_page}")
    if next_page is not None and not records:
        raise SourceError(f"{where}: page {page} is empty but points to page {next_page}")
    return records, next_page


class WeatherSourceResource(dg.ConfigurableResource):
    """Hourly weather by month from a JSON HTTP API; ``base_url`` empty means the package's file."""

    base_url: str = ""
    api_token: str = ""
    page_size: int = 5000
    timeout_seconds: float = 10.0
    max_attempts: int = 5
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 8.0

    @property
    def display_url(self) -> str:
        """The base URL without credentials or trailing slash: safe for logs and metadata."""
        return str(httpx.URL(self.base_url).copy_with(userinfo=b"")).rstrip("/")

    def read_month(self, month: str) -> Extract:
        year, month_number = parse_month(month)
        if not self.base_url:
            return self._read_file(month, year, month_number)
        return self._read_api(month)

    def _read_file(self, month: str, year: int, month_number: int) -> Extract:
        path = package_file("weather.csv")
        weather = pl.read_csv(path, infer_schema=False, null_values=NULL_VALUES)
        frame = weather.filter(
            (pl.col("year") == str(year)) & (pl.col("month") == str(month_number))
        ).select(WEATHER_COLUMNS)
        if frame.is_empty():
            raise SourceError(f"{path}: no weather for {month} (the file covers 2013-01..2013-12)")
        return Extract(frame=frame, source=path.as_uri(), checksum=frame_checksum(frame))

    def _check_settings(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url must start with http:// or https://, got {self.display_url!r}"
            )
        for name in ("page_size", "timeout_seconds", "max_attempts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ValueError("backoff_seconds and max_backoff_seconds must not be negative")

    def _wait(self) -> tenacity.wait.wait_base:
        backoff = tenacity.wait_exponential_jitter(
            multiplier=self.backoff_seconds,
            max=self.max_backoff_seconds,
            jitter=self.backoff_seconds,
        )

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _RetryableStatus) and exc.retry_after is not None:
                return min(exc.retry_after, self.max_backoff_seconds)
            return backoff(state)

        return wait  # type: ignore[return-value]  # tenacity accepts any callable

    def _get_page(
        self, client: httpx.Client, url: str, params: dict[str, Any], where: str
    ) -> bytes:
        response = client.get(url, params=params)
        if response.status_code == 429 or response.status_code >= 500:
            raise _RetryableStatus(response.status_code, _retry_after_seconds(response))
        if response.status_code != 200:
            raise SourceError(
                f"{where}: HTTP {response.status_code} {response.reason_phrase} (not retried): "
                f"{_excerpt(response.text)!r}"
            )
        return response.content

    def _read_api(self, month: str) -> Extract:
        self._check_settings()
        url = f"{self.base_url.rstrip('/')}/weather"
        source = f"{self.display_url}/weather?month={month}"
        headers = {"Accept": "application/json"}
        if self.api_token:
            headers["Authorization"] = f"Bearer {self.api_token}"
        retrying = tenacity.Retrying(
            # Transport errors include timeouts; UnsupportedProtocol cannot happen (scheme checked).
            retry=tenacity.retry_if_exception_type((_RetryableStatus, httpx.TransportError)),
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self._wait(),
            before_sleep=tenacity.before_sleep_log(logger, logging.WARNING),
        )
        bodies: list[bytes] = []
        records: list[dict[str, Any]] = []
        page: int | None = 1
        with httpx.Client(timeout=self.timeout_seconds, headers=headers) as client:
            while page is not None:
                params = {"month": month, "page": page, "page_size": self.page_size}
                where = f"GET {source}&page={page}&page_size={self.page_size}"
                try:
                    body = retrying(self._get_page, client, url, params, where)
                except tenacity.RetryError as exc:
                    last = exc.last_attempt
                    raise SourceError(
                        f"{where}: page {page} failed after {last.attempt_number} attempt(s); "
                        f"{_describe_failure(last.exception(), self.timeout_seconds)}"
                    ) from last.exception()
                except httpx.HTTPError as exc:
                    raise SourceError(f"{where}: {type(exc).__name__}: {exc}") from exc
                page_records, next_page = parse_weather_page(body, where, page)
                bodies.append(body)
                records.extend(page_records)
                page = next_page
        if not records:
            raise SourceError(f"the API returned no weather for {month} ({source})")
        frame = pl.DataFrame(
            {
                column: [
                    _as_text(record[column], source, index, column)
                    for index, record in enumerate(records)
                ]
                for column in WEATHER_COLUMNS
            },
            schema=dict.fromkeys(WEATHER_COLUMNS, pl.String),
        )
        return Extract(frame=frame, source=source, checksum=sha256_bytes(*bodies))
