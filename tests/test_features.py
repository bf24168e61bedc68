"""The feature function, preprocessing and splits, on the real data."""

from __future__ import annotations

import polars as pl
import pytest
from realdata import valid_table

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.splits import assign_splits, split_months
from mlops_assets.features.transform import (
    BOOKING_COLUMNS,
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    LABEL,
    POST_DEPARTURE,
    WEATHER_FIELDS,
    build_features,
)


@pytest.fixture(scope="module")
def tables() -> dict[str, pl.DataFrame]:
    return {"flights": valid_table("flights", 1), "weather": valid_table("weather", 1),
            "planes": valid_table("planes")}  # fmt: skip


@pytest.fixture(scope="module")
def features(tables: dict[str, pl.DataFrame]) -> pl.DataFrame:
    return build_features(tables["flights"], tables["weather"], tables["planes"])


def test_no_feature_is_observed_after_departure() -> None:
    assert not POST_DEPARTURE & set(FEATURE_NAMES)
    assert LABEL not in FEATURE_NAMES
    assert "arr_delay" in POST_DEPARTURE and "dep_delay" in POST_DEPARTURE


def test_post_departure_columns_cannot_change_features(tables: dict[str, pl.DataFrame]) -> None:
    flights = tables["flights"].head(500)
    tampered = flights.with_columns(
        pl.col("dep_delay") * 0 + 999, pl.col("arr_time") * 0 + 1, pl.col("air_time") * 0 + 7,
        pl.col("dep_time") * 0 + 1,
    )  # fmt: skip
    a = build_features(flights, tables["weather"], tables["planes"]).select(FEATURE_NAMES)
    b = build_features(tampered, tables["weather"], tables["planes"]).select(FEATURE_NAMES)
    assert a.equals(b)


def test_features_join_weather_and_planes(
    tables: dict[str, pl.DataFrame], features: pl.DataFrame
) -> None:
    assert features.height == tables["flights"].height
    # The derived local-schedule hour in UTC is the dataset's own time_hour for every flight.
    assert features["time_hour"].equals(tables["flights"]["time_hour"])
    first = tables["flights"].row(0, named=True)
    wx = tables["weather"].filter(
        (pl.col("origin") == first["origin"]) & (pl.col("time_hour") == first["time_hour"])
    )
    assert features["temp"][0] == wx["temp"][0]
    plane = tables["planes"].filter(pl.col("tailnum") == first["tailnum"])
    assert features["plane_age"][0] == 2013 - plane["year"][0]
    assert features["seats"][0] == plane["seats"][0]
    # Labels: delayed = arrival delay over 15 minutes, null when there was no arrival.
    expected = tables["flights"]["arr_delay"] > 15
    assert features[LABEL].equals(expected.alias(LABEL))
    share = features[LABEL].mean()
    assert 0.15 < share < 0.35
    assert features["temp"].null_count() / features.height < 0.01


def test_serving_records_get_the_same_features_as_training(
    tables: dict[str, pl.DataFrame], features: pl.DataFrame
) -> None:
    picks = [0, 17, 4242, 20_000]
    booking = tables["flights"][picks].select(list(BOOKING_COLUMNS)).to_dicts()
    served = build_features(pl.DataFrame(booking), tables["weather"], tables["planes"])
    assert LABEL not in served.columns
    assert served.select(FEATURE_NAMES).equals(features[picks].select(FEATURE_NAMES))


def test_weather_carried_by_a_record_wins_over_the_lookup(tables: dict[str, pl.DataFrame]) -> None:
    record = (
        tables["flights"].head(1).select(list(BOOKING_COLUMNS)).with_columns(temp=pl.lit(101.5))
    )
    out = build_features(record, tables["weather"], tables["planes"])
    assert out["temp"][0] == 101.5
    assert out["dewp"][0] is not None  # the rest still comes from the lookup


def test_missing_booking_column_is_a_clear_error(tables: dict[str, pl.DataFrame]) -> None:
    with pytest.raises(ValueError, match=r"booking column\(s\) \['distance'\]"):
        build_features(tables["flights"].drop("distance"), tables["weather"], tables["planes"])


def test_preprocessor_is_stable_and_handles_unseen_categories(features: pl.DataFrame) -> None:
    train = features.filter(pl.col("flight_date").dt.day() <= 20)
    pre = Preprocessor.fit(train)
    shuffled = Preprocessor.fit(train.sample(fraction=1.0, shuffle=True, seed=3))
    assert shuffled.categories == pre.categories and shuffled.medians == pre.medians
    assert shuffled.means == pytest.approx(pre.means)
    restored = Preprocessor.from_json(pre.to_json())
    assert restored == pre
    novel = features.head(3).with_columns(
        pl.Series("dest", ["ZZZ", features["dest"][1], None]), pl.Series("temp", [None, 1.0, 2.0])
    )
    encoded = restored.transform(novel)
    assert encoded.columns == list(FEATURE_NAMES)
    assert encoded["dest"].to_list()[0] is None and encoded["dest"].to_list()[2] is None
    assert encoded["dest"][1] == pre.categories["dest"].index(features["dest"][1])
    assert encoded["temp"][0] is None  # LightGBM handles missing natively
    linear = restored.transform_linear(novel)
    n_onehot = sum(len(pre.categories[c]) for c in CATEGORICAL_FEATURES)
    assert linear.shape == (3, len(FEATURE_NAMES) - len(CATEGORICAL_FEATURES) + n_onehot)
    assert not (linear != linear).any()  # no NaN after imputation
    assert pre.medians["temp"] == pytest.approx(train["temp"].median())


def test_time_splits_never_cross_time() -> None:
    months = [f"2013-{m:02d}" for m in (3, 1, 2, 6, 5, 4)]
    split = split_months(months, valid_months=1, test_months=1)
    assert split.train == ["2013-01", "2013-02", "2013-03", "2013-04"]
    assert (split.valid, split.test) == (["2013-05"], ["2013-06"])
    window = split_months(months, valid_months=2, test_months=1, train_window=2)
    assert window.train == ["2013-02", "2013-03"] and window.valid == ["2013-04", "2013-05"]
    frame = pl.DataFrame({"month_key": months, "x": range(6)})
    assigned = assign_splits(frame, window)
    assert assigned.filter(pl.col("split") == "test")["month_key"].to_list() == ["2013-06"]
    assert "2013-01" not in assigned["month_key"].to_list()
    with pytest.raises(ValueError, match="needs at least 3"):
        split_months(["2013-01", "2013-02"], valid_months=1, test_months=1)


def test_weather_fields_are_all_features() -> None:
    assert set(WEATHER_FIELDS) <= set(FEATURE_NAMES)
