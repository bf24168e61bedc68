"""Preprocessing fitted on the training split and saved with the features as JSON.

- Categories: codes follow the sorted list of categories seen in training, so the mapping is
  stable for the same training data. A category never seen in training (or a null) encodes to
  null; LightGBM routes it like a missing value, the linear baseline gives it all-zero one-hots.
- Numeric missing values stay null for LightGBM; the linear baseline imputes the training
  median, then standardizes with the training mean and standard deviation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
import polars as pl

from mlops_assets.features.transform import CATEGORICAL_FEATURES, NUMERIC_FEATURES

FORMAT_VERSION = 1


@cache
def _category_codes(categories: tuple[str, ...]) -> tuple[pl.Series, pl.Series]:
    """Built once per category list: serving encodes a handful of rows per call."""
    return (
        pl.Series("key", categories, dtype=pl.String),
        pl.Series("code", range(len(categories)), dtype=pl.Int32),
    )


@dataclass(frozen=True)
class Preprocessor:
    categories: dict[str, list[str]]
    medians: dict[str, float]
    means: dict[str, float]
    stds: dict[str, float]
    format_version: int = FORMAT_VERSION

    @classmethod
    def fit(cls, train: pl.DataFrame) -> Preprocessor:
        if train.is_empty():
            raise ValueError("cannot fit preprocessing on an empty training split")
        categories = {
            c: sorted(train.get_column(c).drop_nulls().unique().to_list())
            for c in CATEGORICAL_FEATURES
        }
        stats = train.select(
            *(pl.col(c).median().alias(f"median:{c}") for c in NUMERIC_FEATURES),
        ).row(0, named=True)
        medians = {c: float(stats[f"median:{c}"] or 0.0) for c in NUMERIC_FEATURES}
        imputed = train.select(pl.col(c).fill_null(medians[c]) for c in NUMERIC_FEATURES)
        means = {c: float(imputed.get_column(c).mean() or 0.0) for c in NUMERIC_FEATURES}
        stds = {c: float(imputed.get_column(c).std() or 0.0) or 1.0 for c in NUMERIC_FEATURES}
        return cls(categories=categories, medians=medians, means=means, stds=stds)

    def _codes(self, column: str) -> pl.Expr:
        keys, codes = _category_codes(tuple(self.categories[column]))
        return pl.col(column).replace_strict(keys, codes, default=None, return_dtype=pl.Int32)

    def transform(self, features: pl.DataFrame) -> pl.DataFrame:
        """Model inputs for LightGBM: numeric as Float64 (nulls kept), categories as codes."""
        return features.select(
            *(pl.col(c).cast(pl.Float64) for c in NUMERIC_FEATURES),
            *(self._codes(c).alias(c) for c in CATEGORICAL_FEATURES),
        )

    def transform_linear(self, features: pl.DataFrame) -> np.ndarray:
        """Imputed, standardized numerics and one-hot categories, for a linear model."""
        numeric = features.select(
            ((pl.col(c).cast(pl.Float64).fill_null(self.medians[c]) - self.means[c])
             / self.stds[c]).alias(c)
            for c in NUMERIC_FEATURES
        )  # fmt: skip
        onehots = features.select(
            (pl.col(c) == value).fill_null(False).cast(pl.Float64).alias(f"{c}={value}")
            for c in CATEGORICAL_FEATURES
            for value in self.categories[c]
        )
        return np.hstack([numeric.to_numpy(), onehots.to_numpy()])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Preprocessor:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported preprocessor format {data.get('format_version')!r}")
        return cls(**data)
