"""The `mlops` entry point, run as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import polars as pl
import psutil

from mlops_assets.serve.ray_runtime import free_port
from resources.package_data import read_package_table

MLOPS = str(Path(sys.executable).parent / "mlops")


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLOPS_HOME": str(home)}
    return subprocess.run([MLOPS, *args], env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    result = run("--help", home=tmp_path)
    assert result.returncode == 0
    assert "land" in result.stdout and "up" in result.stdout


def test_land_copies_exactly_one_month_of_real_flights(tmp_path: Path) -> None:
    result = run("land", "2013-03", home=tmp_path)
    assert result.returncode == 0, result.stderr
    landed = tmp_path / "landing" / "flights_2013-03.csv"
    frame = pl.read_csv(landed, infer_schema_length=10_000, null_values=["NA"])
    expected = read_package_table("flights").filter(pl.col("month") == 3)
    assert frame.height == expected.height > 25_000
    assert frame.columns == expected.columns
    assert frame.get_column("month").unique().to_list() == [3]


def test_land_refuses_a_month_twice_and_bad_months(tmp_path: Path) -> None:
    assert run("land", "2013-04", home=tmp_path).returncode == 0
    again = run("land", "2013-04", home=tmp_path)
    assert again.returncode == 2
    assert "already landed" in again.stderr
    for bad, message in [("2013-13", "YYYY-MM"), ("march", "YYYY-MM"), ("2014-01", "no flights")]:
        result = run("land", bad, home=tmp_path)
        assert result.returncode == 2, bad
        assert message in result.stderr, (bad, result.stderr)
    assert sorted(p.name for p in (tmp_path / "landing").iterdir()) == ["flights_2013-04.csv"]


def _children(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def test_up_serves_the_ui_on_loopback_and_down_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MLOPS_HOME": str(tmp_path / "m")}
    env.pop("DAGSTER_HOME", None)
    proc = subprocess.Popen([MLOPS, "up", "--port", str(port)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    lines: list[str] = []  # drained all along: the services write their logs to this pipe too
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)  # fmt: skip
    reader.start()
    try:
        deadline = time.monotonic() + 180
        body = b""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info") as r:
                    body = r.read()
                    break
            except OSError:
                time.sleep(1)
        assert b"dagster_webserver_version" in body
        children = _children(proc.pid)
        assert len(children) >= 2  # webserver and daemon (and their code servers)
        listening = {
            c.laddr.ip for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }  # fmt: skip
        assert listening == {"127.0.0.1"}
        landed = sorted(p.name for p in (tmp_path / "m" / "landing").iterdir())
        assert landed == [f"flights_2013-0{m}.csv" for m in range(1, 7)]
        assert (tmp_path / "m" / "dagster" / "dagster.yaml").exists()
        assert (tmp_path / "m" / "run" / "up.pid").read_text().strip() == str(proc.pid)
        # The sensors are on: landed months turn into ingest runs, and up reports them.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(
            line.startswith("run ingest_month [2013-0") and ": success" in line for line in lines
        ):
            time.sleep(1)
        assert any(line.startswith("run ingest_month [2013-0") and ": success" in line
                   for line in lines), "".join(lines[-50:])  # fmt: skip
        # ... and each month's retrain decision: the six runs take turns, so a month decided
        # while the next one is queued holds its retrain for it.
        while time.monotonic() < deadline and not any(
            line.startswith("decision [2013-0") for line in lines
        ):
            time.sleep(1)
        held = [line for line in lines if line.startswith("decision [2013-0")]
        assert held and "retrain held" in held[0] and "is queued" in held[0], held
    finally:
        stopped = run("down", home=tmp_path / "m")
        if stopped.returncode != 0:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped `mlops up` (pid {proc.pid})" in stopped.stdout
    assert not (tmp_path / "m" / "run" / "up.pid").exists()
    time.sleep(1)
    assert not [pid for pid in children if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # fmt: skip


def test_down_without_up_says_so(tmp_path: Path) -> None:
    result = run("down", home=tmp_path)
    assert result.returncode == 1
    assert "nothing to stop: no `mlops up` is running" in result.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "up.pid").write_text("999999999\n")  # no such process
    result = run("down", home=tmp_path)
    assert result.returncode == 1 and "is gone; removed its stale pid file" in result.stderr
    assert not (tmp_path / "run" / "up.pid").exists()


def test_status_shows_the_champion_serving_state_drift_and_decisions(tmp_path: Path) -> None:
    from resources.registry import ModelRegistryResource

    closed = free_port()
    empty = run("status", "--url", f"http://127.0.0.1:{closed}", home=tmp_path)
    assert empty.returncode == 0
    assert "champion: none yet" in empty.stdout
    assert f"http://127.0.0.1:{closed} is not answering" in empty.stdout

    registry = ModelRegistryResource(root=str(tmp_path / "registry"))
    manifest = registry.register(
        "tree\n", "{}", {"metrics": {"valid_auc": 0.7312},
                          "training": {"months": {"train": ["2013-01", "2013-02"],
                                                  "valid": ["2013-03"]}}},
    )  # fmt: skip
    registry.promote(manifest["version"], "promote: first model")
    registry.record_decision("retrain", manifest["version"], "retrain for 2013-04: AUC drop +0.05")
    drift = pl.DataFrame({
        "column": ["temp", "carrier", "distance"], "status": ["measured"] * 3,
        "drifted": [True, False, True], "importance": [0.6, 0.3, 0.1],
        "month": ["2013-04"] * 3, "champion_version": [manifest["version"]] * 3,
    })  # fmt: skip
    (tmp_path / "warehouse" / "flight_drift").mkdir(parents=True)
    drift.write_parquet(tmp_path / "warehouse" / "flight_drift" / "2013-04.parquet")
    result = run("status", "--url", f"http://127.0.0.1:{closed}", home=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"champion: {manifest['version']} (previous: none)" in out
    assert "train months: 2013-01, 2013-02" in out and "validation AUC 0.7312" in out
    assert f"2013-04 vs {manifest['version']}: 0.700 (distance, temp)" in out
    assert "retrain for 2013-04: AUC drop +0.05" in out
    assert "refit on every landed month" not in out

    refit = registry.register(
        "tree\n", "{}", {"metrics": {"valid_auc": 0.7312}, "refit_of": {"version": "m0001"},
                          "training": {"months": {"train": ["2013-01", "2013-02", "2013-03",
                                                            "2013-04"], "valid": []}}},
    )  # fmt: skip
    registry.promote(refit["version"], "promote: its refit")
    out = run("status", "--url", f"http://127.0.0.1:{closed}", home=tmp_path).stdout
    assert f"champion: {refit['version']} (previous: m0001)" in out
    assert "the gated m0001 refit on every landed month" in out


def test_direct_endpoints_come_from_the_newest_served_model_materialization() -> None:
    """What `mlops up` prints as the fast path: the replica URLs the deploy recorded, if any."""
    import dagster as dg

    from mlops_assets.cli import direct_endpoints

    with dg.DagsterInstance.ephemeral() as instance:
        assert direct_endpoints(instance) == []

        def served(text: str) -> None:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    "served_model", metadata={"direct_endpoints": dg.MetadataValue.text(text)}
                )
            )

        served("none (direct ingress off)")
        assert direct_endpoints(instance) == []
        served("http://127.0.0.1:30001, http://127.0.0.1:30002")
        assert direct_endpoints(instance) == ["http://127.0.0.1:30001", "http://127.0.0.1:30002"]
        served("none (direct ingress off)")
        assert direct_endpoints(instance) == []
