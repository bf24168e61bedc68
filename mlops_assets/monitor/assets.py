"""Monitoring: drift and champion performance per landed month, and the live traffic view.

Each landed month is compared with the *champion's* training reference (the feature partitions
its manifest names), so "drift" always means "away from what the serving model learned on".
``retrain_decision`` reads their results and decides whether the month's run retrains
(``monitor/policy.py``); the retrain sensor (``monitor/sensors.py``) starts the retrains that
had to wait.
"""

import datetime as dt
import io
import math
import time
from collections.abc import Iterator

import dagster as dg
import numpy as np
import polars as pl
from matplotlib.figure import Figure

from mlops_assets.evaluate.metrics import binary_metrics
from mlops_assets.features.transform import (
    BOOKING_COLUMNS,
    FEATURES,
    LABEL,
    WEATHER_FIELDS,
    build_features,
)
from mlops_assets.metadata import markdown_table, png_markdown, table_metadata
from mlops_assets.monitor import policy
from mlops_assets.monitor.drift import DriftResult, measure_drift
from mlops_assets.partitions import MONTHLY
from resources.prediction_log import PredictionLogResource
from resources.registry import ModelRegistryResource, StoredModel
from resources.retrain_policy import RetrainPolicyResource
from resources.warehouse import WarehouseResource

DAILY = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_offset=1)
DRIFT_CHECK = "drift_share_below_threshold"
DECAY_CHECK = "auc_decay_within_tolerance"
LIVE_DRIFT_CHECK = "live_drift_share_below_threshold"
FEATURE_KINDS = {f.name: f.kind for f in FEATURES}


class DriftConfig(dg.Config):
    max_drift_share: float = 0.5
    """The drift check fails when the importance-weighted share of drifted features is above
    this. Weather features drift with the seasons every month (about 0.45 of the champion's
    importance mass on the real data, measured in 2013-07..12 against Jan–Jun), so the default
    sits above seasonal weather drift alone: route, schedule or carrier mix must move too."""
    column_threshold: float = 0.1
    """Per-column distance (Wasserstein normed, Jensen-Shannon) above which a column drifted."""
    max_rows: int = 20_000
    """Rows sampled (seeded) from each side; the distances do not depend on sample size."""
    min_rows: int = 30
    """A partition or column with fewer rows or values is skipped, with the reason."""


def _champion(registry: ModelRegistryResource) -> StoredModel | None:
    version = registry.champion()
    return registry.load(version) if version else None


def _importance(model: StoredModel) -> dict[str, float]:
    import lightgbm as lgb

    booster = lgb.Booster(model_str=model.model_text)
    return dict(
        zip(booster.feature_name(), booster.feature_importance("gain").tolist(), strict=True)
    )


def _reference(warehouse: WarehouseResource, model: StoredModel) -> pl.DataFrame:
    months = [m for m in model.trained_months if m in warehouse.partitions("flight_features")]
    if not months:
        raise dg.Failure(
            f"the champion {model.version} was trained on {model.trained_months}, and none "
            "of those flight_features partitions is stored: materialize them first"
        )
    return warehouse.read("flight_features", months)


def _skipped(check_name: str, reason: str) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """A materialization that says why nothing was measured, and a passing (skipped) check."""
    yield dg.MaterializeResult(metadata={"skipped": dg.MetadataValue.text(reason)})
    yield dg.AssetCheckResult(
        check_name=check_name, passed=True, severity=dg.AssetCheckSeverity.WARN,
        description=f"skipped: {reason}",
    )  # fmt: skip


def _drift_metadata(result: DriftResult, report: str | None) -> dict[str, dg.MetadataValue]:
    table = result.table().with_columns(pl.col("score", "importance").round(4))
    drifted = [c.column for c in result.columns if c.drifted]
    skipped = [f"{c.column}: {c.reason}" for c in result.columns if c.status == "skipped"]
    metadata = {
        "drift_share": dg.MetadataValue.float(round(result.share, 4)),
        "weighted_drift_share": dg.MetadataValue.float(round(result.weighted_share, 4)),
        "drifted_columns": dg.MetadataValue.text(", ".join(drifted) or "none"),
        "measured_columns": dg.MetadataValue.int(len(result.measured)),
        "skipped_columns": dg.MetadataValue.text("; ".join(skipped) or "none"),
        "current_rows": dg.MetadataValue.int(result.current_rows),
        "reference_rows": dg.MetadataValue.int(result.reference_rows),
        "sampled": dg.MetadataValue.bool(result.sampled),
        "columns": dg.MetadataValue.md(markdown_table(table, len(FEATURES))),
    }
    if result.notes:
        metadata["notes"] = dg.MetadataValue.text("; ".join(result.notes))
    if report:
        metadata["report"] = dg.MetadataValue.path(report)
    return metadata


def _drift_check(
    check_name: str, result: DriftResult, config: DriftConfig, asset: str
) -> dg.AssetCheckResult:
    if not result.measured:
        reason = "; ".join(result.notes) or "no column could be measured"
        return dg.AssetCheckResult(
            check_name=check_name, asset_key=asset, passed=True,
            severity=dg.AssetCheckSeverity.WARN, description=f"skipped: {reason}",
        )  # fmt: skip
    share = result.weighted_share
    top = sorted((c for c in result.measured if c.drifted), key=lambda c: -c.importance)[:4]
    passed = share <= config.max_drift_share
    return dg.AssetCheckResult(
        check_name=check_name,
        asset_key=asset,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"importance-weighted drifted share {share:.3f} "
            f"{'≤' if passed else '>'} {config.max_drift_share}; most important drifted: "
            + (", ".join(f"{c.column} ({c.importance:.2f})" for c in top) or "none")
        ),
        metadata={
            "weighted_drift_share": dg.MetadataValue.float(round(share, 4)),
            "max_drift_share": dg.MetadataValue.float(config.max_drift_share),
            "drift_share": dg.MetadataValue.float(round(result.share, 4)),
        },
    )


@dg.asset(
    group_name="monitor",
    partitions_def=MONTHLY,
    kinds={"evidently"},
    deps=["flight_features"],
    check_specs=[
        dg.AssetCheckSpec(
            DRIFT_CHECK,
            asset="flight_drift",
            description="The month's features have not drifted (importance-weighted share of "
            "drifted features) from the champion's training reference",
        )
    ],
)
def flight_drift(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    warehouse: WarehouseResource,
    registry: ModelRegistryResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Evidently drift of one landed month against the champion's training months."""
    month = context.partition_key
    champion = _champion(registry)
    if champion is None:
        yield from _skipped(
            DRIFT_CHECK, "no champion yet: drift is measured against the champion's training data"
        )
        return
    current = warehouse.read("flight_features", [month])
    reference = _reference(warehouse, champion)
    result = measure_drift(
        current, reference, FEATURE_KINDS, _importance(champion),
        threshold=config.column_threshold, max_rows=config.max_rows, min_rows=config.min_rows,
    )  # fmt: skip
    report = result.save_html(warehouse.report_dir("drift") / f"{month}.html")
    warehouse.write(
        "flight_drift",
        result.table().with_columns(
            pl.lit(month).alias("month"), pl.lit(champion.version).alias("champion_version")
        ),
        month,
    )
    in_reference = month in champion.trained_months
    yield dg.MaterializeResult(
        metadata={
            **_drift_metadata(result, str(report) if report else None),
            "champion_version": dg.MetadataValue.text(champion.version),
            "reference_months": dg.MetadataValue.text(", ".join(champion.trained_months)),
            "in_reference": dg.MetadataValue.bool(in_reference),
            "max_drift_share": dg.MetadataValue.float(config.max_drift_share),
        }
    )
    yield _drift_check(DRIFT_CHECK, result, config, "flight_drift")


class DecayConfig(dg.Config):
    max_auc_drop: float = 0.03
    """The decay check fails when the champion's AUC on a month it never trained on is more
    than this below its AUC on its own validation month."""


def _trend_plot(trend: pl.DataFrame) -> bytes:
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    ax.plot(trend["month"], trend["auc"], marker="o", label="champion AUC")
    ax.plot(trend["month"], trend["reference_auc"], linestyle="--", label="validation AUC")
    ax.set(xlabel="month", ylabel="AUC", title="Champion performance by month")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


@dg.asset(
    group_name="monitor",
    partitions_def=MONTHLY,
    kinds={"lightgbm"},
    deps=["flight_features"],
    check_specs=[
        dg.AssetCheckSpec(
            DECAY_CHECK,
            asset="champion_performance",
            description="The champion's AUC on a newly labelled month stays within tolerance "
            "of its validation AUC",
        )
    ],
)
def champion_performance(
    context: dg.AssetExecutionContext,
    config: DecayConfig,
    warehouse: WarehouseResource,
    registry: ModelRegistryResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The champion's AUC and log loss on one landed (labelled) month, and the trend by month."""
    import lightgbm as lgb

    from mlops_assets.features.preprocess import Preprocessor
    from mlops_assets.train.model import Matrix

    month = context.partition_key
    champion = _champion(registry)
    if champion is None:
        yield from _skipped(DECAY_CHECK, "no champion yet")
        return
    frame = warehouse.read("flight_features", [month])
    booster = lgb.Booster(model_str=champion.model_text)
    preprocessor = Preprocessor.from_json(champion.preprocessor_json)
    matrix = Matrix.from_features(frame, preprocessor)
    scores = booster.predict(matrix.x) if frame.height else np.array([])
    metrics = binary_metrics(matrix.y if frame.height else np.array([]), scores, threshold=0.5)
    reference_auc = float(champion.manifest["metrics"].get("valid_auc", math.nan))
    auc = metrics.get("auc", math.nan)
    in_training = month in champion.trained_months
    row = pl.DataFrame(
        [
            {
                "month": month,
                "champion_version": champion.version,
                "rows": frame.height,
                "auc": auc,
                "log_loss": metrics.get("log_loss", math.nan),
                "brier": metrics.get("brier", math.nan),
                "positive_rate": metrics.get("positive_rate", math.nan),
                "reference_auc": reference_auc,
                "auc_drop": reference_auc - auc,
                "in_training": in_training,
            }
        ]
    )
    warehouse.write("champion_performance", row, month)
    trend = warehouse.read("champion_performance").sort("month")
    shown = trend.with_columns(pl.col(pl.Float64).round(4))
    yield dg.MaterializeResult(
        metadata={
            "champion_version": dg.MetadataValue.text(champion.version),
            "rows": dg.MetadataValue.int(frame.height),
            "auc": dg.MetadataValue.float(auc),
            "log_loss": dg.MetadataValue.float(metrics.get("log_loss", math.nan)),
            "brier": dg.MetadataValue.float(metrics.get("brier", math.nan)),
            "reference_auc": dg.MetadataValue.float(reference_auc),
            "auc_drop": dg.MetadataValue.float(reference_auc - auc),
            "in_training": dg.MetadataValue.bool(in_training),
            "max_auc_drop": dg.MetadataValue.float(config.max_auc_drop),
            "trend": dg.MetadataValue.md(markdown_table(shown, 24)),
            "trend_plot": dg.MetadataValue.md(png_markdown(_trend_plot(trend), "AUC by month")),
        }
    )
    if in_training:
        passed, description = True, f"skipped: {month} is in the champion's training data"
    elif math.isnan(auc):
        passed, description = True, f"skipped: AUC undefined on {month} ({frame.height} rows)"
    else:
        drop = reference_auc - auc
        passed = drop <= config.max_auc_drop
        description = (
            f"AUC {auc:.4f} on {month} vs validation {reference_auc:.4f}: drop {drop:+.4f} "
            f"{'≤' if passed else '>'} {config.max_auc_drop}"
        )
    yield dg.AssetCheckResult(
        check_name=DECAY_CHECK, passed=passed, severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={"max_auc_drop": dg.MetadataValue.float(config.max_auc_drop)},
    )  # fmt: skip


@dg.asset(
    group_name="monitor",
    partitions_def=DAILY,
    kinds={"polars"},
    automation_condition=dg.AutomationCondition.on_cron("*/15 * * * *"),
)
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


@dg.asset(
    group_name="monitor",
    partitions_def=DAILY,
    kinds={"evidently"},
    deps=["prediction_log", "champion_model"],
    automation_condition=dg.AutomationCondition.eager(),
    check_specs=[
        dg.AssetCheckSpec(
            LIVE_DRIFT_CHECK,
            asset="live_traffic_drift",
            description="Live request features have not drifted from the training reference",
        )
    ],
)
def live_traffic_drift(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    warehouse: WarehouseResource,
    registry: ModelRegistryResource,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """Features of one day's answered requests (the same feature function as training and
    serving, enriched from the warehouse's weather and planes) against the champion's
    training reference."""
    day = context.partition_key
    lines = warehouse.read("prediction_log", [day]) if day in warehouse.partitions(
        "prediction_log"
    ) else pl.DataFrame()  # fmt: skip
    answered = lines.filter(pl.col("kind") == "prediction") if lines.height else lines
    champion = _champion(registry)
    if champion is None or answered.height == 0:
        reason = "no champion yet" if champion is None else f"no answered requests on {day}"
        yield from _skipped(LIVE_DRIFT_CHECK, reason)
        return
    inputs = answered.select(
        *BOOKING_COLUMNS, *(c for c in WEATHER_FIELDS if c in answered.columns)
    )
    weather = warehouse.read("weather")
    planes = warehouse.read("planes")
    current = build_features(inputs, weather, planes)
    result = measure_drift(
        current, _reference(warehouse, champion), FEATURE_KINDS, _importance(champion),
        threshold=config.column_threshold, max_rows=config.max_rows, min_rows=config.min_rows,
    )  # fmt: skip
    report = result.save_html(warehouse.report_dir("live_drift") / f"{day}.html")
    versions = answered.group_by("model_version").len().sort("model_version")
    yield dg.MaterializeResult(
        metadata={
            **_drift_metadata(result, str(report) if report else None),
            "champion_version": dg.MetadataValue.text(champion.version),
            "served_versions": dg.MetadataValue.text(
                ", ".join(f"{v}: {n}" for v, n in versions.iter_rows())
            ),
            "labelled": dg.MetadataValue.bool(LABEL in current.columns),
        }
    )
    yield _drift_check(LIVE_DRIFT_CHECK, result, config, "live_traffic_drift")


@dg.asset(
    group_name="monitor",
    partitions_def=MONTHLY,
    deps=["flight_drift", "champion_performance"],
    output_required=False,
)
def retrain_decision(
    context: dg.AssetExecutionContext,
    registry: ModelRegistryResource,
    retrain_policy: RetrainPolicyResource,
) -> Iterator[dg.MaterializeResult]:
    """Retrain now, in this run? Materialized when the month (or a month still waiting) asks
    for a retrain and nothing holds it: the training steps downstream go on in the same run.
    Otherwise an observation says why not, and those steps are skipped."""
    month = context.partition_key
    instance = context.instance
    champion = registry.champion()
    verdict = policy.verdict_for(instance, month, registry, retrain_policy)
    prior = policy.decision_of(policy.recorded_decisions(registry), context.run)
    if prior is not None:  # a re-executed run keeps the decision its first attempt made
        go, held, waiting = bool(prior.get("retrain_in_run")), prior.get("held"), {}
        reason = str(prior["reason"])
    else:
        waiting = {m: d for m, d in policy.waiting_months(instance, registry).items() if m != month}
        due = verdict.retrain or bool(waiting)
        planned = context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys
        held = None
        if due and dg.AssetKey("training_set") not in planned:
            held = "this run does not include the training steps; the retrain sensor will"
        elif due:
            held = policy.hold(instance, registry, retrain_policy, context.run_id)
        go = due and held is None
        reason = verdict.reason
        if waiting:
            reason += f"; waiting for a retrain: {', '.join(sorted(waiting))}"
        if held:
            reason += f"; held: {held}"
        registry.record_decision(
            "retrain" if verdict.retrain else "no_retrain", champion, reason,
            month=month, ingest_run=context.run_id, retrain_in_run=go, held=held,
            covers=sorted({*waiting, month}) if go else [], decided_at=time.time(),
        )  # fmt: skip
    context.log.info(reason)
    metadata = {
        "decision": dg.MetadataValue.text(
            "retrain in this run" if go else "held" if held else "no retrain"
        ),
        "reason": dg.MetadataValue.text(reason),
        "champion_version": dg.MetadataValue.text(champion or "none"),
    }
    for name, value in (("weighted_drift_share", verdict.drift_share),
                        ("auc_drop", verdict.auc_drop)):  # fmt: skip
        if value is not None:
            metadata[name] = dg.MetadataValue.float(value)
    if not go:
        context.log_event(
            dg.AssetObservation(asset_key=context.asset_key, partition=month, metadata=metadata)
        )
        return
    metadata["months_covered"] = dg.MetadataValue.text(", ".join(sorted({*waiting, month})))
    yield dg.MaterializeResult(metadata=metadata)


assets = [flight_drift, champion_performance, retrain_decision, prediction_log, live_traffic_drift]
