"""Optional MLflow tracking, mirrored from our own registry (which stays the source of truth).

Off unless ``MLFLOW_TRACKING_URI`` is set *and* the ``mlflow`` extra is installed
(``uv sync --extra mlflow``). Then every challenger becomes an MLflow run with its parameters,
validation metrics, the Optuna trial history, plots (gain importance, search history) and the
model as LightGBM **text** (``model/model.txt``, the registry's exact bytes; nothing is
pickled), registered as a version of the MLflow model ``flight-delay`` tagged with our version.
Promotions and rollbacks move the same aliases there as in our registry (``champion``,
``previous_champion``).

Tracking is a mirror: an MLflow failure is logged as a warning and reported in the asset's
metadata, and never fails a training run or a promotion.
"""

import importlib.util
import io
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import polars as pl

if TYPE_CHECKING:  # resources/__init__.py imports this module: no import back at run time
    from resources.registry import StoredModel

MODEL_NAME = "flight-delay"
VERSION_TAG = "mlops_version"
ALIASES = ("champion", "previous_champion")


def mlflow_installed() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out |= _flatten(f"{prefix}.{key}" if prefix else str(key), item)
        return out
    text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return {prefix: text[:6000]}  # MLflow's limit on a parameter value


def _png(draw: Any) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    draw(figure.subplots())
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def importance_png(model_text: str, top: int = 20) -> bytes:
    """Gain importance of the model's features (read back from its text)."""
    import lightgbm as lgb

    booster = lgb.Booster(model_str=model_text)
    gains = sorted(
        zip(booster.feature_name(), booster.feature_importance("gain"), strict=True),
        key=lambda item: item[1],
    )[-top:]

    def draw(ax: Any) -> None:
        ax.barh([name for name, _ in gains], [float(gain) for _, gain in gains])
        ax.set_xlabel("total gain")
        ax.set_title("feature importance")

    return _png(draw)


def search_history_png(trials: pl.DataFrame) -> bytes:
    """Validation AUC of every Optuna trial, and the best so far."""
    done = trials.filter(pl.col("valid_auc").is_not_null()).sort("trial")

    def draw(ax: Any) -> None:
        ax.plot(done["trial"], done["valid_auc"], "o", label="trial")
        ax.plot(done["trial"], done["valid_auc"].cum_max(), "-", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation AUC")
        ax.legend()

    return _png(draw)


class MlflowResource(dg.ConfigurableResource):
    """An MLflow tracking server or store (``MLFLOW_TRACKING_URI``); empty = tracking off."""

    tracking_uri: str = ""
    experiment: str = "mlops-assets"
    registered_model: str = MODEL_NAME
    artifact_location: str = ""
    """Where a newly created experiment keeps artifacts; empty: next to a SQLite store's file
    (``<dir>/mlartifacts``), or the tracking server's default."""

    @property
    def enabled(self) -> bool:
        return bool(self.tracking_uri) and mlflow_installed()

    def _warn_if_not_installed(self) -> None:
        if self.tracking_uri and not mlflow_installed():
            dg.get_dagster_logger().warning(
                "MLFLOW_TRACKING_URI is set but mlflow is not installed "
                "(uv sync --extra mlflow); nothing is tracked"
            )

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def _artifact_location(self) -> str | None:
        if self.artifact_location:
            return self.artifact_location
        if self.tracking_uri.startswith("sqlite:///"):
            database = Path(self.tracking_uri.removeprefix("sqlite:///"))
            return (database.parent / "mlartifacts").resolve().as_uri()
        return None

    def _experiment_id(self, client: Any) -> str:
        found = client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        return client.create_experiment(self.experiment, self._artifact_location())

    def _model_version(self, client: Any, version: str) -> str | None:
        """The MLflow version number that mirrors our registry's ``version``."""
        hits = client.search_model_versions(
            f"name = '{self.registered_model}' and tags.{VERSION_TAG} = '{version}'"
        )
        found = max((int(h.version) for h in hits), default=None)
        return None if found is None else str(found)

    def log_challenger(
        self, model: "StoredModel", trials: pl.DataFrame, role: str = "challenger"
    ) -> dict[str, str] | None:
        """One MLflow run for a registered challenger, and a registered model version for it.

        Returns ``{"run_id", "model_version"}``, ``{"error"}`` when MLflow failed (the caller
        carries on), or None when tracking is off.
        """
        self._warn_if_not_installed()
        if not self.enabled:
            return None
        try:
            return self._log_challenger(model, trials, role)
        except Exception as exc:  # a mirror: tracking problems never fail training
            dg.get_dagster_logger().warning(f"MLflow: {model.version} not logged: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _log_challenger(
        self, model: "StoredModel", trials: pl.DataFrame, role: str
    ) -> dict[str, str]:
        from mlflow.entities import Metric, Param, RunTag

        manifest = model.manifest
        client = self.client()
        training = manifest.get("training", {})
        run = client.create_run(
            self._experiment_id(client),
            run_name=f"{role} {model.version}",
            tags={
                VERSION_TAG: model.version,
                "mlops_sha256": manifest["sha256"],
                "mlops_code_version": str(manifest.get("code_version")),
                "dagster_run_id": str(training.get("dagster_run_id")),
            },
        )
        run_id = run.info.run_id
        try:
            params = _flatten("", manifest.get("params", {})) | _flatten(
                "search", manifest.get("search", {})
            )
            params |= {f"{s}_months": ",".join(m) for s, m in training.get("months", {}).items()}
            now = int(run.info.start_time)
            metrics = [
                Metric(key, float(value), now, 0)
                for key, value in manifest.get("metrics", {}).items()
                if isinstance(value, int | float) and math.isfinite(value)
            ]
            metrics += [
                Metric("trial_valid_auc", float(row["valid_auc"]), now, int(row["trial"]))
                for row in trials.iter_rows(named=True)
                if row.get("valid_auc") is not None
            ]
            client.log_batch(
                run_id,
                metrics=metrics,
                params=[Param(k, v) for k, v in sorted(params.items())],
                tags=[RunTag("mlops_registry_model", f"{model.version}/model.txt")],
            )
            with tempfile.TemporaryDirectory(prefix="mlops-mlflow-") as tmp:
                folder = Path(tmp)
                (folder / "model").mkdir()
                (folder / "model" / "model.txt").write_text(model.model_text, encoding="utf-8")
                (folder / "model" / "preprocessor.json").write_text(
                    model.preprocessor_json, encoding="utf-8"
                )
                (folder / "model" / "manifest.json").write_text(
                    json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8"
                )
                (folder / "plots").mkdir()
                (folder / "plots" / "feature_importance.png").write_bytes(
                    importance_png(model.model_text)
                )
                if trials.height:
                    (folder / "plots" / "search_history.png").write_bytes(
                        search_history_png(trials)
                    )
                trials.write_csv(folder / "trials.csv")
                client.log_artifacts(run_id, str(folder))
            registered = self._register(client, model, f"{run.info.artifact_uri}/model", run_id)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id)
        return {"run_id": run_id, "model_version": registered}

    def _register(self, client: Any, model: "StoredModel", source: str, run_id: str) -> str:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(
                self.registered_model,
                description="Mirror of the mlops-assets registry (P(arrival > 15 min late)).",
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            self.registered_model,
            source,
            run_id=run_id,
            tags={VERSION_TAG: model.version, "mlops_sha256": model.manifest["sha256"]},
            description=f"mlops-assets {model.version}",
        )
        return str(version.version)

    def sync_aliases(self, aliases: dict[str, str | None]) -> dict[str, str | None]:
        """Point each MLflow alias at the version mirroring ours (or drop it); returns the
        MLflow version per alias, or ``{"error": ...}``. Nothing when tracking is off."""
        self._warn_if_not_installed()
        if not self.enabled:
            return {}
        try:
            return self._sync_aliases(aliases)
        except Exception as exc:  # a mirror: tracking problems never fail a promotion
            dg.get_dagster_logger().warning(f"MLflow: aliases not synced: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _sync_aliases(self, aliases: dict[str, str | None]) -> dict[str, str | None]:
        from mlflow.exceptions import MlflowException

        client = self.client()
        synced: dict[str, str | None] = {}
        for alias in ALIASES:
            ours = aliases.get(alias)
            mirrored = self._model_version(client, ours) if ours else None
            if mirrored is None:
                try:
                    client.delete_registered_model_alias(self.registered_model, alias)
                except MlflowException as exc:
                    if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                        raise
                if ours:
                    dg.get_dagster_logger().warning(
                        f"MLflow: {ours} was never logged to MLflow; alias {alias} dropped there"
                    )
            else:
                client.set_registered_model_alias(self.registered_model, alias, mirrored)
            synced[alias] = mirrored
        return synced
