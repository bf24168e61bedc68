"""The weather HTTP source against real servers on 127.0.0.1: the happy path and each fault."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from resources.extract import SourceError, sha256_bytes
from resources.weather import WEATHER_COLUMNS, WeatherSourceResource
from resources.weather_api_server import serve_weather_api

MONTH = "2013-01"
RECORD: dict[str, Any] = {
    "origin": "EWR", "year": 2013, "month": 1, "day": 1, "hour": 1, "temp": 39.02,
    "dewp": 26.06, "humid": 59.37, "wind_dir": 270, "wind_speed": 10.357019999999999,
    "wind_gust": None, "precip": 0, "pressure": 1012.0, "visib": 10,
    "time_hour": "2013-01-01T06:00:00Z",
}  # fmt: skip


@pytest.fixture(scope="module")
def api_server() -> Iterator[HTTPServer]:
    # Pinned to 127.0.0.1 (the plugin's shared server listens on "localhost") and threaded, so
    # a retry is served while a slow handler still sleeps.
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def api(api_server: HTTPServer) -> Iterator[HTTPServer]:
    api_server.clear()
    yield api_server
    api_server.clear()


def wait_for_requests(server: HTTPServer, count: int) -> None:
    """Let slow handlers finish, so their requests are counted here and not in the next test."""
    deadline = time.monotonic() + 3
    while len(server.log) < count and time.monotonic() < deadline:
        time.sleep(0.02)


def source(server: HTTPServer, **overrides: Any) -> WeatherSourceResource:
    settings: dict[str, Any] = {
        "base_url": server.url_for("/"),
        "timeout_seconds": 2.0,
        "max_attempts": 4,
        "backoff_seconds": 0.01,
        "max_backoff_seconds": 0.05,
    }
    return WeatherSourceResource(**(settings | overrides))


def page(records: list[dict[str, Any]], number: int = 1, next_page: int | None = None) -> str:
    return json.dumps({"records": records, "page": number, "next_page": next_page})


def record(**changes: Any) -> dict[str, Any]:
    return RECORD | changes


def test_http_month_equals_the_file_default_row_for_row() -> None:
    server, thread = serve_weather_api(token="s3cret")
    try:
        base_url = f"http://127.0.0.1:{server.server_address[1]}"
        over_http = WeatherSourceResource(base_url=base_url, api_token="s3cret", page_size=500)
        extract = over_http.read_month(MONTH)
        with pytest.raises(SourceError, match="HTTP 401"):
            WeatherSourceResource(base_url=base_url, api_token="wrong").read_month(MONTH)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    from_file = WeatherSourceResource().read_month(MONTH)

    assert from_file.frame.height > 2000
    assert set(from_file.frame["origin"]) == {"EWR", "JFK", "LGA"}
    assert extract.frame.columns == WEATHER_COLUMNS
    assert all(dtype == pl.String for dtype in extract.frame.dtypes)
    assert extract.frame.equals(from_file.frame)
    assert set(extract.integrity) == {"rows", "columns", "sha256", "source"}
    assert extract.integrity["rows"] == from_file.frame.height
    assert extract.integrity["columns"] == len(WEATHER_COLUMNS)
    assert extract.source == f"{base_url}/weather?month={MONTH}"
    assert "s3cret" not in extract.source
    assert from_file.source.startswith("file://") and from_file.source.endswith("weather.csv")
    assert len(from_file.checksum) == len(extract.checksum) == 64


def test_numbers_become_their_literal_text_and_nulls_stay_null(api: HTTPServer) -> None:
    api.expect_request("/weather").respond_with_data(
        page([RECORD]), content_type="application/json"
    )
    frame = source(api).read_month(MONTH).frame
    row = frame.row(0, named=True)
    assert row["year"] == "2013" and row["wind_dir"] == "270"
    assert row["wind_speed"] == "10.357019999999999" and row["pressure"] == "1012.0"
    assert row["wind_gust"] is None


def test_429_with_retry_after_is_retried(api: HTTPServer) -> None:
    api.expect_ordered_request("/weather").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "0"}
    )
    api.expect_ordered_request("/weather").respond_with_data(page([RECORD]))
    assert source(api).read_month(MONTH).frame.height == 1
    assert len(api.log) == 2


def test_retry_after_is_capped_by_max_backoff(api: HTTPServer) -> None:
    api.expect_ordered_request("/weather").respond_with_data(
        "busy", status=503, headers={"Retry-After": "3600"}
    )
    api.expect_ordered_request("/weather").respond_with_data(page([RECORD]))
    started = time.monotonic()
    assert source(api, max_backoff_seconds=0.1).read_month(MONTH).frame.height == 1
    assert time.monotonic() - started < 2


def test_500_twice_then_success(api: HTTPServer) -> None:
    for _ in range(2):
        api.expect_ordered_request("/weather").respond_with_data("oops", status=500)
    api.expect_ordered_request("/weather").respond_with_data(page([RECORD, record(hour=2)]))
    assert source(api).read_month(MONTH).frame["hour"].to_list() == ["1", "2"]
    assert len(api.log) == 3


def test_500_forever_gives_up_after_max_attempts(api: HTTPServer) -> None:
    api.expect_request("/weather").respond_with_data("oops", status=500)
    with pytest.raises(SourceError) as failure:
        source(api, max_attempts=3).read_month(MONTH)
    assert len(api.log) == 3
    message = str(failure.value)
    assert "/weather?month=2013-01&page=1" in message
    assert "3 attempt(s)" in message and "HTTP 500" in message


def test_slow_response_times_out_is_retried_then_fails_clearly(api: HTTPServer) -> None:
    def slow(_: Request) -> Response:
        time.sleep(0.6)
        return Response(page([RECORD]), content_type="application/json")

    api.expect_request("/weather").respond_with_handler(slow)
    with pytest.raises(SourceError, match=r"2 attempt\(s\); last error: timed out after 0.2s"):
        source(api, timeout_seconds=0.2, max_attempts=2).read_month(MONTH)
    wait_for_requests(api, 2)
    assert len(api.log) == 2  # both attempts reached the server


def test_slow_then_fast_succeeds(api: HTTPServer) -> None:
    def slow(_: Request) -> Response:
        time.sleep(0.5)
        return Response(page([RECORD]))

    api.expect_ordered_request("/weather").respond_with_handler(slow)
    api.expect_ordered_request("/weather").respond_with_data(page([RECORD]))
    assert source(api, timeout_seconds=0.2).read_month(MONTH).frame.height == 1
    wait_for_requests(api, 2)


def test_connection_refused_is_retried_then_fails() -> None:
    with socket.socket() as probe:  # a free port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    resource = WeatherSourceResource(base_url=base_url, max_attempts=2, backoff_seconds=0.01)
    with pytest.raises(SourceError, match=r"2 attempt\(s\); last error: ConnectError"):
        resource.read_month(MONTH)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"records": [', "not valid JSON"),
        ("<html>Bad gateway</html>", "not valid JSON"),
        ('{"records": [{"temp": NaN}]}', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"rows": []}', "no 'records'"),
        ('{"records": {"origin": "EWR"}}', "'records' must be a list, got dict"),
        ('{"records": ["EWR"]}', "record 0 must be an object, got str"),
        (page([RECORD], next_page=1), "'next_page' must be 2 or null, got 1"),
        (page([RECORD], next_page="2"), "'next_page' must be an integer or null"),
        (page([RECORD], number=7), "asked for page 1 but the API answered page 7"),
        (page([], next_page=2), "page 1 is empty but points to page 2"),
        (page([record(temp=[1])]), "record 0 column 'temp' is list"),
        (page([]), "the API returned no weather for 2013-01"),
    ],
)
def test_bad_payloads_fail_clearly(api: HTTPServer, body: str, expected: str) -> None:
    api.expect_request("/weather").respond_with_data(body)
    with pytest.raises(SourceError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        source(api).read_month(MONTH)
    assert len(api.log) == 1  # a bad payload is not retried


def test_missing_columns_are_named(api: HTTPServer) -> None:
    incomplete = {k: v for k, v in RECORD.items() if k not in ("wind_gust", "visib")}
    api.expect_request("/weather").respond_with_data(page([RECORD, incomplete]))
    with pytest.raises(
        SourceError, match=r"record 1 is missing column\(s\) \['wind_gust', 'visib'\]"
    ):
        source(api).read_month(MONTH)


def test_404_fails_at_once(api: HTTPServer) -> None:
    api.expect_request("/weather").respond_with_data("no such month", status=404)
    with pytest.raises(SourceError, match=r"HTTP 404 NOT FOUND \(not retried\): 'no such month'"):
        source(api).read_month(MONTH)
    assert len(api.log) == 1


def test_bearer_token_is_sent_when_set(api: HTTPServer) -> None:
    api.expect_request("/weather", headers={"Authorization": "Bearer s3cret"}).respond_with_data(
        page([RECORD])
    )
    extract = source(api, api_token="s3cret").read_month(MONTH)
    assert extract.frame.height == 1
    assert "s3cret" not in extract.source


def test_no_authorization_header_without_token(api: HTTPServer) -> None:
    api.expect_request("/weather").respond_with_data(page([RECORD]))
    source(api).read_month(MONTH)
    request, _ = api.log[0]
    assert "Authorization" not in request.headers


def test_multi_page_response_is_read_in_order(api: HTTPServer) -> None:
    bodies = [
        page([record(hour=1), record(hour=2)], number=1, next_page=2),
        page([record(hour=3), record(hour=4)], number=2, next_page=3),
        page([record(hour=5)], number=3, next_page=None),
    ]
    for number, body in enumerate(bodies, start=1):
        api.expect_ordered_request(
            "/weather",
            query_string={"month": MONTH, "page": str(number), "page_size": "2"},
        ).respond_with_data(body)
    extract = source(api, page_size=2).read_month(MONTH)
    assert extract.frame["hour"].to_list() == ["1", "2", "3", "4", "5"]
    assert extract.checksum == sha256_bytes(*(b.encode() for b in bodies))
    assert len(api.log) == 3
    api.check_assertions()


def test_bad_settings_and_months_are_rejected(api: HTTPServer) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        source(api).read_month("2013-13")
    with pytest.raises(ValueError, match="http:// or https://"):
        WeatherSourceResource(base_url="ftp://example.org").read_month(MONTH)
    with pytest.raises(SourceError, match="no weather for 2014-01"):
        WeatherSourceResource().read_month("2014-01")
    assert api.log == []
