"""The feature function, preprocessing and splits, on the real data."""

from __future__ import annotations

import datetime as dt

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
    PAST_WEATHER_FIELDS,
    POST_DEPARTURE,
    WEATHER_FIELDS,
    WEATHER_HISTORY_FIELDS,
    build_features,
    weather_history,
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


# -- the origin's weather history ------------------------------------------------------------


def _hours(origin: str, start: dt.datetime, values: dict[str, list[float | None]]) -> pl.DataFrame:
    """Hourly weather rows for one origin from ``start`` (UTC), a value list per field; a row
    whose every value is None is left out (a missing hour, as the real table has)."""
    n = len(next(iter(values.values())))
    rows = [
        {"origin": origin, "time_hour": start + dt.timedelta(hours=i),
         **{w: values.get(w, [1.0] * n)[i] for w in WEATHER_FIELDS}}
        for i in range(n)
        if any(values[w][i] is not None for w in values)
    ]  # fmt: skip
    return pl.DataFrame(rows).with_columns(
        pl.col("time_hour").dt.replace_time_zone("UTC").dt.cast_time_unit("us"),
        *(pl.col(w).cast(pl.Float64) for w in WEATHER_FIELDS),
    )


def _booking_at(local: dt.datetime, **weather: float) -> pl.DataFrame:
    return pl.DataFrame(
        [{"year": local.year, "month": local.month, "day": local.day,
          "sched_dep_time": local.hour * 100 + 5, "sched_arr_time": 1200, "carrier": "UA",
          "flight": 1, "tailnum": None, "origin": "EWR", "dest": "ORD", "distance": 719.0,
          **weather}]
    )  # fmt: skip


def test_weather_history_covers_the_hours_before_by_clock_time(
    tables: dict[str, pl.DataFrame],
) -> None:
    # 2013-06-10 12:00-19:00 UTC (08:00-15:00 in New York, EDT); 16:00 UTC is missing.
    weather = _hours("EWR", dt.datetime(2013, 6, 10, 12), {
        "precip":     [0.1, 0.2, 0.0, 0.3, None, 0.05, 0.0, 0.4],
        "visib":      [10., 2.0, 8.0, 9.0, None, 10.0, 3.0, 7.0],
        "wind_speed": [5.0, 9.0, 4.0, 6.0, None, 12.0, 7.0, 2.0],
        "pressure":   [1010, 1011, 1012, 1013, None, 1009, 1008, 1000],
        "temp":       [60.0, 61.0, 62.0, 64.0, None, 70.0, 71.0, 65.0],
    })  # fmt: skip

    def history(local_hour: int) -> dict[str, float | None]:
        out = build_features(
            _booking_at(dt.datetime(2013, 6, 10, local_hour)), weather, tables["planes"]
        )
        return out.select(WEATHER_HISTORY_FIELDS).row(0, named=True)

    # 11:00 local = 15:00 UTC: that hour, 14:00 and 13:00 (3h); 12:00-10:00 too (6h).
    at_15 = history(11)
    assert at_15["precip_3h"] == pytest.approx(0.3 + 0.0 + 0.2)
    assert at_15["precip_6h"] == pytest.approx(0.3 + 0.0 + 0.2 + 0.1)
    assert at_15["visib_min_3h"] == 2.0 and at_15["wind_max_3h"] == 9.0
    assert at_15["pressure_chg_3h"] == 1013 - 1010 and at_15["temp_chg_3h"] == 64.0 - 60.0
    # 14:00 local = 18:00 UTC: 16:00 UTC is missing, so it is skipped, never shifted over.
    at_18 = history(14)
    assert at_18["precip_3h"] == pytest.approx(0.0 + 0.05)
    assert at_18["visib_min_3h"] == 3.0 and at_18["wind_max_3h"] == 12.0
    assert at_18["pressure_chg_3h"] == 1008 - 1013  # 15:00 UTC, three clock hours before
    # 15:00 local = 19:00 UTC: three hours before is the missing 16:00, so no change is known.
    at_19 = history(15)
    assert at_19["pressure_chg_3h"] is None and at_19["temp_chg_3h"] is None
    assert at_19["precip_3h"] == pytest.approx(0.4 + 0.0 + 0.05)
    # 12:00 local = 16:00 UTC, the missing hour itself: no weather, but the hours before.
    at_16 = history(12)
    assert at_16["precip_3h"] == pytest.approx(0.3 + 0.0)
    assert at_16["visib_min_3h"] == 8.0 and at_16["pressure_chg_3h"] is None
    # 16:00 local = 20:00 UTC, the hour after the last recorded one: the same.
    assert history(16)["precip_3h"] == pytest.approx(0.4 + 0.0)
    # 08:00 local = 12:00 UTC, the first hour recorded: the history is that hour alone.
    at_12 = history(8)
    assert at_12["precip_3h"] == pytest.approx(0.1) and at_12["visib_min_3h"] == 10.0
    assert at_12["pressure_chg_3h"] is None


def test_sent_weather_combines_with_the_looked_up_history(
    tables: dict[str, pl.DataFrame],
) -> None:
    weather = _hours("EWR", dt.datetime(2013, 6, 10, 12), {
        "precip":   [0.1, 0.2, 0.0, 0.3],
        "visib":    [10., 2.0, 8.0, 9.0],
        "pressure": [1010, 1011, 1012, 1013],
    })  # fmt: skip
    local = dt.datetime(2013, 6, 10, 11)  # 15:00 UTC
    sent = build_features(
        _booking_at(local, precip=1.0, visib=0.5, pressure=1000.0), weather, tables["planes"]
    ).row(0, named=True)
    assert sent["precip"] == 1.0 and sent["precip_3h"] == pytest.approx(1.0 + 0.0 + 0.2)
    assert sent["visib_min_3h"] == 0.5
    assert sent["pressure_chg_3h"] == 1000.0 - 1010
    # A booking on an hour the table does not hold: the history is what was sent, or null.
    far = build_features(
        _booking_at(dt.datetime(2013, 6, 12, 11), precip=0.25), weather, tables["planes"]
    ).row(0, named=True)
    assert far["precip_3h"] == 0.25 and far["precip_6h"] == 0.25
    assert far["visib_min_3h"] is None and far["pressure_chg_3h"] is None


def test_weather_history_derived_once_equals_the_whole_table(
    tables: dict[str, pl.DataFrame],
) -> None:
    """Serving derives the history from the whole table, then joins slices of it: the features
    are those of the whole table, also in the first hours of a slice."""
    # 19:00-21:59 in New York in January: 00:00-02:59 UTC, the first hours of a UTC date.
    flights = tables["flights"].filter(pl.col("sched_dep_time").is_between(1900, 2159)).head(200)
    whole = build_features(flights, tables["weather"], tables["planes"])
    derived = weather_history(tables["weather"]).collect()
    days = flights.get_column("time_hour").dt.date().unique()
    sliced = derived.filter(pl.col("time_hour").dt.date().is_in(days.implode()))
    assert sliced.height < derived.height
    assert build_features(flights, sliced, tables["planes"]).equals(whole)
    # Without the derived columns, the slice would lose the hours before its first.
    bare = sliced.drop(PAST_WEATHER_FIELDS)
    recomputed = build_features(flights, bare, tables["planes"]).select(WEATHER_HISTORY_FIELDS)
    assert not recomputed.equals(whole.select(WEATHER_HISTORY_FIELDS))
