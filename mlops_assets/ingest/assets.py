"""Raw data from the three kinds of source: landed files, a SQL database and an HTTP API."""

import dagster as dg
import polars as pl

from mlops_assets.metadata import table_metadata
from mlops_assets.partitions import MONTHLY
from resources.database import ReferenceDatabaseResource
from resources.extract import Extract
from resources.files import LandingFilesResource
from resources.package_data import REFERENCE_TABLES
from resources.weather import WeatherSourceResource


def _record(context: dg.AssetExecutionContext, extract: Extract) -> pl.DataFrame:
    integrity = extract.integrity
    context.add_output_metadata(
        {
            **table_metadata(extract.frame),
            "rows": dg.MetadataValue.int(extract.frame.height),
            "sha256": dg.MetadataValue.text(extract.checksum),
            "source": dg.MetadataValue.text(str(integrity["source"])),
        }
    )
    return extract.frame


@dg.asset(group_name="ingest", partitions_def=MONTHLY, kinds={"csv", "polars"})
def raw_flights(context: dg.AssetExecutionContext, landing: LandingFilesResource) -> pl.DataFrame:
    """One month of flights as exported to the landing directory, every column as text."""
    return _record(context, landing.read_month(context.partition_key))


@dg.asset(group_name="ingest", partitions_def=MONTHLY, kinds={"api", "polars"})
def raw_weather(
    context: dg.AssetExecutionContext, weather_api: WeatherSourceResource
) -> pl.DataFrame:
    """Hourly weather at the origin airports for one month, from the weather API."""
    return _record(context, weather_api.read_month(context.partition_key))


def _reference_asset(table: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"raw_{table}",
        group_name="ingest",
        kinds={"sql", "polars"},
        description=f"The {table} reference table, read with SQL from the reference database.",
    )
    def _asset(
        context: dg.AssetExecutionContext, reference_db: ReferenceDatabaseResource
    ) -> pl.DataFrame:
        return _record(context, reference_db.read_table(table))

    return _asset


reference_assets = [_reference_asset(t) for t in REFERENCE_TABLES]
assets = [raw_flights, raw_weather, *reference_assets]
