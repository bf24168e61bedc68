"""Validation with quarantine: injected faults on real rows; rows in = valid + quarantined."""

from __future__ import annotations

import json

import polars as pl
import pytest

from mlops_assets.validate.quarantine import validate_table
from mlops_assets.validate.schemas import TABLES
from resources.extract import SourceError
from resources.files import decode_csv_bytes, land_month
from resources.package_data import read_package_table


@pytest.fixture(scope="module")
def raw_january(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    path = land_month("2013-01", tmp_path_factory.mktemp("landing"))
    return decode_csv_bytes(path.read_bytes(), str(path)).head(2_000)


def _set(frame: pl.DataFrame, row: int, **values: str | None) -> pl.DataFrame:
    return frame.with_columns(
        pl.when(pl.int_range(pl.len()) == row).then(pl.lit(v)).otherwise(pl.col(c)).alias(c)
        for c, v in values.items()
    )


def test_clean_real_data_passes_whole(raw_january: pl.DataFrame) -> None:
    outcome = validate_table(raw_january, TABLES["flights"], source="test", partition="2013-01")
    assert outcome.quarantine.height == 0
    assert outcome.valid.height == raw_january.height
    assert outcome.valid.schema["time_hour"] == pl.Datetime("us", "UTC")
    assert outcome.valid.schema["arr_delay"] == pl.Float64


def test_injected_faults_are_quarantined_with_their_reason(raw_january: pl.DataFrame) -> None:
    faulty = raw_january
    faulty = _set(faulty, 3, dep_delay="soon")  # wrong type
    faulty = _set(faulty, 5, distance="-40")  # out of range
    faulty = _set(faulty, 8, sched_dep_time="1275")  # not a clock time
    faulty = _set(faulty, 13, carrier=None)  # null key
    faulty = _set(faulty, 21, time_hour="yesterday")  # unparseable timestamp
    faulty = _set(faulty, 34, month="13", day="0")  # two failures on one row
    faulty = pl.concat([faulty, faulty.slice(55, 2)])  # two exact duplicates
    outcome = validate_table(faulty, TABLES["flights"], source="landing/x.csv", partition="2013-01")

    assert outcome.rows_in == faulty.height
    assert outcome.valid.height + outcome.quarantine.height == faulty.height
    reasons = dict(zip(outcome.quarantine["row_index"], outcome.quarantine["reason"], strict=True))
    assert set(reasons) == {3, 5, 8, 13, 21, 34, faulty.height - 2, faulty.height - 1}
    assert reasons[3] == "dep_delay: wrong type (expected Float64)"
    assert reasons[5].startswith("distance: in_range(1, 10000)")
    assert reasons[8] == "sched_dep_time: not a valid HHMM clock time (value 1275)"
    assert reasons[13] == "carrier: not_nullable (value null)"
    assert reasons[21].startswith("time_hour: wrong type")
    assert "month: in_range(1, 12)" in reasons[34] and "day: in_range(1, 31)" in reasons[34]
    assert reasons[faulty.height - 1].startswith("duplicate key")
    assert set(outcome.quarantine["table"]) == {"flights"}
    assert set(outcome.quarantine["source"]) == {"landing/x.csv"}
    assert set(outcome.quarantine["partition"]) == {"2013-01"}
    # The quarantined record is the raw row, so nothing is lost.
    record = json.loads(outcome.quarantine.filter(pl.col("row_index") == 3)["record"][0])
    assert record["dep_delay"] == "soon"
    assert record["flight"] == raw_january["flight"][3]
    assert outcome.failures_by_check["duplicate key " + str(list(TABLES["flights"].keys))] == 2
    # Valid rows are typed and none of the faulty values survive.
    assert outcome.valid.get_column("distance").min() > 0
    assert outcome.valid.get_column("carrier").null_count() == 0


def test_a_duplicate_of_a_quarantined_row_is_kept(raw_january: pl.DataFrame) -> None:
    broken_first = pl.concat([_set(raw_january.head(1), 0, distance="-1"), raw_january.head(1)])
    outcome = validate_table(broken_first, TABLES["flights"], source="t", partition=None)
    assert outcome.valid.height == 1 and outcome.quarantine.height == 1


def test_weather_outlier_in_the_real_data_is_quarantined() -> None:
    raw = read_package_table("weather").filter(pl.col("month") == 2)
    outcome = validate_table(raw, TABLES["weather"], source="weather.csv", partition="2013-02")
    assert outcome.quarantine.height == 1
    assert "wind_speed: in_range(0, 200)" in outcome.quarantine["reason"][0]
    assert outcome.rows_in == raw.height


@pytest.mark.parametrize("table", ["planes", "airports", "airlines"])
def test_reference_tables_validate_whole(table: str) -> None:
    raw = read_package_table(table)
    outcome = validate_table(raw, TABLES[table], source="package", partition=None)
    assert (outcome.valid.height, outcome.quarantine.height) == (raw.height, 0)


def test_duplicate_reference_keys_are_quarantined() -> None:
    raw = read_package_table("airlines")
    outcome = validate_table(pl.concat([raw, raw.head(3)]), TABLES["airlines"], source="db",
                             partition=None)  # fmt: skip
    assert outcome.valid.height == raw.height
    assert outcome.quarantine.height == 3


def test_missing_column_fails_the_table_clearly(raw_january: pl.DataFrame) -> None:
    with pytest.raises(SourceError, match=r"missing column\(s\) \['origin'\]"):
        validate_table(raw_january.drop("origin"), TABLES["flights"], source="t", partition=None)


def test_empty_table_is_valid_and_empty(raw_january: pl.DataFrame) -> None:
    outcome = validate_table(raw_january.head(0), TABLES["flights"], source="t", partition=None)
    assert outcome.rows_in == 0 and outcome.quarantine_share == 0.0
