"""The challenger: LightGBM tuned with Optuna on the training split, stored in the registry."""

import dagster as dg
import polars as pl

from mlops_assets.evaluate.metrics import best_f1_threshold, binary_metrics
from mlops_assets.features.assets import PREPROCESSOR_FILE
from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import FEATURES, LABEL
from mlops_assets.metadata import latest_materialization, markdown_table, partition_versions
from mlops_assets.train.mlflow_bridge import MlflowResource
from mlops_assets.train.model import BASE_PARAMS, Matrix, SearchSettings, fit, fit_with_params
from mlops_assets.train.on_ray import TrainedWhere, run_search
from mlops_assets.version import code_version
from resources.ray import RayResource
from resources.registry import ModelRegistryResource
from resources.warehouse import WarehouseResource


class TrainConfig(dg.Config):
    n_trials: int = 8
    """Optuna trials; the default trains in well under a minute on 2 cores."""
    timeout_seconds: float = 0.0
    """Stop the search after this many seconds (0 = no limit; a time limit makes the number
    of trials, and so the model bytes, depend on the machine's speed)."""
    seed: int = 13
    num_threads: int = 2
    reuse_champion_params: bool = False
    """Skip the search: train with the serving champion's tuned parameters, early stopping on
    the validation months for the round count (the retraining loop's runs set it; with no
    champion yet, the search runs)."""


@dg.asset(group_name="train", kinds={"lightgbm", "optuna"}, deps=["training_set"])
def challenger_model(
    context: dg.AssetExecutionContext,
    config: TrainConfig,
    warehouse: WarehouseResource,
    registry: ModelRegistryResource,
    ray_serve: RayResource,
    mlflow_tracking: MlflowResource,
) -> dg.MaterializeResult:
    """A LightGBM model tuned with Optuna on the training months (early stopping on the
    validation months), then fit on both, registered as a challenger."""
    frame = warehouse.read("training_set")
    preprocessor_json = (warehouse.table_dir("training_set") / PREPROCESSOR_FILE).read_text()
    preprocessor = Preprocessor.from_json(preprocessor_json)
    splits = {s: frame.filter(pl.col("split") == s) for s in ("train", "valid", "test")}
    settings = SearchSettings(
        n_trials=config.n_trials,
        timeout_seconds=config.timeout_seconds or None,
        seed=config.seed,
        num_threads=config.num_threads,
    )
    valid = Matrix.from_features(splits["valid"], preprocessor)
    # In this process by default; a Ray task on the cluster when RAY_ADDRESS is set.
    train = Matrix.from_features(splits["train"], preprocessor)
    champion = registry.champion() if config.reuse_champion_params else None
    if champion is not None:
        # One early-stopped fit instead of a search: cheap, so it runs here even with a cluster.
        result = fit_with_params(registry.manifest(champion)["params"], train, valid, settings)
        where = TrainedWhere.here()
        params_from = f"champion {champion}"
    else:
        result, where = run_search(train, valid, settings, ray_serve)
        params_from = "search"
    context.log.info(f"parameters: {params_from}")
    # Measured before the validation months join the training: out of sample.
    valid_p = result.booster.predict(valid.x)
    valid_metrics = {
        **binary_metrics(valid.y, valid_p, threshold=0.5),
        "best_f1_threshold": best_f1_threshold(valid.y, valid_p),
    }
    # Once they have chosen the parameters and the round count, the validation months are
    # trained on too: the newest of them is the month most like the ones to come (measured in
    # benchmarks/README.md, replay_retraining). Its own preprocessing: the categories seen there.
    fit_frame = pl.concat([splits["train"], splits["valid"]])
    fit_preprocessor = Preprocessor.fit(fit_frame)
    booster = fit(
        result.params, Matrix.from_features(fit_frame, fit_preprocessor), result.best_iteration,
        seed=config.seed, num_threads=config.num_threads,
    )  # fmt: skip
    months = {s: sorted(f.get_column("month_key").unique().to_list()) for s, f in splits.items()}
    training_set_version = latest_materialization(context.instance, dg.AssetKey("training_set"))
    manifest = registry.register(
        booster.model_to_string(),
        fit_preprocessor.to_json(),
        {
            "task": f"P({LABEL}): arrival more than 15 minutes late",
            "params": {
                **BASE_PARAMS,
                **result.params,
                "seed": config.seed,
                "num_boost_round": result.best_iteration,
            },
            "features": [
                {
                    "name": f.name,
                    "kind": f.kind,
                    "dtype": "float64" if f.kind == "numeric" else "category code (int)",
                    "missing": f.missing,
                    "description": f.description,
                }
                for f in FEATURES
            ],
            "metrics": {f"valid_{k}": v for k, v in valid_metrics.items()},
            "search": {
                "params_from": params_from,
                "trials": result.trials.height,
                "pruned": result.pruned,
                "seconds": round(result.seconds, 2),
                "n_trials": config.n_trials,
                "timeout_seconds": config.timeout_seconds,
            },
            "training": {
                "months": months,
                "fit_on": ["train", "valid"],
                "rows": {s: f.height for s, f in splits.items()},
                "partitions": partition_versions(context, months["train"] + months["valid"]),
                "training_set_data_version": (training_set_version.tags or {}).get(
                    "dagster/data_version"
                )
                if training_set_version
                else None,
                "dagster_run_id": context.run.run_id,
                "compute": where.as_dict(),
            },
            "code_version": code_version(),
        },
    )
    context.log.info(f"registered {manifest['version']} (sha256 {manifest['sha256'][:12]})")
    # Mirrored to MLflow only when MLFLOW_TRACKING_URI is set (and the `mlflow` extra installed).
    tracked = (
        mlflow_tracking.log_challenger(registry.load(manifest["version"]), result.trials)
        if mlflow_tracking.tracking_uri
        else None
    )
    best = pl.DataFrame([{"parameter": k, "value": str(v)} for k, v in result.params.items()])
    return dg.MaterializeResult(
        metadata={
            "version": dg.MetadataValue.text(manifest["version"]),
            "sha256": dg.MetadataValue.text(manifest["sha256"]),
            "valid_auc": dg.MetadataValue.float(result.best_valid_auc),
            "rounds": dg.MetadataValue.int(result.best_iteration),
            "params_from": dg.MetadataValue.text(params_from),
            "trials": dg.MetadataValue.int(result.trials.height),
            "pruned_trials": dg.MetadataValue.int(result.pruned),
            "search_seconds": dg.MetadataValue.float(round(result.seconds, 2)),
            "trained_on": dg.MetadataValue.text(where.describe()),
            "best_params": dg.MetadataValue.md(markdown_table(best, 20)),
            "trial_table": dg.MetadataValue.md(markdown_table(result.trials, 50)),
            "train_months": dg.MetadataValue.text(", ".join(months["train"])),
            "code_version": dg.MetadataValue.text(manifest["code_version"]),
            **{f"mlflow_{k}": dg.MetadataValue.text(v) for k, v in (tracked or {}).items()},
        }
    )


assets = [challenger_model]
