"""The warehouse: one Parquet file per table partition, queried with DuckDB in memory.

DuckDB allows one writer process per database file, and Dagster steps, overlapping runs and
serving replicas are all separate processes. So no process ever holds a DuckDB database file
open for writing: every table partition is its own Parquet file written atomically (temp file +
rename), and DuckDB reads them through in-memory connections with one view per table.

``root`` may be a URL (``s3://bucket/prefix/warehouse``, any fsspec protocol, through
universal-pathlib): each partition is then one object written with a single PUT and read back
through fsspec. On an object store ``scan`` reads the partitions eagerly (then returns a lazy
frame), and ``connect`` loads every stored table into the in-memory DuckDB instead of making
views on files (DuckDB's own S3 reader needs its httpfs extension, which it downloads), so it
suits the small tables here, not a scan over years of partitions. ``reports_root`` (HTML
reports, PNGs) stays on the local disk.
"""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl

from resources.storage import (
    StoragePath,
    is_local,
    read_parquet,
    storage_path,
    write_parquet_atomic,
)

UNPARTITIONED = "all"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WarehouseWriteError(OSError):
    """A table partition could not be written (disk full, read-only, ...); nothing was replaced."""


class WarehouseResource(dg.ConfigurableResource):
    """Tables as ``<root>/<table>/<partition>.parquet`` (``all.parquet`` when unpartitioned)."""

    root: str
    reports_root: str

    @property
    def on_object_store(self) -> bool:
        return not is_local(storage_path(self.root))

    def table_dir(self, table: str) -> StoragePath:
        if not _NAME_RE.match(table):
            raise ValueError(f"table names are identifiers, got {table!r}")
        return storage_path(self.root) / table

    def path(self, table: str, partition: str | None = None) -> StoragePath:
        return self.table_dir(table) / f"{partition or UNPARTITIONED}.parquet"

    def write(self, table: str, frame: pl.DataFrame, partition: str | None = None) -> StoragePath:
        target = self.path(table, partition)
        try:
            return write_parquet_atomic(frame, target)
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise WarehouseWriteError(
                f"could not store table {table!r} partition {partition or UNPARTITIONED!r} at "
                f"{target}: {exc}; the stored version, if any, is unchanged"
            ) from exc

    def partitions(self, table: str) -> list[str]:
        folder = self.table_dir(table)
        if not folder.exists():
            return []
        return sorted(p.stem for p in folder.glob("*.parquet"))

    def scan(self, table: str, partitions: list[str] | None = None) -> pl.LazyFrame:
        """Lazily read the given partitions (all stored ones by default)."""
        wanted = self.partitions(table) if partitions is None else partitions
        missing = [p for p in wanted if not self.path(table, p).exists()]
        if missing:
            raise FileNotFoundError(f"table {table!r} has no partition(s) {missing}")
        if not wanted:
            raise FileNotFoundError(f"table {table!r} has no stored partitions in {self.root}")
        if self.on_object_store:  # read through fsspec, eagerly (see the module docstring)
            frames = [read_parquet(self.path(table, p)) for p in wanted]
            return pl.concat(frames, how="vertical").lazy()
        return pl.scan_parquet([self.path(table, p) for p in wanted])

    def read(self, table: str, partitions: list[str] | None = None) -> pl.DataFrame:
        return self.scan(table, partitions).collect()

    def report_dir(self, name: str) -> Path:
        folder = Path(self.reports_root) / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with a read-only view per stored table.

        On an object store each table is read through fsspec and loaded into the connection.
        """
        con = duckdb.connect(":memory:")
        if self.on_object_store:
            root = storage_path(self.root)
            if root.exists():
                for folder in sorted((p for p in root.iterdir() if p.is_dir()),
                                     key=lambda p: p.name):  # fmt: skip
                    if _NAME_RE.match(folder.name) and self.partitions(folder.name):
                        con.register(folder.name, self.read(folder.name).to_arrow())
            return con
        root = Path(self.root)
        if root.exists():
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                if _NAME_RE.match(folder.name) and any(folder.glob("*.parquet")):
                    pattern = str(folder / "*.parquet").replace("'", "''")
                    con.execute(
                        f'CREATE VIEW "{folder.name}" AS '
                        f"SELECT * FROM read_parquet('{pattern}', union_by_name=true)"
                    )
        return con


class WarehouseIOManager(dg.ConfigurableIOManager):
    """Stores asset outputs (polars frames) in the warehouse, one file per partition.

    An unpartitioned asset that reads a partitioned one gets every partition that has been
    stored (the months that have landed so far), in partition order.
    """

    warehouse: WarehouseResource

    @staticmethod
    def _table(key: dg.AssetKey) -> str:
        return "__".join(key.path)

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame) -> None:
        if obj is None:
            return
        if not isinstance(obj, pl.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()} must return a polars DataFrame")
        partition = context.partition_key if context.has_asset_partitions else None
        path = self.warehouse.write(self._table(context.asset_key), obj, partition)
        context.add_output_metadata({"path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        table = self._table(context.asset_key)
        if not context.has_asset_partitions:
            return self.warehouse.read(table)
        wanted = context.asset_partition_keys
        stored = set(self.warehouse.partitions(table))
        if len(wanted) == 1:
            return self.warehouse.read(table, wanted)
        present = [p for p in wanted if p in stored]
        if not present:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has no materialized partitions yet"
            )
        return self.warehouse.read(table, present)
