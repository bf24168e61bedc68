"""Prometheus and Grafana of the compose deployment against what the code really exports.

Every metric a dashboard query names must be in a real scrape: the serving app's ``/metrics``
after real predictions of a real model, and the monitor exporter's after a real drift
measurement. Prometheus' own ``promtool`` checks the scrape config, the exposition and the
syntax of every dashboard query.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mlops_assets.definitions import defs
from mlops_assets.features.transform import BOOKING_COLUMNS, LABEL, build_features
from mlops_assets.monitor.exporter import MonitorCollector, build_registry
from mlops_assets.serve.app import build_app
from mlops_assets.serve.predictor import Predictor
from mlops_assets.serve.ray_runtime import free_port
from tests.realdata import valid_table
from tests.test_monitor import _champion_on_january

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
PROMQL_FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile",
    "by", "without", "on", "ignoring", "and", "or", "unless", "bool", "offset",
}  # fmt: skip
# Grafana's interval variables, as Prometheus would see them after substitution.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but promtool is not installed (.ci/run installs Debian's prometheus)")
    pytest.skip("promtool is not installed (apt-get install prometheus)")


def _dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))]


def _exprs() -> list[str]:
    return [t["expr"] for d in _dashboards() for p in d["panels"] for t in p["targets"]]


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside braces or by/without lists) or numbers."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r'"[^"]*"', "", expr)
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_FUNCTIONS and not re.fullmatch(r"\d+\w*", n)}


def _sample_names(exposition: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(exposition) for s in family.samples}


@pytest.fixture
def drift_instance(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> tuple[dg.DagsterInstance, dict[str, Any], str]:
    """A January champion and a real drift measurement of July against it."""
    version = _champion_on_january(resources)
    # A slice of July is enough to see the seasons' weather drift, and keeps Evidently quick.
    flights = valid_table("flights", 7).head(4000)
    july = build_features(flights, valid_table("weather"), valid_table("planes"))
    resources["warehouse"].write(
        "flight_features", july.filter(pl.col(LABEL).is_not_null()), "2013-07"
    )
    result = dg.materialize(
        list(defs.assets), selection=["flight_drift"], partition_key="2013-07",
        resources=resources, instance=instance,
    )  # fmt: skip
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    return instance, metadata, version


def _serving_scrape(resources: dict[str, Any], version: str) -> str:
    """``/metrics`` of the real app after real predictions, a bad request and a wrong route."""
    predictor = Predictor.from_registry(
        resources["registry"], version,
        planes=resources["warehouse"].read("planes"),
        weather=resources["warehouse"].read("weather"),
    )  # fmt: skip
    records = valid_table("flights", 7).head(5).select(list(BOOKING_COLUMNS)).to_dicts()
    with TestClient(build_app(lambda: predictor)) as client:
        assert client.post("/predict", json={"flights": records}).status_code == 200
        assert client.post("/predict", json={"flights": records[:1]}).status_code == 200
        assert client.post("/predict", json={"flights": []}).status_code == 422
        assert client.get("/no-such-route").status_code == 404
        return client.get("/metrics").text


# -- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [_promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    model_port = compose["ray-head"]["ports"][0].split(":")[-1]
    assert targets["model"] == f"ray-head:{model_port}"
    exporter = compose["monitor-exporter"]["command"]
    assert targets["monitor"] == f"monitor-exporter:{exporter[exporter.index('--port') + 1]}"
    assert "--metrics-export-port=8080" in (DEPLOY / "ray" / "head.sh").read_text()
    assert targets["ray"] == "ray-head:8080"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules), and refuses a broken one."""
    promtool = _promtool()

    def check(exprs: list[str]) -> subprocess.CompletedProcess[str]:
        rules = [
            {"record": f"mlops:dashboard_query_{i}", "expr": _grafana_free(e)}
            for i, e in enumerate(exprs)
        ]
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        return subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )

    exprs = _exprs()
    good = check(exprs)
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in good.stdout
    bad = check(["sum by (le (rate(mlops_serve_requests_total[1m]))"])
    assert bad.returncode != 0


def _grafana_free(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


# -- Grafana --------------------------------------------------------------------------------------


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "mlops.yaml").read_text())[
        "providers"
    ]
    grafana = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    uids = {datasource["uid"]}
    for dashboard in _dashboards():
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["expr"].strip(), panel["title"]
                assert target["datasource"]["uid"] in uids, panel["title"]


def test_dashboard_has_the_panels_operators_need() -> None:
    (dashboard,) = _dashboards()
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    wanted = {
        "request rate": "mlops_serve_requests_total",
        "latency": "histogram_quantile(0.95, sum by (le) (rate(mlops_serve_request_latency",
        "errors": "mlops_serve_errors_total",
        "predictions per model version": "by (model_version) (rate(mlops_serve_predictions",
        "drift share": "mlops_monitor_drift_share",
        "served model version": "mlops_serve_model_loaded",
    }
    for what, needle in wanted.items():
        assert any(needle in e for e in exprs.values()), what


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(mlops_x_bucket{route="/p"}'
        "[$__rate_interval]))) / on (route) mlops_y"
    )
    assert _metric_names(expr) == {"mlops_x_bucket", "mlops_y"}


def test_every_dashboard_metric_is_exported(
    drift_instance: tuple[dg.DagsterInstance, dict[str, Any], str],
    resources: dict[str, Any],
    tmp_path: Path,
) -> None:
    instance, drift, version = drift_instance
    serving = _serving_scrape(resources, version)
    monitor = generate_latest(build_registry(instance)).decode()
    exported = _sample_names(serving) | _sample_names(monitor)
    referenced = set().union(*(_metric_names(e) for e in _exprs()))
    assert referenced, "the dashboard queries name metrics"
    missing = referenced - exported
    assert not missing, f"dashboard metrics nobody exports: {sorted(missing)}"

    # The values are the real ones: the served version and the measured drift.
    assert f'mlops_serve_model_loaded{{model_version="{version}"}} 1.0' in serving
    assert f'mlops_serve_predictions_total{{model_version="{version}"}} 6.0' in serving
    share = (
        'mlops_monitor_drift_share{asset="flight_drift",partition="2013-07",'
        'weighting="importance"} ' + repr(float(drift["weighted_drift_share"]))
    )
    assert share in monitor
    assert (
        f'mlops_monitor_drift_threshold{{asset="flight_drift"}} {drift["max_drift_share"]!r}'
        in monitor
    )
    assert "mlops_monitor_up 1.0" in monitor

    # Prometheus' linter accepts both expositions.
    for name, text in (("serving", serving), ("monitor", monitor)):
        lint = subprocess.run(
            [_promtool(), "check", "metrics"], input=text, capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        assert lint.returncode == 0, f"{name}: {lint.stdout}{lint.stderr}"

    # The compose service's own command, as a process on 127.0.0.1, serves the same numbers.
    text = _exporter_process_scrape(instance.root_directory)
    assert "mlops_monitor_up 1.0" in text
    assert f'partition="2013-07",weighting="plain"}} {float(drift["drift_share"])!r}' in text


def test_exporter_reports_down_when_the_instance_cannot_be_read(
    instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    collector = MonitorCollector(instance)
    up = next(m.samples for m in collector.collect() if m.name == "mlops_monitor_up")
    assert up[0].value == 1
    # Corrupt the event index: the scrape still answers, says down, and shows no stale shares.
    (index,) = Path(instance.root_directory).rglob("index.db")
    index.write_bytes(b"not a database" * 100)
    families = {m.name: m.samples for m in collector.collect()}
    assert families["mlops_monitor_up"][0].value == 0
    assert families["mlops_monitor_drift_share"] == []


def _exporter_process_scrape(dagster_home: str) -> str:
    """Run compose's monitor-exporter command here (127.0.0.1, a free port), scrape it once."""
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["monitor-exporter"]
    command = [str(part) for part in service["command"]]
    port = free_port()
    command[0] = sys.executable if command[0] == "python" else command[0]
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    env = {**os.environ, "DAGSTER_HOME": dagster_home}
    proc = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                output = proc.stdout.read().decode() if proc.stdout else ""
                pytest.fail(f"the exporter exited with {proc.returncode}: {output[-2000:]}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                time.sleep(0.5)
        pytest.fail("the exporter did not answer within 90 s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
