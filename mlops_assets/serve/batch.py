"""Batch scoring: every landed month scored by the champion, for consumers that want files."""

import datetime as dt

import dagster as dg
import polars as pl

from mlops_assets.features.transform import BOOKING_COLUMNS
from mlops_assets.metadata import table_metadata
from mlops_assets.partitions import MONTHLY
from mlops_assets.serve.predictor import Predictor
from resources.registry import ModelRegistryResource


@dg.asset(
    group_name="serve",
    partitions_def=MONTHLY,
    kinds={"lightgbm", "polars"},
    ins={"flights": dg.AssetIn(), "weather": dg.AssetIn(), "planes": dg.AssetIn()},
    deps=["champion_model"],
)
def batch_predictions(
    context: dg.AssetExecutionContext,
    registry: ModelRegistryResource,
    flights: pl.DataFrame,
    weather: pl.DataFrame,
    planes: pl.DataFrame,
) -> pl.DataFrame:
    """One month's flights scored by the champion, through the endpoint's loader and features."""
    version = registry.champion()
    if version is None:
        raise dg.Failure("there is no champion model yet: materialize champion_model first")
    predictor = Predictor.from_registry(registry, version, planes, weather)
    records = flights.select(list(BOOKING_COLUMNS)).to_dicts()
    probability = predictor.probabilities(records)
    scored = flights.select(
        "year", "month", "day", "carrier", "flight", "tailnum", "origin", "dest",
        "sched_dep_time", "time_hour",
    ).with_columns(
        pl.Series("delay_probability", probability),
        pl.Series("delayed", probability >= predictor.threshold),
        pl.lit(version).alias("model_version"),
        pl.lit(dt.datetime.now(dt.UTC)).alias("scored_at"),
    )  # fmt: skip
    context.add_output_metadata(
        {
            **table_metadata(scored),
            "model_version": dg.MetadataValue.text(version),
            "predicted_delayed_share": dg.MetadataValue.float(
                float(scored.get_column("delayed").mean() or 0.0)
            ),
            "mean_delay_probability": dg.MetadataValue.float(float(probability.mean())),
        }
    )
    return scored


assets = [batch_predictions]
