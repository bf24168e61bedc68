"""Typed Dagster resources: the sources, the warehouse and its IO manager."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from mlops_assets.train.mlflow_bridge import MlflowResource
from resources.database import ReferenceDatabaseResource
from resources.files import LandingFilesResource
from resources.prediction_log import PredictionLogResource
from resources.ray import RayResource
from resources.registry import ModelRegistryResource
from resources.retrain_policy import RetrainPolicyResource
from resources.settings import mlops_paths, storage_roots
from resources.warehouse import WarehouseIOManager, WarehouseResource
from resources.weather import WeatherSourceResource


def _env(name: str) -> Any:
    """``dg.EnvVar(name)`` when it is set (resolved by Dagster, never logged), else ``""``."""
    return dg.EnvVar(name) if os.environ.get(name) else ""


def _flag(name: str) -> bool:
    """A yes/no setting: unset, ``0`` or ``1``; anything else is refused with its name."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def default_resources() -> dict[str, Any]:
    """The embedded defaults under ``MLOPS_HOME``; URLs and secrets only from the environment."""
    paths = mlops_paths()
    warehouse_root, registry_root = storage_roots()  # MLOPS_STORAGE_URL: an object store
    warehouse = WarehouseResource(root=warehouse_root, reports_root=str(paths.reports))
    return {
        "landing": LandingFilesResource(landing_dir=str(paths.landing)),
        "reference_db": ReferenceDatabaseResource(
            url=_env("MLOPS_REFERENCE_DB_URL"),
            sqlite_path=str(paths.sources / "reference.sqlite"),
        ),
        "weather_api": WeatherSourceResource(
            base_url=_env("MLOPS_WEATHER_API_URL"), api_token=_env("MLOPS_WEATHER_API_TOKEN")
        ),
        "warehouse": warehouse,
        "registry": ModelRegistryResource(root=registry_root),
        "prediction_log_files": PredictionLogResource(folder=str(paths.prediction_log)),
        "ray_serve": RayResource(
            address=_env("RAY_ADDRESS"),
            state_dir=str(paths.home / "ray"),
            api_token=_env("MLOPS_API_TOKEN"),
            http_port=int(os.environ.get("MLOPS_SERVE_PORT") or 8000),
            direct_ingress=_flag("MLOPS_SERVE_DIRECT_INGRESS"),
        ),
        "io_manager": WarehouseIOManager(warehouse=warehouse),
        "mlflow_tracking": MlflowResource(
            tracking_uri=_env("MLFLOW_TRACKING_URI"),
            artifact_location=_env("MLFLOW_ARTIFACT_LOCATION"),
        ),
        "retrain_policy": RetrainPolicyResource(
            cooldown_seconds=int(os.environ.get("MLOPS_RETRAIN_COOLDOWN_SECONDS") or 120),
            n_trials=int(os.environ.get("MLOPS_RETRAIN_TRIALS") or 0),
            reuse_champion_params=not _flag("MLOPS_RETRAIN_SEARCH"),
        ),
    }
