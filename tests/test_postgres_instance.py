"""The compose deployment's Dagster instance (deploy/dagster/dagster.yaml) on a real PostgreSQL.

The yaml is used unchanged: the Docker run launcher only talks to Docker when it launches a run,
and these tests launch none (assets are materialized in-process), so no Docker is needed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
import yaml
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_docker import DockerRunLauncher
from dagster_postgres import (
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)
from dagster_postgres.utils import DagsterPostgresException

from mlops_assets.ingest.assets import reference_assets
from tests.pg import (
    COMPOSE_INSTANCE_YAML,
    PROJECT_ROOT,
    PgServer,
    compose_dagster_home,
    compose_instance_env,
    postgres_server,
    throwaway_database,
)

pytestmark = pytest.mark.postgres

RAW_AIRLINES = next(a for a in reference_assets if a.key == dg.AssetKey("raw_airlines"))


@pytest.fixture
def server() -> PgServer:
    return postgres_server()


@pytest.fixture
def database(server: PgServer) -> Iterator[str]:
    with throwaway_database(server) as name:
        yield name


@pytest.fixture
def pg_home(
    tmp_path: Path, server: PgServer, database: str, monkeypatch: pytest.MonkeyPatch
) -> Path:
    for name, value in compose_instance_env(server, database, tmp_path / "storage").items():
        monkeypatch.setenv(name, value)
    return compose_dagster_home(tmp_path / "dagster_home")


def _rows(server: PgServer, database: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(server.conninfo(database)) as conn:
        return conn.execute(sql, args).fetchall()


def test_yaml_takes_every_connection_setting_from_the_environment() -> None:
    config = yaml.safe_load(COMPOSE_INSTANCE_YAML.read_text())
    db = config["storage"]["postgres"]["postgres_db"]
    assert db.pop("scheme") == "postgresql+psycopg2"
    assert db == {
        key: {"env": f"DAGSTER_PG_{var}"}
        for key, var in [
            ("hostname", "HOST"),
            ("port", "PORT"),
            ("username", "USER"),
            ("password", "PASSWORD"),
            ("db_name", "DB"),
        ]
    }
    assert config["telemetry"] == {"enabled": False}
    # Every variable a run container needs is forwarded to it.
    forwarded = set(config["run_launcher"]["config"]["env_vars"])
    assert {f"DAGSTER_PG_{v}" for v in ("HOST", "PORT", "USER", "PASSWORD", "DB")} <= forwarded
    assert {"DAGSTER_HOME", "MLOPS_HOME", "RAY_ADDRESS"} <= forwarded


def test_compose_instance_runs_like_the_local_one() -> None:
    """Queueing, monitoring and retries are the same as ``mlops up``'s dagster.yaml."""
    local = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    compose = yaml.safe_load(COMPOSE_INSTANCE_YAML.read_text())
    for section in ("run_coordinator", "run_monitoring", "run_retries", "telemetry"):
        assert compose.get(section) == local.get(section), section


def test_instance_from_the_compose_yaml_uses_postgres(pg_home: Path) -> None:
    with dg.DagsterInstance.from_config(str(pg_home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert isinstance(instance.run_launcher, DockerRunLauncher)
        # Runs join the Ray head's network namespace (compose.yaml names that container).
        assert instance.run_launcher.container_kwargs["network_mode"] == (
            "container:mlops-ray-head"
        )
        assert instance.run_monitoring_enabled
        assert not instance.telemetry_enabled


def test_materialization_is_stored_in_postgres(
    pg_home: Path,
    server: PgServer,
    database: str,
    resources: dict[str, Any],
) -> None:
    with dg.DagsterInstance.from_config(str(pg_home)) as instance:
        result = dg.materialize([RAW_AIRLINES], instance=instance, resources=resources)
        assert result.success
        run_id = result.run_id

    # In the database itself: the run, finished, and its materialization event.
    assert _rows(server, database, "SELECT status FROM runs WHERE run_id = %s", run_id) == [
        ("SUCCESS",)
    ]
    events = _rows(
        server,
        database,
        "SELECT asset_key FROM event_logs WHERE run_id = %s "
        "AND dagster_event_type = 'ASSET_MATERIALIZATION'",
        run_id,
    )
    assert events == [('["raw_airlines"]',)]

    # A second instance (another process would do the same) reads it back from PostgreSQL.
    with dg.DagsterInstance.from_config(str(pg_home)) as reader:
        run = reader.get_run_by_id(run_id)
        assert run is not None
        assert run.status == dg.DagsterRunStatus.SUCCESS
        event = reader.get_latest_materialization_event(dg.AssetKey("raw_airlines"))
        assert event is not None
        assert event.run_id == run_id
        materialization = event.asset_materialization
        assert materialization is not None
        assert materialization.metadata["rows"].value == 16
    # Nothing went to a SQLite file beside the yaml.
    assert not list(pg_home.rglob("*.db"))


def test_missing_connection_setting_is_refused(
    pg_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_PG_HOST")
    with pytest.raises(dg.DagsterInvalidConfigError, match="DAGSTER_PG_HOST"):
        dg.DagsterInstance.from_config(str(pg_home))


def test_wrong_password_is_refused(
    pg_home: Path, server: PgServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not server.password:
        # The CI server trusts local connections: no password can be wrong there; use a user
        # that does not exist instead, which the server refuses the same way.
        monkeypatch.setenv("DAGSTER_PG_USER", "no_such_user")
    else:
        monkeypatch.setenv("DAGSTER_PG_PASSWORD", server.password + "-wrong")
    with (
        pytest.raises(DagsterPostgresException, match="too many retries") as refused,
        dg.DagsterInstance.from_config(str(pg_home)) as instance,
    ):
        instance.get_runs(limit=1)
    # The server's own reason is kept as the cause.
    assert re.search(
        'role "no_such_user" does not exist|password authentication failed',
        str(refused.value.__cause__),
    )
