"""Monitoring inputs: the serving prediction log, ingested day by day."""

import datetime as dt

import dagster as dg
import polars as pl

from mlops_assets.metadata import table_metadata
from resources.prediction_log import PredictionLogResource

DAILY = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)


@dg.asset(group_name="monitor", partitions_def=DAILY, kinds={"polars"})
def prediction_log(
    context: dg.AssetExecutionContext, prediction_log_files: PredictionLogResource
) -> pl.DataFrame:
    """Answered and rejected requests of one day (UTC), from the replicas' log segments."""
    day = dt.date.fromisoformat(context.partition_key)
    lines = prediction_log_files.read_day(day)
    answered = lines.filter(pl.col("kind") == "prediction")
    rejected = lines.filter(pl.col("kind") == "rejection")
    by_version = answered.group_by("model_version").len().sort("model_version")
    context.add_output_metadata(
        {
            **table_metadata(lines),
            "predictions": dg.MetadataValue.int(answered.height),
            "rejections": dg.MetadataValue.int(rejected.height),
            "requests": dg.MetadataValue.int(lines.get_column("request_id").n_unique()),
            "model_versions": dg.MetadataValue.text(
                ", ".join(f"{v}: {n}" for v, n in by_version.iter_rows()) or "none"
            ),
            "p50_latency_ms": dg.MetadataValue.float(
                float(answered.get_column("latency_ms").median() or 0.0)
            ),
            "segments": dg.MetadataValue.int(lines.get_column("segment").n_unique()),
        }
    )
    return lines


assets = [prediction_log]
