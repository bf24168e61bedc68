"""The ``mlops`` command line."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from resources.files import land_month, parse_month
from resources.settings import mlops_paths
from resources.storage import pid_alive

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


def _descendants(pids: set[int]) -> set[int]:
    """Every live descendant of ``pids`` (from /proc: code servers and run workers may start
    their own sessions, out of reach of a process-group signal)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found: set[int] = set()
    frontier = set(pids)
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _stop(procs: list[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """Stop exactly what we started: SIGTERM to our process groups and to every descendant
    (taken before and after), then SIGKILL to whatever is left past the timeout."""
    started = {p.pid for p in procs}
    family = _descendants(started)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    family |= _descendants(started | family)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    while family and time.monotonic() < deadline:
        family = {pid for pid in family if pid_alive(pid)}
        time.sleep(0.2)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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
    """Land the first six months (if needed), then run the Dagster webserver and daemon: the
    sensors ingest the months, train, gate and serve the first champion, and keep retraining
    as new months land. Stop with Ctrl-C or `mlops down`."""
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
    pid_file = _pid_file()
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        url = f"http://{host}:{port}"
        if _wait_http(f"{url}/server_info", 120, procs):
            _echo(f"Dagster UI: {url}  (DAGSTER_HOME={env['DAGSTER_HOME']})")
            _echo("Press Ctrl-C (or run `mlops down`) to stop.")
        progress = _Progress(_endpoint(None))
        try:
            while not stop_requested and all(p.poll() is None for p in procs):
                progress.poll()
                time.sleep(1.0)
        finally:
            progress.close()
    finally:
        _echo("stopping Dagster ...")
        _stop(procs)
        pid_file.unlink(missing_ok=True)
        # The serve stage starts a local Ray head on first deploy; it is ours to stop too.
        from mlops_assets.serve.ray_runtime import stop_local_ray

        if stopped := stop_local_ray(paths.home / "ray"):
            _echo(f"stopped the local Ray head ({len(stopped)} processes)")
    failed = [p.args[0] for p in procs if p.returncode not in (0, -signal.SIGTERM, None)]
    if failed and not stop_requested:
        _echo(f"error: {', '.join(map(str, failed))} exited unexpectedly")
        raise typer.Exit(code=1)


CURL_EXAMPLE = """curl -s {endpoint}/predict -H 'content-type: application/json' -d '{{"flights": [
  {{"year": 2013, "month": 7, "day": 14, "sched_dep_time": 1730, "sched_arr_time": 2015,
   "carrier": "UA", "flight": 1545, "tailnum": "N14228", "origin": "EWR", "dest": "IAH",
   "distance": 1400}}]}}'"""


class _Progress:
    """Prints what the loop does while `mlops up` runs: run starts and ends, each month's retrain
    decision, the served model."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.seen: dict[str, str] = {}
        self.decided = 0
        self.served: str | None = None
        self.first = True
        self.last_poll = 0.0
        self.instance = None  # opened on first use, kept for the life of `up`

    def close(self) -> None:
        if self.instance is not None:
            self.instance.dispose()

    def poll(self) -> None:
        if time.monotonic() - self.last_poll < 2.0:
            return
        self.last_poll = time.monotonic()
        try:
            self._runs()
            self._decisions()
            self._model()
        except Exception as exc:  # progress output must never stop the services
            _echo(f"(progress unavailable: {type(exc).__name__}: {exc})")
        self.first = False

    def _runs(self) -> None:
        import dagster as dg

        if self.instance is None:
            self.instance = dg.DagsterInstance.get()
        for run in reversed(self.instance.get_runs(limit=30)):
            status = run.status.value
            if self.seen.get(run.run_id) == status:
                continue
            self.seen[run.run_id] = status
            if self.first or status not in ("STARTED", "SUCCESS", "FAILURE", "CANCELED"):
                continue
            partition = run.tags.get("dagster/partition")
            what = f"{run.job_name}" + (f" [{partition}]" if partition else "")
            _echo(f"run {what}: {status.lower()}  ({run.run_id[:8]})")

    def _decisions(self) -> None:
        from resources.registry import ModelRegistryResource

        entries = ModelRegistryResource(root=str(mlops_paths().registry)).decisions()
        new, self.decided = entries[self.decided :], len(entries)
        for entry in new if not self.first else []:
            if entry.get("action") not in ("retrain", "no_retrain", "gate"):
                continue
            if entry["action"] == "gate":
                verdict = "passed" if entry.get("passed") else "rejected"
                _echo(f"gate: {entry.get('version')} {verdict} ({entry['reason']})")
                continue
            what = "retrain held" if entry["action"] == "retrain" else "no retrain"
            if entry.get("retrain_in_run"):
                what = "retrain in this run"
            _echo(f"decision [{entry.get('month')}]: {what} ({entry['reason']})")

    def _model(self) -> None:
        import httpx

        try:
            version = httpx.get(f"{self.endpoint}/healthz", timeout=1).json().get("model_version")
        except (httpx.HTTPError, ValueError):
            return
        if version and version != self.served:
            self.served = version
            _echo(f"model {version} is serving at {self.endpoint} (docs: {self.endpoint}/docs)")
            fast = direct_endpoints(self.instance) if self.instance is not None else []
            if fast:
                _echo(f"fast path (direct ingress, same API): {', '.join(fast)}")
            _echo("try it:\n" + CURL_EXAMPLE.format(endpoint=self.endpoint))


def direct_endpoints(instance: Any) -> list[str]:
    """The replicas' own URLs from the newest ``served_model`` materialization (direct ingress;
    empty when it is off or nothing was served yet)."""
    import dagster as dg

    event = instance.get_latest_materialization_event(dg.AssetKey("served_model"))
    materialization = event.asset_materialization if event is not None else None
    entry = materialization.metadata.get("direct_endpoints") if materialization else None
    text = str(entry.value) if entry is not None else ""
    return [url.strip() for url in text.split(",") if url.strip().startswith("http")]


def _pid_file() -> Path:
    return mlops_paths().home / "run" / "up.pid"


@app.command()
def down(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for everything to stop.")] = 60,
) -> None:
    """Stop a running `mlops up` (Dagster webserver, daemon, and the local Ray head it owns)."""
    pid_file = _pid_file()
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError):
        _echo(f"nothing to stop: no `mlops up` is running for {mlops_paths().home}")
        raise typer.Exit(code=1) from None
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        _echo(f"nothing to stop: `mlops up` (pid {pid}) is gone; removed its stale pid file")
        raise typer.Exit(code=1) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            typer.echo(f"stopped `mlops up` (pid {pid})")
            return
        time.sleep(0.25)
    _echo(f"error: `mlops up` (pid {pid}) is still running after {timeout:.0f} s")
    raise typer.Exit(code=1)


ENDPOINT_HELP = "Serving endpoint (default http://127.0.0.1:$MLOPS_SERVE_PORT, port 8000)."


def _endpoint(url: str | None) -> str:
    return (url or f"http://127.0.0.1:{os.environ.get('MLOPS_SERVE_PORT') or 8000}").rstrip("/")


@app.command()
def status(
    url: Annotated[
        str | None, typer.Option(help="Serving endpoint (default 127.0.0.1:8000).")
    ] = None,
) -> None:
    """The champion and its lineage, the serving state, and the last drift and retrain decisions."""
    import httpx
    import polars as pl

    from resources.registry import ModelRegistryResource

    paths = mlops_paths()
    registry = ModelRegistryResource(root=str(paths.registry))
    aliases = registry.aliases()
    champion = aliases["champion"]
    if champion is None:
        typer.echo("champion: none yet (land months and let the loop train one: `mlops up`)")
    else:
        manifest = registry.manifest(champion)
        months = manifest.get("training", {}).get("months", {})
        metrics = manifest.get("metrics", {})
        typer.echo(f"champion: {champion} (previous: {aliases['previous_champion'] or 'none'})")
        typer.echo(f"  created {manifest.get('created_at')}, sha256 {manifest['sha256'][:16]}")
        for split in ("train", "valid", "test"):
            if months.get(split):
                typer.echo(f"  {split} months: {', '.join(months[split])}")
        refit_of = manifest.get("refit_of") or {}
        if refit_of:
            typer.echo(f"  the gated {refit_of['version']} refit on every landed month")
        if "valid_auc" in metrics:
            typer.echo(f"  validation AUC {metrics['valid_auc']:.4f}")
    endpoint = _endpoint(url)
    try:
        health = httpx.get(f"{endpoint}/healthz", timeout=5)
        served = health.json().get("model_version")
        state = "serving" if health.status_code == 200 else f"HTTP {health.status_code}"
        agrees = "" if served == champion else f"  (NOT the champion {champion})"
        typer.echo(f"serving: {endpoint} {state}, model {served}{agrees}")
    except (httpx.HTTPError, ValueError):
        typer.echo(f"serving: {endpoint} is not answering")
    drift_dir = paths.warehouse / "flight_drift"
    if drift_dir.exists() and any(drift_dir.glob("*.parquet")):
        drift = pl.read_parquet(sorted(drift_dir.glob("*.parquet")))
        measured = drift.filter(pl.col("status") == "measured")
        by_month = (
            measured.group_by("month", "champion_version")
            .agg(
                (pl.col("importance").filter(pl.col("drifted")).sum()
                 / pl.col("importance").sum()).alias("weighted_share"),
                pl.col("column").filter(pl.col("drifted")).sort().str.join(", ").alias("drifted"),
            )
            .sort("month")
            .tail(3)
        )  # fmt: skip
        typer.echo("last drift (importance-weighted drifted share, vs the champion then):")
        for row in by_month.iter_rows(named=True):
            drifted = row["drifted"] or "nothing drifted"
            typer.echo(f"  {row['month']} vs {row['champion_version']}: "
                       f"{row['weighted_share']:.3f} ({drifted})")  # fmt: skip
    decisions = registry.decisions()[-5:]
    if decisions:
        typer.echo("last decisions:")
        for d in decisions:
            typer.echo(f"  {d['at']} {d['action']} {d.get('version') or ''}: {d['reason']}")


def _read_records(source: str) -> list[dict[str, object]]:
    import json

    import polars as pl

    text = sys.stdin.read() if source == "-" else Path(source).read_text()
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        data = json.loads(text)
        records = data["flights"] if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise ValueError('JSON input must be a list of records or {"flights": [...]}')
        return records
    return pl.read_csv(io.StringIO(text), infer_schema_length=10_000).to_dicts()


@app.command()
def predict(
    source: Annotated[str, typer.Argument(help="JSON or CSV file of flights, or - for stdin.")],
    url: Annotated[
        str | None, typer.Option(help="Serving endpoint (default 127.0.0.1:8000).")
    ] = None,
) -> None:
    """Send flights (JSON list, {"flights": [...]}, or CSV) to the endpoint; print a table."""
    import httpx

    try:
        records = _read_records(source)
    except (OSError, ValueError, KeyError) as exc:
        _echo(f"error: cannot read {source}: {exc}")
        raise typer.Exit(code=2) from exc
    endpoint = _endpoint(url)
    token = os.environ.get("MLOPS_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{endpoint}/predict", json={"flights": records}, headers=headers,
                              timeout=30)  # fmt: skip
    except httpx.HTTPError as exc:
        _echo(f"error: the endpoint {endpoint} is not answering ({type(exc).__name__}); "
              "is `mlops up` running and the model served?")  # fmt: skip
        raise typer.Exit(code=1) from exc
    if response.status_code != 200:
        _echo(f"error: HTTP {response.status_code}: {response.text[:2000]}")
        raise typer.Exit(code=1)
    body = response.json()
    typer.echo(f"model {body['model_version']}")
    typer.echo(
        "| # | carrier | flight | origin | dest | date | dep | delay_probability | delayed |"
    )
    typer.echo("|---|---|---|---|---|---|---|---|---|")
    for i, (record, answer) in enumerate(zip(records, body["predictions"], strict=True)):
        date = f"{record.get('year')}-{record.get('month'):02d}-{record.get('day'):02d}"
        typer.echo(
            f"| {i} | {record.get('carrier')} | {record.get('flight')} | {record.get('origin')} "
            f"| {record.get('dest')} | {date} | {record.get('sched_dep_time')} "
            f"| {answer['delay_probability']:.4f} | {answer['delayed']} |"
        )


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


@app.command()
def graph() -> None:
    """Print the asset graph as a Mermaid flowchart (the README's picture)."""
    from mlops_assets.definitions import defs
    from mlops_assets.lineage import mermaid

    typer.echo(mermaid(defs), nl=False)


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
