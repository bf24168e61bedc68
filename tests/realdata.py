"""Small slices of the real data, validated the way the pipeline validates them."""

from __future__ import annotations

import polars as pl

from mlops_assets.validate.quarantine import validate_table
from mlops_assets.validate.schemas import TABLES
from resources.package_data import read_package_table


def valid_table(table: str, month: int | None = None) -> pl.DataFrame:
    """The package's ``table`` (one month of it, when given) after validation."""
    raw = read_package_table(table)
    if month is not None:
        raw = raw.filter(pl.col("month") == month)
    return validate_table(raw, TABLES[table], source="package", partition=None).valid
