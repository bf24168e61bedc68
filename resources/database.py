"""The database source: planes, airports and airlines read with SQL through SQLAlchemy.

The embedded default is a SQLite file seeded from the package on first use; any SQLAlchemy URL
(``postgresql+psycopg://user@host/db``) points the same queries at another database.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
import sqlalchemy as sa

from resources.extract import Extract, SourceError, frame_checksum
from resources.package_data import REFERENCE_TABLES, read_package_table
from resources.storage import atomic_path

_SQL_TYPES: dict[type[pl.DataType], type[sa.types.TypeEngine]] = {
    pl.Int64: sa.BigInteger,
    pl.Float64: sa.Float,
    pl.String: sa.Text,
}


def seed_reference_tables(engine: sa.Engine, *, replace: bool = False) -> None:
    """Create and fill planes, airports and airlines from the package's files."""
    metadata = sa.MetaData()
    frames = {name: read_package_table(name) for name in REFERENCE_TABLES}
    tables = {
        name: sa.Table(
            name,
            metadata,
            *(sa.Column(col, _SQL_TYPES[type(dtype)]()) for col, dtype in frame.schema.items()),
        )
        for name, frame in frames.items()
    }
    with engine.begin() as conn:
        if replace:
            metadata.drop_all(conn)
        metadata.create_all(conn)
        for name, frame in frames.items():
            conn.execute(tables[name].insert(), frame.to_dicts())


def ensure_seeded_sqlite(path: Path) -> Path:
    """Seed the embedded SQLite database once; concurrent first uses never see half a file."""
    if path.exists():
        return path
    with atomic_path(path) as tmp:
        tmp.unlink()
        engine = sa.create_engine(f"sqlite:///{tmp}")
        try:
            seed_reference_tables(engine)
        finally:
            engine.dispose()
    return path


class ReferenceDatabaseResource(dg.ConfigurableResource):
    """Reference tables in a SQL database. ``url`` empty means the embedded SQLite file."""

    url: str = ""
    sqlite_path: str = ".mlops/sources/reference.sqlite"

    def _engine(self) -> sa.Engine:
        if self.url:
            return sa.create_engine(self.url)
        return sa.create_engine(f"sqlite:///{ensure_seeded_sqlite(Path(self.sqlite_path))}")

    @property
    def display_url(self) -> str:
        if not self.url:
            return f"sqlite:///{self.sqlite_path}"
        return sa.make_url(self.url).render_as_string(hide_password=True)

    def read_table(self, table: str) -> Extract:
        if table not in REFERENCE_TABLES:
            raise SourceError(f"unknown reference table {table!r}; known: {REFERENCE_TABLES}")
        query = f"SELECT * FROM {table}"
        engine = self._engine()
        try:
            with engine.connect() as conn:
                result = conn.execute(sa.text(query))
                columns = list(result.keys())
                frame = pl.DataFrame(
                    result.fetchall(), schema=columns, orient="row", infer_schema_length=None
                )
        except sa.exc.SQLAlchemyError as exc:
            raise SourceError(f"{self.display_url}: {query!r} failed: {exc}") from exc
        except (pl.exceptions.PolarsError, TypeError, OverflowError) as exc:
            # SQLite keeps any type in any column: e.g. a BLOB among integers has no common type.
            raise SourceError(
                f"{self.display_url}: {query!r} returned values of incompatible types: {exc}"
            ) from exc
        finally:
            engine.dispose()
        if frame.is_empty():
            raise SourceError(f"{self.display_url}: {query!r} returned no rows")
        return Extract(
            frame=frame,
            source=f"{self.display_url} :: {query}",
            checksum=frame_checksum(frame),
        )
