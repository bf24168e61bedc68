"""Fuzzing the three sources with hypothesis: malformed files in landing, broken tables in a real
SQLite file, and a real HTTP server on 127.0.0.1 answering garbage, wrong shapes, 429/5xx and
timeouts.

The contract for any input: either a ``SourceError`` whose message names the source (the file,
the query, the URL), or rows that go on to validation, where rows in = valid + quarantined, every
valid row passes the schema again and belongs to the month it arrived for. Nothing else may
escape (no ``KeyError``, no polars error, no ``RecursionError``). And a failing asset writes
nothing to the warehouse.

Examples are bounded and derandomized by default (the same cases every run, a few seconds per
source); ``MLOPS_RELIABILITY=full`` runs more, random ones.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from mlops_assets.validate.quarantine import ValidationOutcome, validate_table
from mlops_assets.validate.schemas import TABLES
from resources.database import ReferenceDatabaseResource
from resources.extract import SourceError
from resources.files import FLIGHT_COLUMNS, LandingFilesResource
from resources.package_data import read_package_flights_text
from resources.weather import WEATHER_COLUMNS, WeatherSourceResource
from tests.test_pipeline import failure_message, materialize

MONTH = "2013-03"
FULL = os.environ.get("MLOPS_RELIABILITY") == "full"
OUTCOMES: dict[str, Counter[str]] = {"file": Counter(), "sql": Counter(), "api": Counter()}
FUZZ = settings(
    max_examples=300 if FULL else 40,
    derandomize=not FULL,
    database=None,
    deadline=None if FULL else 20_000,  # ms; generous: CI machines are shared
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REAL_ROWS = read_package_flights_text().filter(pl.col("month") == "3").head(30)

cells = st.one_of(
    st.sampled_from(["", "NA", "NaN", "inf", "-inf", "1e308", "-0", "12.5", "2013", "EWR", "UA"]),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    frame = pl.DataFrame(
        {name: [r[i] if i < len(r) else None for r in rows] for i, name in enumerate(header)},
        schema=dict.fromkeys(header, pl.String),
    )
    return frame.write_csv().encode("utf-8")


@st.composite
def mutated_real_month(draw: st.DrawFn) -> bytes:
    """Real March rows with some cells replaced: wrong types, huge values, other months."""
    frame = REAL_ROWS.head(draw(st.integers(min_value=1, max_value=REAL_ROWS.height)))
    rows = [list(r) for r in frame.iter_rows()]
    for _ in range(draw(st.integers(min_value=0, max_value=20))):
        row = draw(st.integers(min_value=0, max_value=len(rows) - 1))
        column = draw(st.integers(min_value=0, max_value=len(FLIGHT_COLUMNS) - 1))
        rows[row][column] = draw(cells)
    return _csv(FLIGHT_COLUMNS, rows)


@st.composite
def wrong_columns(draw: st.DrawFn) -> bytes:
    header = draw(
        st.lists(st.sampled_from([*FLIGHT_COLUMNS, "arrival_delay", "x"]), min_size=1,
                 max_size=22, unique=True)
    )  # fmt: skip
    rows = draw(st.lists(st.lists(cells, max_size=len(header)), max_size=5))
    return _csv(header, rows)


landed_files = st.one_of(
    mutated_real_month(),
    wrong_columns(),
    st.binary(max_size=600),
    st.text(max_size=600).map(str.encode),
    st.just(b""),
    st.just((",".join(FLIGHT_COLUMNS) + "\n").encode()),
)


def _check_outcome(outcome: ValidationOutcome, rows_in: int, table: str, month: str | None) -> None:
    assert outcome.valid.height + outcome.quarantine.height == rows_in
    assert (outcome.quarantine["reason"].str.len_chars() > 0).all()
    TABLES[table].schema.validate(outcome.valid)  # what passed once passes again
    if month is not None and outcome.valid.height:
        year, number = (int(p) for p in month.split("-"))
        assert set(outcome.valid["year"]) == {year} and set(outcome.valid["month"]) == {number}


@FUZZ
@given(data=landed_files, zipped=st.booleans())
@example(data=b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00\x12\x00\x00PAR1", zipped=False)
@example(data=(",".join(FLIGHT_COLUMNS) + "\n").encode(), zipped=False)
def _fuzz_landed_file(tmp_path_factory: pytest.TempPathFactory, data: bytes, zipped: bool) -> None:
    landing = LandingFilesResource(landing_dir=str(tmp_path_factory.mktemp("landing")))
    path = landing.root / f"flights_{MONTH}.csv"
    if zipped:
        path = path.with_name(path.name + ".zip")
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"flights_{MONTH}.csv", data)
    else:
        path.write_bytes(data)
    try:
        extract = landing.read_month(MONTH)
    except SourceError as exc:
        assert str(path) in str(exc)
        OUTCOMES["file"]["refused by the file source"] += 1
        return
    assert extract.frame.columns == FLIGHT_COLUMNS and extract.frame.height > 0
    try:
        outcome = validate_table(extract.frame, TABLES["flights"], source=extract.source,
                                 partition=MONTH)  # fmt: skip
    except SourceError as exc:
        assert "flights" in str(exc)
        OUTCOMES["file"]["refused by validation (table level)"] += 1
        return
    _check_outcome(outcome, extract.frame.height, "flights", MONTH)
    OUTCOMES["file"][
        "read: " + ("some rows quarantined" if outcome.quarantine.height else "all rows valid")
    ] += 1


sql_values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.binary(max_size=6),
    st.sampled_from(["N14228", "EWR", "UA", "Fixed wing multi engine", "America/New_York"]),
)


@st.composite
def sql_tables(draw: st.DrawFn) -> tuple[str, list[str], list[str], list[tuple[Any, ...]]]:
    table = draw(st.sampled_from(["planes", "airports", "airlines"]))
    known = list(TABLES[table].dtypes)
    columns = draw(
        st.lists(st.sampled_from([*known, "extra"]), min_size=1, max_size=len(known) + 1,
                 unique=True)
    )  # fmt: skip
    declared = [draw(st.sampled_from(["INTEGER", "REAL", "TEXT", "BLOB", ""])) for _ in columns]
    rows = draw(st.lists(st.tuples(*[sql_values for _ in columns]), max_size=8))
    return table, columns, declared, rows


@FUZZ
@given(spec=sql_tables())
@example(spec=("airlines", ["carrier", "name"], ["TEXT", "TEXT"], []))
@example(spec=("planes", ["tailnum", "year"], ["TEXT", "INTEGER"], [("N1", 1999), ("N2", b"x")]))
def _fuzz_reference_table(
    tmp_path_factory: pytest.TempPathFactory, spec: tuple[str, list[str], list[str], list[Any]]
) -> None:
    table, columns, declared, rows = spec
    path = tmp_path_factory.mktemp("sql") / "reference.sqlite"
    with sqlite3.connect(path) as con:
        typed = ", ".join(f"{c} {t}" for c, t in zip(columns, declared, strict=True))
        con.execute(f"CREATE TABLE {table} ({typed})")
        con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' for _ in columns)})", rows)
    con.close()
    source = ReferenceDatabaseResource(url=f"sqlite:///{path}")
    try:
        extract = source.read_table(table)
    except SourceError as exc:
        assert f"sqlite:///{path}" in str(exc) and f"FROM {table}" in str(exc)
        OUTCOMES["sql"]["refused by the SQL source"] += 1
        return
    assert extract.frame.height == len(rows) > 0
    try:
        outcome = validate_table(extract.frame, TABLES[table], source=extract.source,
                                 partition=None)  # fmt: skip
    except SourceError as exc:
        assert table in str(exc)
        OUTCOMES["sql"]["refused by validation (table level)"] += 1
        return
    _check_outcome(outcome, extract.frame.height, table, None)
    OUTCOMES["sql"][
        "read: " + ("some rows quarantined" if outcome.quarantine.height else "all rows valid")
    ] += 1


@pytest.fixture(scope="module")
def api() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    server.start()
    yield server
    server.stop()


RECORD = {
    "origin": "EWR", "year": 2013, "month": 1, "day": 1, "hour": 1, "temp": 39.02, "dewp": 26.06,
    "humid": 59.37, "wind_dir": 270, "wind_speed": 10.35702, "wind_gust": None, "precip": 0,
    "pressure": 1012.0, "visib": 10, "time_hour": "2013-01-01T06:00:00Z",
}  # fmt: skip
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    record = dict(RECORD)
    for key in draw(st.lists(st.sampled_from(WEATHER_COLUMNS), max_size=2, unique=True)):
        if draw(st.booleans()):
            del record[key]
        else:
            record[key] = draw(json_values)
    return record


structured = st.builds(
    lambda r, p, n: json.dumps({"records": r, "page": p, "next_page": n}).encode(),
    st.lists(records(), max_size=4),
    st.sampled_from([1, 1, 1, "1"]),
    st.sampled_from([None, None, None, 2, "2"]),
)
clean = st.integers(min_value=1, max_value=5).map(
    lambda n: json.dumps({"records": [RECORD | {"hour": h} for h in range(n)]}).encode()
)
payloads = st.one_of(
    clean,
    structured,
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from([b'{"records": [', b"[" * 5000, b'{"records": [{"temp": NaN}]}', b""]),
)
faults = st.lists(st.sampled_from([429, 500, 502, 503, 504, "timeout"]), max_size=3)
MAX_ATTEMPTS = 3


def _slow(_: Request) -> Response:
    time.sleep(0.4)
    return Response(b"late", status=200)


@FUZZ
@given(faults=faults, status=st.sampled_from([200, 200, 200, 400, 404, 418]), body=payloads)
@example(faults=[], status=200, body=b"[" * 100_000)
@example(faults=[503, 429], status=200, body=json.dumps({"records": [RECORD]}).encode())
def _fuzz_api_answer(api: HTTPServer, faults: list[int | str], status: int, body: bytes) -> None:
    api.clear()
    if faults.count("timeout") > 1:  # each costs the client its timeout: keep examples fast
        faults = [f for f in faults if f != "timeout"] + ["timeout"]
    for fault in faults:
        handler = api.expect_ordered_request("/weather")
        if fault == "timeout":
            handler.respond_with_handler(_slow)
        else:
            handler.respond_with_data("busy", status=int(fault), headers={"Retry-After": "0"})
    api.expect_ordered_request("/weather").respond_with_data(body, status=status)
    source = WeatherSourceResource(
        base_url=api.url_for("/"), timeout_seconds=0.2, max_attempts=MAX_ATTEMPTS,
        backoff_seconds=0.001, max_backoff_seconds=0.01,
    )  # fmt: skip
    try:
        extract = source.read_month("2013-01")
    except SourceError as exc:
        message = str(exc)
        assert "/weather?month=2013-01" in message
        if len(faults) >= MAX_ATTEMPTS:
            assert f"{MAX_ATTEMPTS} attempt(s)" in message
        elif status != 200:
            assert f"HTTP {status}" in message
        OUTCOMES["api"]["refused by the HTTP source"] += 1
        return
    finally:
        time.sleep(0.01 if "timeout" not in faults else 0.3)  # let a slow handler finish
    assert len(faults) < MAX_ATTEMPTS and status == 200
    assert extract.frame.columns == WEATHER_COLUMNS
    assert all(dtype == pl.String for dtype in extract.frame.dtypes)
    assert extract.frame.height == len(json.loads(body)["records"]) > 0
    OUTCOMES["api"]["read" + (f" after {len(faults)} retried fault(s)" if faults else "")] += 1


@pytest.mark.parametrize("broken", ["landed file", "reference table", "weather API"])
def test_a_failing_source_asset_writes_nothing(
    broken: str,
    mlops_home: Path,
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    api: HTTPServer,
) -> None:
    api.clear()
    if broken == "landed file":
        (mlops_home / "landing").mkdir(parents=True)
        (mlops_home / "landing" / f"flights_{MONTH}.csv").write_bytes(b"\x00\xffPAR1 not a csv")
        asset, partition, names = "raw_flights", MONTH, f"flights_{MONTH}.csv"
    elif broken == "reference table":
        path = mlops_home.parent / "other.sqlite"
        with sqlite3.connect(path) as con:
            con.execute("CREATE TABLE airlines (carrier TEXT, name TEXT)")
        con.close()
        resources = {
            **resources,
            "reference_db": ReferenceDatabaseResource(url=f"sqlite:///{path}"),
        }
        asset, partition, names = "raw_airlines", None, "returned no rows"
    else:
        api.expect_request("/weather").respond_with_data('{"records": [{"origin": ')
        weather = WeatherSourceResource(base_url=api.url_for("/"), max_attempts=1)
        resources = {**resources, "weather_api": weather}
        asset, partition, names = "raw_weather", MONTH, "not valid JSON"
    result = materialize([asset], instance, resources, partition=partition)
    assert not result.success
    assert names in failure_message(result)
    warehouse = mlops_home / "warehouse"
    assert not warehouse.exists() or list(warehouse.rglob("*")) == []
    assert instance.get_latest_materialization_event(dg.AssetKey(asset)) is None


def test_rows_of_another_month_are_quarantined_not_stored_in_this_one() -> None:
    both = read_package_flights_text().filter(pl.col("month").is_in(["3", "4"]))
    both = both.with_columns(pl.all().replace("NA", None))  # as the file source reads it
    outcome = validate_table(both, TABLES["flights"], source="test", partition=MONTH)
    april = both.filter(pl.col("month") == "4").height
    assert outcome.failures_by_check[f"month: outside partition {MONTH}"] == april
    assert set(outcome.valid["month"]) == {3}
    assert outcome.valid.height + outcome.quarantine.height == both.height
    reasons = outcome.quarantine.filter(pl.col("reason").str.contains("outside partition"))
    assert reasons["reason"][0] == f"month: outside partition {MONTH} (value 2013-4)"


def _report(source: str) -> None:
    outcomes = OUTCOMES[source]
    print(f"\nFIGURES fuzz {source}: {sum(outcomes.values())} inputs, {dict(outcomes)}")
    assert outcomes, "no example ran"


def test_any_landed_file_is_read_or_refused_clearly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _fuzz_landed_file(tmp_path_factory)
    _report("file")


def test_any_reference_table_is_read_or_refused_clearly(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    _fuzz_reference_table(tmp_path_factory)
    _report("sql")


def test_any_api_answer_is_read_or_refused_clearly(api: HTTPServer) -> None:
    _fuzz_api_answer(api)
    _report("api")
