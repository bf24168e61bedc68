"""The asset graph materialized in-process on a temporary Dagster instance, on real data."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from mlops_assets.definitions import defs
from mlops_assets.features.preprocess import Preprocessor
from resources import default_resources
from resources.files import land_month
from resources.weather import WeatherSourceResource
from resources.weather_api_server import serve_weather_api

ASSETS = list(defs.assets)
REFERENCE = ["raw_planes", "raw_airports", "raw_airlines", "planes", "airports", "airlines"]
MONTHLY = ["raw_flights", "raw_weather", "flights", "weather", "flight_features"]


def materialize(
    names: list[str],
    instance: dg.DagsterInstance,
    resources: dict[str, Any],
    partition: str | None = None,
    run_config: dict[str, Any] | None = None,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ASSETS,
        selection=names,
        partition_key=partition,
        resources=resources,
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failures = result.get_step_failure_events()
    assert failures, "expected a failed step"
    error = failures[0].event_specific_data.error
    return "\n".join(filter(None, [error.message, *(c.message for c in _causes(error))]))


def _causes(error: Any) -> list[Any]:
    out = []
    while error.cause is not None:
        error = error.cause
        out.append(error)
    return out


def latest_metadata(instance: dg.DagsterInstance, key: str, partition: str | None = None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None
        ),
        limit=1,
    ).records
    assert records, f"{key} {partition} was not materialized"
    return records[0].asset_materialization.metadata


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_whole_graph_on_three_real_months(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    months = ["2013-01", "2013-02", "2013-03"]
    for month in months:
        land_month(month, mlops_home / "landing")
    assert materialize(REFERENCE, instance, resources).success
    for month in months:
        result = materialize(MONTHLY, instance, resources, partition=month)
        assert result.success, failure_message(result)
    result = materialize(["eda_report", "training_set"], instance, resources)
    assert result.success, failure_message(result)

    warehouse = resources["warehouse"]
    # Integrity metadata on every raw asset.
    raw = latest_metadata(instance, "raw_flights", "2013-02")
    assert raw["rows"].value == 24_951
    assert len(raw["sha256"].value) == 64
    assert raw["source"].value.endswith("flights_2013-02.csv")
    for name in ("raw_weather", "raw_planes"):
        meta = latest_metadata(instance, name, "2013-01" if name == "raw_weather" else None)
        assert {"rows", "sha256", "source", "dagster/column_schema"} <= set(meta)
    # Rows in = valid + quarantined, and the real wind-speed outlier sits in quarantine.
    weather = latest_metadata(instance, "weather", "2013-02")
    assert weather["rows_in"].value == weather["rows_valid"].value + 1
    quarantine = warehouse.read("quarantine", ["weather__2013-02"])
    assert quarantine["reason"][0].startswith("wind_speed")
    assert quarantine["source"][0].startswith("file://")
    # Every check passed.
    checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey(t), "quarantine_share_below_threshold")
         for t in ("flights", "weather", "planes", "airports", "airlines")]
    )  # fmt: skip
    assert len(checks) == 5
    # Time-based splits and the saved preprocessing.
    training = warehouse.read("training_set")
    by_split = {s: sorted(training.filter(pl.col("split") == s)["month_key"].unique())
                for s in ("train", "valid", "test")}  # fmt: skip
    assert by_split == {"train": ["2013-01"], "valid": ["2013-02"], "test": ["2013-03"]}
    assert training[training.columns[0]].null_count() == 0
    assert training["delayed"].null_count() == 0
    pre = Preprocessor.from_json(
        (Path(warehouse.root) / "training_set" / "preprocessor.json").read_text()
    )
    assert "UA" in pre.categories["carrier"]
    # EDA report on disk.
    eda = latest_metadata(instance, "eda_report")
    assert Path(eda["report"].value).exists()
    # DuckDB reads the warehouse without any database file to lock.
    with warehouse.connect() as con:
        count = con.execute("SELECT count(*) FROM flights").fetchone()[0]
    assert count == sum(latest_metadata(instance, "flights", m)["rows_valid"].value for m in months)
    assert not list(Path(warehouse.root).rglob("*.tmp"))


def test_unlanded_month_fails_clearly_and_writes_nothing(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    result = materialize(["raw_flights"], instance, resources, partition="2013-07")
    assert not result.success
    assert "no file has landed for month 2013-07" in failure_message(result)
    assert not (mlops_home / "warehouse" / "raw_flights").exists()


def test_corrupt_file_fails_and_the_previous_version_stays(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    landed = land_month("2013-01", mlops_home / "landing")
    assert materialize(["raw_flights"], instance, resources, partition="2013-01").success
    stored = resources["warehouse"].path("raw_flights", "2013-01")
    before = sha(stored)
    landed.write_bytes(landed.read_bytes()[:5000] + b"\xff\xfe broken")
    result = materialize(["raw_flights"], instance, resources, partition="2013-01")
    assert not result.success
    assert "not valid UTF-8" in failure_message(result)
    assert sha(stored) == before
    assert sorted(p.name for p in stored.parent.iterdir()) == ["2013-01.parquet"]


def test_blocking_check_fails_the_partition_and_stops_downstream(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    landed = land_month("2013-01", mlops_home / "landing")
    frame = pl.read_csv(landed, infer_schema=False)
    broken = frame.with_columns(
        pl.when(pl.int_range(pl.len()) % 20 == 0).then(pl.lit("n/a")).otherwise("distance")
        .alias("distance")
    )  # fmt: skip
    broken.write_csv(landed)
    assert materialize([*REFERENCE[:1], "planes"], instance, resources).success
    result = materialize(MONTHLY, instance, resources, partition="2013-01")
    assert not result.success
    check = next(
        e for e in result.get_asset_check_evaluations()
        if e.asset_key == dg.AssetKey("flights")
    )  # fmt: skip
    assert not check.passed
    assert check.metadata["threshold"].value == 0.01
    assert check.metadata["quarantine_share"].value == pytest.approx(0.05, abs=0.001)
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "flights" in materialized and "flight_features" not in materialized
    meta = latest_metadata(instance, "flights", "2013-01")
    assert meta["rows_in"].value == frame.height
    assert meta["rows_valid"].value + meta["rows_quarantined"].value == frame.height
    quarantine = resources["warehouse"].read("quarantine", ["flights__2013-01"])
    assert quarantine.height == meta["rows_quarantined"].value
    assert set(quarantine["reason"]) == {"distance: wrong type (expected Float64)"}
    # A looser threshold lets the same partition through.
    loose = {"ops": {"flights": {"config": {"max_quarantine_share": 0.10}}}}
    result = materialize(["flights", "flight_features"], instance, resources, "2013-01", loose)
    assert result.success, failure_message(result)


def _materialize_in_process(home: str, dagster_home: str, month: str) -> bool:
    import os

    os.environ["MLOPS_HOME"] = home
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        result = dg.materialize(
            ASSETS, selection=["raw_flights", "flights"], partition_key=month,
            resources=default_resources(), instance=instance, raise_on_error=False,
        )  # fmt: skip
    return result.success


def test_two_runs_on_different_partitions_at_once_never_fight_for_a_lock(
    mlops_home: Path, tmp_path: Path
) -> None:
    dagster_home = tmp_path / "shared_dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # Create the instance's storage once, as `mlops up` does before any run starts; two
    # processes migrating a brand-new SQLite schema at the same instant is not the case tested.
    dg.DagsterInstance.from_config(str(dagster_home)).dispose()
    months = ["2013-01", "2013-02", "2013-03", "2013-04"]
    for month in months:
        land_month(month, mlops_home / "landing")
    resources = default_resources()
    warehouse = resources["warehouse"]
    pool = multiprocessing.get_context("spawn").Pool(2)
    try:
        # A reader keeps a DuckDB connection open over the warehouse while the writers run.
        pending = pool.starmap_async(
            _materialize_in_process,
            [(str(mlops_home), str(dagster_home), m) for m in months],
        )
        while not pending.ready():
            with warehouse.connect() as con:
                con.execute("SELECT 1").fetchone()
            pending.wait(0.2)
        assert pending.get() == [True] * 4
    finally:
        # Let the workers exit on their own: the `with` form's terminate() sends SIGTERM, and
        # a worker that ran Dagster can sit on it, which hung this test once in CI (join, 600 s).
        pool.close()
        pool.join()
    assert warehouse.partitions("flights") == months
    with warehouse.connect() as con:
        per_month = con.execute(
            "SELECT month, count(*) FROM flights GROUP BY month ORDER BY month"
        ).fetchall()
    assert [m for m, _ in per_month] == [1, 2, 3, 4]


def test_weather_from_the_http_api_in_the_graph(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    server, _thread = serve_weather_api(token="canary-token")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        over_http = {
            **resources,
            "weather_api": WeatherSourceResource(base_url=url, api_token="canary-token",
                                                 page_size=700),
        }  # fmt: skip
        result = materialize(["raw_weather", "weather"], instance, over_http, partition="2013-01")
        assert result.success, failure_message(result)
    finally:
        server.shutdown()
        server.server_close()
    raw = latest_metadata(instance, "raw_weather", "2013-01")
    assert raw["source"].value == f"{url}/weather?month=2013-01"
    assert "canary-token" not in raw["source"].value
    from_file = WeatherSourceResource().read_month("2013-01").frame
    assert resources["warehouse"].read("raw_weather", ["2013-01"]).equals(from_file)
    assert latest_metadata(instance, "weather", "2013-01")["rows_valid"].value == from_file.height
