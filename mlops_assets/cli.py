"""The ``mlops`` command line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated

import typer

from resources.files import land_month, parse_month
from resources.settings import mlops_paths

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO_MONTHS = [f"2013-{m:02d}" for m in range(1, 7)]

app = typer.Typer(
    help="mlops-assets: a Dagster asset graph from raw flights data to a live model.",
    no_args_is_help=True,
    add_completion=False,
)


def _echo(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def land(
    months: Annotated[list[str], typer.Argument(help="Month(s) to land, YYYY-MM (2013-01..12).")],
    force: Annotated[bool, typer.Option(help="Replace a month that has already landed.")] = False,
) -> None:
    """Copy month(s) of flights from the package into the landing directory, as new data."""
    landing = mlops_paths().landing
    for month in months:
        try:
            parse_month(month)
            path = land_month(month, landing, overwrite=force)
        except (ValueError, FileExistsError) as exc:
            _echo(f"error: {exc}")
            raise typer.Exit(code=2) from exc
        typer.echo(f"landed {month}: {path}")


def _dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or mlops_paths().home / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    return home


def _wait_http(url: str, timeout: float, procs: list[subprocess.Popen[bytes]]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """Stop exactly the process groups we started: SIGTERM, then SIGKILL past the timeout."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


REFERENCE_ASSETS = ["raw_planes", "planes", "raw_airports", "airports", "raw_airlines", "airlines"]


def _materialize_reference_tables(dagster_home: str) -> None:
    """The unpartitioned reference tables every month's features join; once, before the daemon
    starts turning landed months into runs (``landing_sensor``)."""
    import dagster as dg

    from mlops_assets.definitions import defs

    os.environ["DAGSTER_HOME"] = dagster_home
    warehouse = defs.resources["warehouse"]
    if all(warehouse.partitions(t) for t in ("planes", "airports", "airlines")):
        return
    _echo("materializing the reference tables (planes, airports, airlines) ...")
    with dg.DagsterInstance.get() as instance:
        result = dg.materialize(
            list(defs.assets), selection=REFERENCE_ASSETS, instance=instance,
            resources=dict(defs.resources), raise_on_error=False,
        )  # fmt: skip
    if not result.success:
        _echo("error: the reference tables failed to materialize; see the Dagster UI")
        raise typer.Exit(code=1)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Dagster UI port.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """Land the first six months (if needed) and run the Dagster webserver and daemon."""
    paths = mlops_paths()
    for month in DEMO_MONTHS:
        if not (paths.landing / f"flights_{month}.csv").exists():
            land_month(month, paths.landing)
            _echo(f"landed {month}")
    env = {**os.environ, "DAGSTER_HOME": str(_dagster_home()), "MLOPS_HOME": str(paths.home)}
    _materialize_reference_tables(env["DAGSTER_HOME"])
    bin_dir = Path(sys.executable).parent
    workspace = str(PROJECT_ROOT / "workspace.yaml")
    commands = [
        [str(bin_dir / "dagster-webserver"), "-h", host, "-p", str(port), "-w", workspace],
        [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
    ]
    # Own process groups with default signal handling, so stopping them is exact.
    procs = [
        subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, start_new_session=True) for cmd in commands
    ]
    stop_requested = False

    def _request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    try:
        url = f"http://{host}:{port}"
        if _wait_http(f"{url}/server_info", 120, procs):
            _echo(f"Dagster UI: {url}  (DAGSTER_HOME={env['DAGSTER_HOME']})")
            _echo("Press Ctrl-C to stop.")
        while not stop_requested and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        _echo("stopping Dagster ...")
        _stop(procs)
        # The serve stage starts a local Ray head on first deploy; it is ours to stop too.
        from mlops_assets.serve.ray_runtime import stop_local_ray

        if stopped := stop_local_ray(paths.home / "ray"):
            _echo(f"stopped the local Ray head ({len(stopped)} processes)")
    failed = [p.args[0] for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    if failed and not stop_requested:
        _echo(f"error: {', '.join(map(str, failed))} exited unexpectedly")
        raise typer.Exit(code=1)


@app.command()
def rollback() -> None:
    """Move the champion back to the previous champion (runs the rollback job in Dagster)."""
    import dagster as dg

    from mlops_assets.definitions import defs

    os.environ.setdefault("DAGSTER_HOME", str(_dagster_home()))
    registry = defs.resources["registry"]
    before = registry.aliases()
    if before["previous_champion"] is None:
        _echo("error: nothing to roll back to: there is no previous champion")
        raise typer.Exit(code=2)
    with dg.DagsterInstance.get() as instance:
        result = defs.get_job_def("rollback_job").execute_in_process(
            instance=instance, raise_on_error=False
        )
    if not result.success:
        failure = result.get_step_failure_events()[0].event_specific_data.error
        _echo(f"error: rollback failed: {failure.message}")
        raise typer.Exit(code=1)
    typer.echo(f"champion is now {registry.champion()} (was {before['champion']})")


@app.command("weather-api")
def weather_api(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8001,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
) -> None:
    """Serve the package's hourly weather as the paginated JSON API the weather source reads.

    Point the pipeline at it with MLOPS_WEATHER_API_URL=http://HOST:PORT; a bearer token is
    required when MLOPS_WEATHER_API_TOKEN is set.
    """
    from resources.weather_api_server import WeatherApiServer

    server = WeatherApiServer((host, port), token=os.environ.get("MLOPS_WEATHER_API_TOKEN", ""))
    _echo(f"weather API on http://{host}:{server.server_address[1]}/weather?month=2013-01")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    app()
