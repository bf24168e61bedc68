"""Small slices of the real data, validated the way the pipeline validates them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import polars as pl

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import BOOKING_COLUMNS, FEATURES, LABEL, build_features
from mlops_assets.train.model import Matrix, fit
from mlops_assets.validate.quarantine import validate_table
from mlops_assets.validate.schemas import TABLES
from resources.package_data import read_package_table
from resources.registry import ModelRegistryResource
from resources.warehouse import WarehouseResource


def valid_table(table: str, month: int | None = None) -> pl.DataFrame:
    """The package's ``table`` (one month of it, when given) after validation."""
    raw = read_package_table(table)
    if month is not None:
        raw = raw.filter(pl.col("month") == month)
    return validate_table(raw, TABLES[table], source="package", partition=None).valid


# -- a warehouse and a registry with real models, for serving tests and benchmarks ----------

ModelMaker = Callable[["January"], tuple[lgb.Booster, dict[str, Any]]]


class January:
    """The validated January flights with their features, for training small real models."""

    def __init__(self, flights: pl.DataFrame, weather: pl.DataFrame, planes: pl.DataFrame) -> None:
        self.flights = flights
        self.labelled = build_features(flights, weather, planes).filter(pl.col(LABEL).is_not_null())
        self.preprocessor = Preprocessor.fit(self.labelled)

    def matrix(self, days: tuple[int, int] = (1, 31)) -> Matrix:
        """The model inputs of the flights on these days of the month (inclusive)."""
        day = self.labelled.get_column("flight_date").dt.day()
        rows = self.labelled.filter(day.is_between(*days))
        return Matrix.from_features(rows, self.preprocessor)


def small_lightgbm(seed: int, leaves: int, rounds: int = 20) -> ModelMaker:
    """A LightGBM model of fixed size on all of January (the serving tests' models)."""

    def make(data: January) -> tuple[lgb.Booster, dict[str, Any]]:
        params = {"num_leaves": leaves, "learning_rate": 0.1, "min_child_samples": 50}
        booster = fit(params, data.matrix(), rounds, seed=seed, num_threads=2)
        return booster, {**params, "num_boost_round": rounds}

    return make


@dataclass(frozen=True)
class ServingStores:
    """A warehouse with January's reference tables and a registry with real models."""

    home: Path
    warehouse: WarehouseResource
    registry: ModelRegistryResource
    versions: list[str]
    flights: pl.DataFrame

    def bookings(self, n: int, seed: int) -> list[dict[str, Any]]:
        """``n`` distinct January flights as booking records (what ``/predict`` takes)."""
        return self.flights.select(list(BOOKING_COLUMNS)).sample(n, seed=seed).to_dicts()


def serving_stores(home: Path, models: list[ModelMaker]) -> ServingStores:
    """Write January's weather and planes to a warehouse under ``home`` and register
    ``models`` (trained on January by the project's feature and training code) in a registry."""
    flights, weather, planes = valid_table("flights", 1), valid_table("weather"), valid_table(
        "planes")  # fmt: skip
    warehouse = WarehouseResource(root=str(home / "warehouse"), reports_root=str(home / "reports"))
    warehouse.write("weather", weather, "2013-01")
    warehouse.write("planes", planes)
    registry = ModelRegistryResource(root=str(home / "registry"))
    data = January(flights, weather, planes)
    versions = []
    for make in models:
        booster, params = make(data)
        manifest = registry.register(
            booster.model_to_string(),
            data.preprocessor.to_json(),
            {
                "params": params,
                "features": [{"name": f.name, "kind": f.kind} for f in FEATURES],
                "metrics": {"valid_auc": 0.7},
                "training": {"months": {"train": ["2013-01"]}},
            },
        )
        versions.append(manifest["version"])
    return ServingStores(home, warehouse, registry, versions, flights)
