"""Features: flights joined with origin weather and planes, and time-based model splits."""

import dagster as dg
import polars as pl

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.splits import SPLITS, assign_splits, split_months
from mlops_assets.features.transform import FEATURES, LABEL, build_features
from mlops_assets.metadata import markdown_table, table_metadata
from mlops_assets.partitions import MONTHLY
from resources.storage import write_text_atomic
from resources.warehouse import WarehouseResource

PREPROCESSOR_FILE = "preprocessor.json"


@dg.asset(
    group_name="features",
    partitions_def=MONTHLY,
    kinds={"polars"},
    ins={"flights": dg.AssetIn(), "weather": dg.AssetIn(), "planes": dg.AssetIn()},
)
def flight_features(
    context: dg.AssetExecutionContext,
    flights: pl.DataFrame,
    weather: pl.DataFrame,
    planes: pl.DataFrame,
) -> pl.DataFrame:
    """Labelled features for one month: schedule, route, origin weather that hour, plane."""
    features = build_features(flights, weather, planes)
    unlabelled = features.get_column(LABEL).null_count()
    labelled = features.filter(pl.col(LABEL).is_not_null())
    missing_weather = labelled.get_column("temp").null_count()
    context.add_output_metadata(
        {
            **table_metadata(labelled),
            "unlabelled_excluded": dg.MetadataValue.int(unlabelled),
            "delayed_share": dg.MetadataValue.float(
                float(labelled.get_column(LABEL).mean() or 0.0)
            ),
            "rows_without_weather": dg.MetadataValue.int(missing_weather),
        }
    )
    return labelled


class SplitConfig(dg.Config):
    valid_months: int = 1
    test_months: int = 1
    train_window_months: int = 0
    """How many of the most recent remaining months to train on; 0 trains on all of them."""


@dg.asset(
    group_name="features",
    kinds={"polars"},
    ins={"flight_features": dg.AssetIn()},
    # The loop's edge back into training: a landed month's run goes on from here only when
    # its retrain decision says so (materialized); otherwise these steps are skipped.
    deps=["retrain_decision"],
)
def training_set(
    context: dg.AssetExecutionContext,
    config: SplitConfig,
    warehouse: WarehouseResource,
    flight_features: pl.DataFrame,
) -> pl.DataFrame:
    """Landed months split by time into train/valid/test, with preprocessing fitted on train."""
    months = flight_features.get_column("month_key").unique().sort().to_list()
    split = split_months(
        months,
        valid_months=config.valid_months,
        test_months=config.test_months,
        train_window=config.train_window_months or None,
    )
    frame = assign_splits(flight_features, split)
    preprocessor = Preprocessor.fit(frame.filter(pl.col("split") == "train"))
    path = warehouse.table_dir("training_set") / PREPROCESSOR_FILE
    write_text_atomic(preprocessor.to_json(), path)
    summary = (
        frame.group_by("split")
        .agg(
            pl.len().alias("rows"),
            pl.col(LABEL).mean().round(4).alias("delayed_share"),
            pl.col("month_key").unique().sort().str.join(", ").alias("months"),
        )
        .sort(pl.col("split").replace_strict({s: i for i, s in enumerate(SPLITS)}))
    )
    feature_table = pl.DataFrame(
        {
            "feature": [f.name for f in FEATURES],
            "kind": [f.kind for f in FEATURES],
            "missing values": [f.missing for f in FEATURES],
            "description": [f.description for f in FEATURES],
        }
    )
    context.add_output_metadata(
        {
            **table_metadata(frame),
            "splits": dg.MetadataValue.md(markdown_table(summary)),
            **{
                f"{row['split']}_rows": dg.MetadataValue.int(row["rows"])
                for row in summary.iter_rows(named=True)
            },
            "features": dg.MetadataValue.md(markdown_table(feature_table, len(FEATURES))),
            "preprocessor": dg.MetadataValue.path(str(path)),
        }
    )
    return frame


assets = [flight_features, training_set]
