"""The EDA report asset: a thin wrapper that runs the report and publishes it to the UI."""

# No `from __future__ import annotations` here: Dagster inspects the real annotation objects
# (it refuses the string "dg.AssetExecutionContext" for `context`).

import dagster as dg
import polars as pl

from mlops_assets.explore.report import build_eda_report
from resources.warehouse import WarehouseResource


@dg.asset(
    group_name="explore",
    kinds={"polars", "matplotlib"},
    ins={
        "flights": dg.AssetIn(),
        "weather": dg.AssetIn(),
        "planes": dg.AssetIn(),
        "airlines": dg.AssetIn(),
    },
)
def eda_report(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    flights: pl.DataFrame,
    weather: pl.DataFrame,
    planes: pl.DataFrame,
    airlines: pl.DataFrame,
) -> dg.MaterializeResult:
    """EDA of every landed month: statistics, missing values, outliers, distributions, delays."""
    report = build_eda_report(flights, weather, planes, airlines, warehouse.report_dir("eda"))
    context.log.info(
        f"EDA of {report.rows} flights over {len(report.months)} month(s) written to {report.html}"
    )
    return dg.MaterializeResult(
        metadata={
            "rows": report.rows,
            # Null (not NaN) when no flight has an arrival delay yet, e.g. all cancelled.
            "delayed_share": (
                dg.MetadataValue.null()
                if report.delayed_share is None
                else dg.MetadataValue.float(report.delayed_share)
            ),
            "cancelled": report.cancelled,
            "months": dg.MetadataValue.text(", ".join(report.months)),
            "report": dg.MetadataValue.path(str(report.html)),
            "summary": dg.MetadataValue.md(report.markdown),
            "dagster/row_count": report.rows,
        }
    )


assets = [eda_report]
