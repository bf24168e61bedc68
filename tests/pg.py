"""The real PostgreSQL server of the tests (MLOPS_TEST_POSTGRES_URL), and a throwaway database.

``.ci/run`` starts the server (``.ci/postgres.sh``) and exports the URL. Without it the tests
that need it skip locally, and fail in CI (``CI=true``): a missing server there is a broken CI,
not a reason to skip.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

PROJECT_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_INSTANCE_YAML = PROJECT_ROOT / "deploy" / "dagster" / "dagster.yaml"


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str
    database: str

    def conninfo(self, database: str | None = None) -> str:
        return psycopg.conninfo.make_conninfo(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or None,
            dbname=database or self.database,
        )


def postgres_server() -> PgServer:
    """The server from MLOPS_TEST_POSTGRES_URL; skip (locally) or fail (CI) without it."""
    raw = os.environ.get("MLOPS_TEST_POSTGRES_URL")
    if not raw:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but MLOPS_TEST_POSTGRES_URL is not set (.ci/postgres.sh)")
        pytest.skip("MLOPS_TEST_POSTGRES_URL is not set (source .ci/postgres.sh; start_postgres)")
    url = make_url(raw)
    return PgServer(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        user=url.username or "postgres",
        password=url.password or "",
        database=url.database or "postgres",
    )


@contextmanager
def throwaway_database(server: PgServer) -> Iterator[str]:
    """A new, empty database on the server, dropped afterwards (with its open connections)."""
    name = f"dagster_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def compose_instance_env(server: PgServer, database: str, storage_dir: Path) -> dict[str, str]:
    """What compose.yaml gives the Dagster services, pointed at the test server."""
    return {
        "DAGSTER_PG_HOST": server.host,
        "DAGSTER_PG_PORT": str(server.port),
        "DAGSTER_PG_USER": server.user,
        "DAGSTER_PG_PASSWORD": server.password,
        "DAGSTER_PG_DB": database,
        "DAGSTER_STORAGE_DIR": str(storage_dir),
    }


def compose_dagster_home(folder: Path) -> Path:
    """A DAGSTER_HOME holding the compose deployment's dagster.yaml, unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(COMPOSE_INSTANCE_YAML, folder / "dagster.yaml")
    return folder
