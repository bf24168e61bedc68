"""Drift on real features: verdicts, importance weighting, and degenerate columns or partitions."""

from __future__ import annotations

import math

import polars as pl
import pytest

from mlops_assets.features.transform import FEATURES, LABEL, build_features
from mlops_assets.monitor.drift import measure_drift
from tests.realdata import valid_table

KINDS = {f.name: f.kind for f in FEATURES}


@pytest.fixture(scope="module")
def features() -> pl.DataFrame:
    flights = valid_table("flights").filter(pl.col("month").is_in([1, 2, 7]))
    frame = build_features(flights, valid_table("weather"), valid_table("planes"))
    return frame.filter(pl.col(LABEL).is_not_null())


def month(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return frame.filter(pl.col("month_key") == key)


def test_summer_weather_drifts_from_winter_and_a_sample_of_itself_does_not(features) -> None:
    winter = month(features, "2013-01")
    july = measure_drift(month(features, "2013-07"), winter, KINDS, max_rows=5_000)
    drifted = {c.column for c in july.columns if c.drifted}
    assert {"temp", "dewp"} <= drifted
    assert "carrier" not in drifted and "distance" not in drifted
    assert 0 < july.share < 1
    same = measure_drift(winter.sample(3_000, seed=1), winter, KINDS, max_rows=5_000)
    assert same.share == 0.0
    assert july.snapshot is not None


def test_importance_weights_the_share(features) -> None:
    winter, july = month(features, "2013-01"), month(features, "2013-07")
    plain = measure_drift(july, winter, KINDS, max_rows=5_000)
    steady = [c.column for c in plain.columns if not c.drifted][:3]
    heavy = measure_drift(july, winter, KINDS, {"temp": 1.0, "dewp": 1.0, steady[0]: 1.0},
                          max_rows=5_000)  # fmt: skip
    light = measure_drift(july, winter, KINDS, dict.fromkeys(steady, 1.0), max_rows=5_000)
    assert heavy.share == light.share == plain.share
    assert heavy.weighted_share == pytest.approx(2 / 3)
    assert light.weighted_share == 0.0


def test_empty_and_tiny_partitions_are_skipped_with_a_reason(features) -> None:
    winter = month(features, "2013-01")
    for current, rows in ((winter.head(0), 0), (winter.head(5), 5)):
        result = measure_drift(current, winter, KINDS, min_rows=30)
        assert result.measured == []
        assert result.share == 0.0 and result.weighted_share == 0.0
        assert f"current data has {rows} row(s)" in result.notes[0]
        assert all(c.status == "skipped" and c.reason for c in result.columns)


def test_degenerate_columns_never_crash_or_give_nan(features) -> None:
    winter = month(features, "2013-01").head(4_000)
    february = month(features, "2013-02").head(4_000)
    current = february.with_columns(
        pl.lit(None, dtype=pl.Float64).alias("wind_gust"),  # all null
        pl.lit(2.0).alias("engines"),  # constant, equal to the reference below
        pl.lit(500.0).alias("distance"),  # constant, different value from the reference
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("ZZ"))  # unseen carrier
        .otherwise(pl.col("carrier")).alias("carrier"),
    )  # fmt: skip
    reference = winter.with_columns(pl.lit(2.0).alias("engines"), pl.lit(900.0).alias("distance"))
    result = measure_drift(current, reference, KINDS)
    by_name = {c.column: c for c in result.columns}
    assert by_name["wind_gust"].status == "skipped"
    assert "all null in the current data" in by_name["wind_gust"].reason
    assert (by_name["engines"].status, by_name["engines"].drifted) == ("measured", False)
    assert (by_name["distance"].status, by_name["distance"].drifted) == ("measured", True)
    carrier = by_name["carrier"]
    assert carrier.status == "measured" and carrier.drifted and math.isfinite(carrier.score)
    assert math.isfinite(result.share) and math.isfinite(result.weighted_share)


def test_a_column_with_too_few_values_is_skipped(features) -> None:
    winter = month(features, "2013-01").head(2_000)
    current = winter.with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(pl.col("temp")).otherwise(None).alias("temp")
    )
    result = measure_drift(current, winter, KINDS, min_rows=30)
    temp = next(c for c in result.columns if c.column == "temp")
    assert temp.status == "skipped" and "only 3 value(s) in the current data" in temp.reason
    assert len(result.measured) == len(KINDS) - 1
