"""Evaluation against the champion and baselines on a frozen set, the gate, and promotion."""

import base64
import math
from collections.abc import Iterator

import dagster as dg
import lightgbm as lgb
import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression

from mlops_assets.evaluate.gate import GateRules, decide
from mlops_assets.evaluate.metrics import (
    Scored,
    best_f1_threshold,
    binary_metrics,
    metrics_by,
    plot_calibration_and_confusion,
    plot_curves,
)
from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import LABEL
from mlops_assets.metadata import (
    latest_metadata_value,
    markdown_table,
    partition_versions,
    png_markdown,
)
from mlops_assets.train.mlflow_bridge import MlflowResource
from mlops_assets.train.model import TUNED_PARAMS, Matrix, fit
from mlops_assets.train.on_ray import TrainedWhere
from resources.extract import frame_checksum
from resources.registry import ModelRegistryResource, StoredModel
from resources.storage import write_bytes_atomic, write_text_atomic
from resources.warehouse import WarehouseResource

GATE = "promotion_gate"
SETS = ("valid", "test", "frozen")
SHOWN_METRICS = ("auc", "log_loss", "brier", "precision", "recall", "f1", "calibration_error")


class FrozenSetConfig(dg.Config):
    refreeze: bool = False
    """Replace the frozen set with the current test months even if training has not reached it."""


@dg.asset(group_name="evaluate", kinds={"polars"}, ins={"training_set": dg.AssetIn()})
def frozen_eval_set(
    context: dg.AssetExecutionContext,
    config: FrozenSetConfig,
    warehouse: WarehouseResource,
    training_set: pl.DataFrame,
) -> pl.DataFrame:
    """Labelled rows every candidate is compared on, frozen until training reaches their months."""
    trained = set(
        training_set.filter(pl.col("split") != "test").get_column("month_key").unique().to_list()
    )
    previous = (
        warehouse.read("frozen_eval_set") if warehouse.partitions("frozen_eval_set") else None
    )
    previous_months = (
        sorted(previous.get_column("month_key").unique().to_list()) if previous is not None else []
    )
    overlap = sorted(trained.intersection(previous_months))
    if previous is not None and not overlap and not config.refreeze:
        frame, reason = previous, f"kept: months {previous_months} are still unseen by training"
    else:
        frame = training_set.filter(pl.col("split") == "test").drop("split")
        reason = (
            "refreeze requested"
            if config.refreeze and previous is not None
            else f"refrozen: training now covers {overlap}"
            if overlap
            else "first freeze"
        )
    months = sorted(frame.get_column("month_key").unique().to_list())
    context.add_output_metadata(
        {
            "dagster/row_count": dg.MetadataValue.int(frame.height),
            "months": dg.MetadataValue.text(", ".join(months)),
            "decision": dg.MetadataValue.text(reason),
            "sha256": dg.MetadataValue.text(frame_checksum(frame)),
            "delayed_share": dg.MetadataValue.float(float(frame.get_column(LABEL).mean() or 0)),
        }
    )
    return frame


class GateConfig(dg.Config):
    min_auc_gain: float = GateRules.min_auc_gain
    min_auc_gain_newer_data: float = GateRules.min_auc_gain_newer_data
    max_calibration_error: float = GateRules.max_calibration_error
    baseline_margin: float = GateRules.baseline_margin
    refit_on_all_months: bool = True
    """What serves if the gate passes: the challenger's parameters and round count refit on
    every landed month, the frozen month included, registered by ``champion_model`` as its own
    version (``refit_of`` in its manifest). False serves the challenger itself, which never
    trained on the frozen month."""


def _booster(model: StoredModel) -> tuple[lgb.Booster, Preprocessor]:
    return lgb.Booster(model_str=model.model_text), Preprocessor.from_json(model.preprocessor_json)


def _score_model(model: StoredModel, frame: pl.DataFrame) -> np.ndarray:
    booster, preprocessor = _booster(model)
    return booster.predict(Matrix.from_features(frame, preprocessor).x)


def _comparable_champion(
    registry: ModelRegistryResource, champion: StoredModel | None, frozen_months: set[str]
) -> StoredModel | None:
    """The champion, or, when it is a refit that trained on the frozen months (the set has not
    moved since its promotion), the gated model it refits: its stand-in, trained without them."""
    if champion is None:
        return None
    if champion.refit_of and frozen_months & set(champion.trained_months):
        return registry.load(champion.refit_of)
    return champion


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_report(version: str, sections: list[tuple[str, str]]) -> str:
    body = "\n".join(f"<h2>{title}</h2>\n{html}" for title, html in sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation {version}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head>"
        f"<body><h1>Evaluation of {version}</h1>{body}</body></html>"
    )


def _html_table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{c}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in frame.rows()
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else str(value)


@dg.asset(
    group_name="evaluate",
    kinds={"scikit-learn"},
    ins={"training_set": dg.AssetIn(), "frozen_eval_set": dg.AssetIn()},
    deps=["challenger_model"],
    check_specs=[
        dg.AssetCheckSpec(
            GATE,
            asset="model_evaluation",
            blocking=True,
            description="The challenger may replace the champion: it beats it on the frozen "
            "set by the margin (a first model beats the baselines) and passes sanity checks",
        )
    ],
)
def model_evaluation(
    context: dg.AssetExecutionContext,
    config: GateConfig,
    warehouse: WarehouseResource,
    registry: ModelRegistryResource,
    training_set: pl.DataFrame,
    frozen_eval_set: pl.DataFrame,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
    """The challenger against the champion and two baselines on validation, test and frozen rows."""
    version = latest_metadata_value(context.instance, dg.AssetKey("challenger_model"), "version")
    if version is None:
        raise dg.Failure("no challenger has been trained yet: materialize challenger_model")
    challenger = registry.load(str(version))
    champion_version = registry.champion()
    frozen_months = set(frozen_eval_set.get_column("month_key").unique().to_list())
    serving = registry.load(champion_version) if champion_version else None
    champion = _comparable_champion(registry, serving, frozen_months)
    # The months what would serve learns from (the refit learns the frozen ones too) and the
    # champion has not: new data, judged with the non-inferiority margin.
    would_learn = set(challenger.trained_months) | (
        frozen_months if config.refit_on_all_months else set()
    )
    newer = sorted(would_learn - set(serving.trained_months)) if serving is not None else []
    # The same bytes as the champion and nothing new to learn: nothing to decide. (The same
    # bytes with new months still go through the gate: their refit would learn those.)
    same_model = champion is not None and champion.sha256 == challenger.sha256 and not newer

    sets = {
        "valid": training_set.filter(pl.col("split") == "valid"),
        "test": training_set.filter(pl.col("split") == "test"),
        "frozen": frozen_eval_set,
    }
    # The baselines learn from the rows the challenger was fit on.
    train = training_set.filter(pl.col("split") != "test")
    base_rate = float(train.get_column(LABEL).mean())
    preprocessor = Preprocessor.from_json(challenger.preprocessor_json)
    # Newton-Cholesky: a few exact steps on many rows and ~130 columns (lbfgs needs ~120).
    linear = LogisticRegression(C=1.0, max_iter=500, random_state=0, solver="newton-cholesky")
    linear.fit(preprocessor.transform_linear(train), train.get_column(LABEL).to_numpy())

    predictions: dict[str, dict[str, np.ndarray]] = {}
    for name, frame in sets.items():
        predictions[name] = {
            "challenger": _score_model(challenger, frame),
            "base_rate": np.full(frame.height, base_rate),
            "logistic": linear.predict_proba(preprocessor.transform_linear(frame))[:, 1],
        }
        if champion is not None and not same_model:
            predictions[name]["champion"] = _score_model(champion, frame)
    labels = {
        name: frame.get_column(LABEL).cast(pl.Float64).to_numpy() for name, frame in sets.items()
    }
    # Chosen on validation by the challenger before those months joined its training (older
    # challengers' manifests lack it: chosen here, in sample).
    threshold = challenger.manifest.get("metrics", {}).get("valid_best_f1_threshold") or (
        best_f1_threshold(labels["valid"], predictions["valid"]["challenger"])
    )
    metrics = {
        (set_name, model): binary_metrics(labels[set_name], p, threshold)
        for set_name, by_model in predictions.items()
        for model, p in by_model.items()
    }
    # Which rows each model learned from: the challenger now fits its validation months too, so
    # its validation row measures the fit, not the model; only out-of-sample rows judge it.
    learned = {
        "challenger": set(challenger.trained_months),
        "champion": set(champion.trained_months) if champion is not None else set(),
        "base_rate": set(train.get_column("month_key").unique().to_list()),
    }
    learned["logistic"] = learned["base_rate"]
    set_months = {
        name: set(frame.get_column("month_key").unique().to_list()) for name, frame in sets.items()
    }
    table = pl.DataFrame(
        [
            {"set": s, "model": m, "in_sample": bool(set_months[s] & learned[m]),
             **{k: values.get(k, math.nan) for k in SHOWN_METRICS}}
            for (s, m), values in metrics.items()
        ]
    )  # fmt: skip
    frozen = {m: v for (s, m), v in metrics.items() if s == "frozen"}
    rules = GateRules(config.min_auc_gain, config.min_auc_gain_newer_data,
                      config.max_calibration_error, config.baseline_margin)  # fmt: skip
    decision = decide(
        frozen["challenger"],
        frozen.get("champion"),
        {"base_rate": frozen["base_rate"], "logistic": frozen["logistic"]},
        rules,
        overlap_months=sorted(set(challenger.trained_months) & frozen_months),
        champion_overlap_months=sorted(set(champion.trained_months) & frozen_months)
        if champion is not None
        else None,
        newer_months=newer,
        same_model=same_model,
    )
    registry.record_decision(
        "gate", challenger.version, decision.reason, passed=decision.passed,
        champion=champion_version, **{k: v for k, v in decision.details.items() if v is not None},
    )  # fmt: skip

    everything = pl.concat([sets[s].select("month_key", LABEL) for s in SETS])
    per_month = metrics_by(
        everything, np.concatenate([predictions[s]["challenger"] for s in SETS]), "month_key",
        threshold, LABEL,
    )  # fmt: skip
    per_carrier = metrics_by(
        sets["frozen"], predictions["frozen"]["challenger"], "carrier", threshold, LABEL
    )
    frozen_scores = [Scored(m, labels["frozen"], p) for m, p in predictions["frozen"].items()]
    curves = plot_curves(frozen_scores, "frozen set")
    calibration = plot_calibration_and_confusion(
        Scored("challenger", labels["frozen"], predictions["frozen"]["challenger"]),
        threshold,
        "challenger, frozen set",
    )
    folder = warehouse.report_dir(f"evaluation/{challenger.version}")
    write_bytes_atomic(curves, folder / "curves.png")
    write_bytes_atomic(calibration, folder / "calibration_confusion.png")
    html = _html_report(
        challenger.version,
        [
            ("Gate", f"<p><b>{'PASSED' if decision.passed else 'REJECTED'}</b>: "
                     f"{decision.reason}</p>"),
            (f"Metrics (decision threshold {threshold:.3f}, chosen for best F1 on validation)",
             "<p><code>in_sample</code>: the model trained on some of these rows; its metrics "
             "there measure the fit, not the model. The gate reads only the frozen set.</p>"
             + _html_table(table)),
            ("ROC and precision-recall on the frozen set", f"<img src='{_data_uri(curves)}'>"),
            ("Calibration and confusion matrix", f"<img src='{_data_uri(calibration)}'>"),
            ("Per month (challenger)", _html_table(per_month)),
            ("Per carrier (challenger, frozen set)", _html_table(per_carrier)),
        ],
    )  # fmt: skip
    write_text_atomic(html, folder / "index.html")

    rounded = table.with_columns(pl.col(c).round(4) for c in SHOWN_METRICS)
    yield dg.MaterializeResult(
        metadata={
            "challenger_version": dg.MetadataValue.text(challenger.version),
            "champion_version": dg.MetadataValue.text(champion_version or "none"),
            # A refit champion that trained on the frozen months is compared through its gated
            # model, trained without them.
            "champion_compared_as": dg.MetadataValue.text(champion.version if champion else "none"),
            "gate_passed": dg.MetadataValue.bool(decision.passed),
            "refit_on_all_months": dg.MetadataValue.bool(config.refit_on_all_months),
            "newer_months": dg.MetadataValue.text(", ".join(newer) or "none"),
            "gate_reason": dg.MetadataValue.text(decision.reason),
            "frozen_auc": dg.MetadataValue.float(frozen["challenger"].get("auc", math.nan)),
            "test_auc": dg.MetadataValue.float(
                metrics[("test", "challenger")].get("auc", math.nan)
            ),
            "threshold": dg.MetadataValue.float(threshold),
            "metrics": dg.MetadataValue.md(markdown_table(rounded, 20)),
            "per_month": dg.MetadataValue.md(markdown_table(per_month.with_columns(
                pl.col(pl.Float64).round(4)), 24)),
            "per_carrier": dg.MetadataValue.md(markdown_table(per_carrier.with_columns(
                pl.col(pl.Float64).round(4)), 24)),
            "curves": dg.MetadataValue.md(png_markdown(curves, "ROC and PR curves")),
            "calibration": dg.MetadataValue.md(png_markdown(calibration, "calibration")),
            "report": dg.MetadataValue.path(str(folder / "index.html")),
        }
    )  # fmt: skip
    yield dg.AssetCheckResult(
        check_name=GATE,
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision.reason,
        metadata={
            "challenger_version": dg.MetadataValue.text(challenger.version),
            "threshold_min_auc_gain": dg.MetadataValue.float(config.min_auc_gain),
            **{k: dg.MetadataValue.float(float(v)) for k, v in decision.details.items()
               if isinstance(v, float)},
        },
    )  # fmt: skip


def _serves_already(
    registry: ModelRegistryResource,
    champion: StoredModel,
    gated: StoredModel,
    months: list[str] | None,
) -> bool:
    """Whether promoting ``gated`` would change nothing (a retried or repeated step): the
    champion is ``gated`` itself, or (``months``: refitting) its refit on exactly those months."""
    if months is None:
        return champion.sha256 == gated.sha256
    refits = (
        champion.refit_of is not None and registry.load(champion.refit_of).sha256 == gated.sha256
    )
    return refits and champion.trained_months == months


class PromotionConfig(dg.Config):
    num_threads: int = 2
    """LightGBM threads of the refit (``model_evaluation``'s ``refit_on_all_months``)."""


def _refit_on_all_months(
    context: dg.AssetExecutionContext,
    registry: ModelRegistryResource,
    gated: StoredModel,
    training_set: pl.DataFrame,
    num_threads: int,
) -> str:
    """Register ``gated``'s parameters and rounds fit on every row of the training set."""
    months = sorted(training_set.get_column("month_key").unique().to_list())
    params = gated.manifest["params"]
    preprocessor = Preprocessor.fit(training_set)
    booster = fit(
        {k: params[k] for k in TUNED_PARAMS}, Matrix.from_features(training_set, preprocessor),
        int(params["num_boost_round"]), seed=int(params["seed"]), num_threads=num_threads,
    )  # fmt: skip
    newest = training_set.filter(pl.col("month_key") == months[-1])
    scores = booster.predict(Matrix.from_features(newest, preprocessor).x)
    if not np.isfinite(scores).all():
        raise dg.Failure(f"the refit of {gated.version} predicts NaN or inf; nothing promoted")
    evaluation = dg.AssetKey("model_evaluation")
    manifest = {
        **{k: v for k, v in gated.manifest.items()
           if k not in ("version", "sha256", "preprocessor_sha256", "created_at")},
        "training": {
            **gated.manifest["training"],
            "months": {"train": months, "valid": [], "test": []},
            "fit_on": ["train"],
            "rows": {"train": training_set.height, "valid": 0, "test": 0},
            "partitions": partition_versions(context, months),
            "dagster_run_id": context.run.run_id,
            "compute": TrainedWhere.here().as_dict(),
        },
        "refit_of": {
            "version": gated.version,
            "sha256": gated.sha256,
            "months": gated.manifest["training"]["months"],
            "frozen_auc": latest_metadata_value(context.instance, evaluation, "frozen_auc"),
            "note": "metrics are the gated model's: the refit has no month it did not train on",
        },
    }  # fmt: skip
    registered = registry.register(booster.model_to_string(), preprocessor.to_json(), manifest)
    context.log.info(
        f"refit {gated.version} on {months[0]}..{months[-1]} ({training_set.height} rows): "
        f"{registered['version']}"
    )
    return registered["version"]


@dg.asset(
    group_name="evaluate",
    kinds={"registry", "lightgbm"},
    deps=["model_evaluation", "training_set"],
)
def champion_model(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    warehouse: WarehouseResource,
    registry: ModelRegistryResource,
    mlflow_tracking: MlflowResource,
) -> dg.MaterializeResult:
    """The champion alias, moved once the promotion gate has passed: to the gated challenger
    refit on every landed month (by default), or to the gated challenger itself."""
    key = dg.AssetKey("model_evaluation")
    version = latest_metadata_value(context.instance, key, "challenger_version")
    passed = latest_metadata_value(context.instance, key, "gate_passed")
    reason = str(latest_metadata_value(context.instance, key, "gate_reason"))
    if version is None or not passed:
        raise dg.Failure(f"the promotion gate did not pass for {version}: {reason}")
    previous = registry.champion()
    current = registry.load(previous) if previous else None
    gated = registry.load(str(version))
    refit = latest_metadata_value(context.instance, key, "refit_on_all_months") is not False
    training_set = warehouse.read("training_set") if refit else None
    months = (
        sorted(training_set.get_column("month_key").unique().to_list())
        if training_set is not None
        else None
    )
    promoted, tracked = gated, None
    if current is not None and _serves_already(registry, current, gated, months):
        promoted = current
    elif training_set is not None:
        refit_version = _refit_on_all_months(
            context, registry, gated, training_set, config.num_threads
        )
        promoted = registry.load(refit_version)
        reason = f"{reason}; serving its refit on every landed month, {refit_version}"
        tracked = mlflow_tracking.log_challenger(promoted, pl.DataFrame(), role="refit")
    served = promoted.version
    entry = registry.promote(served, reason)
    mirrored = mlflow_tracking.sync_aliases(registry.aliases())  # no-op without MLflow
    history = pl.DataFrame(registry.decisions()[-10:]).select(
        pl.col(c) for c in ("at", "action", "version", "reason")
    )
    context.log.info(f"champion: {previous} -> {served} ({entry['reason']})")
    return dg.MaterializeResult(
        metadata={
            "version": dg.MetadataValue.text(served),
            "gated_version": dg.MetadataValue.text(str(version)),
            "previous_champion": dg.MetadataValue.text(previous or "none"),
            "sha256": dg.MetadataValue.text(promoted.sha256),
            "trained_on_months": dg.MetadataValue.text(", ".join(promoted.trained_months)),
            "reason": dg.MetadataValue.text(entry["reason"]),
            "decisions": dg.MetadataValue.md(markdown_table(history, 10)),
            **{f"mlflow_{k}": dg.MetadataValue.text(str(v)) for k, v in mirrored.items()},
            **{f"mlflow_refit_{k}": dg.MetadataValue.text(str(v))
               for k, v in (tracked or {}).items()},
        }
    )  # fmt: skip


@dg.op
def rollback_champion(
    context: dg.OpExecutionContext,
    registry: ModelRegistryResource,
    mlflow_tracking: MlflowResource,
) -> None:
    """Restore the previous champion exactly."""
    entry = registry.rollback(reason=f"rollback job, run {context.run_id}")
    mlflow_tracking.sync_aliases(registry.aliases())  # no-op without MLflow
    context.log_event(
        dg.AssetMaterialization(
            asset_key="champion_model",
            description="rolled back",
            metadata={
                "version": entry["version"],
                "previous_champion": entry["previous"],
                "reason": entry["reason"],
            },
        )
    )


@dg.job(description="Move the champion alias back to the previous champion.")
def rollback_job() -> None:
    rollback_champion()


assets = [frozen_eval_set, model_evaluation, champion_model]
jobs = [rollback_job]
