"""The container deployment: Dockerfile, compose.yaml and deploy/, linted and run for real.

No Docker engine here: the Dockerfile is linted with hadolint, compose.yaml validated against
the compose-spec schema (check-jsonschema's vendored copy), and the Dagster services' entry
commands, read from compose.yaml, are run as plain processes on 127.0.0.1 against the real test
PostgreSQL, with only addresses and the /app prefix translated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mlops_assets.serve.ray_runtime import free_port
from resources.settings import Paths
from tests.pg import (
    COMPOSE_INSTANCE_YAML,
    compose_dagster_home,
    compose_instance_env,
    postgres_server,
    throwaway_database,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "compose.yaml"
IMAGE_ROOT = "/app"
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET", re.IGNORECASE)


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _service(name: str) -> dict[str, Any]:
    return _compose()["services"][name]


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# -- static: lint and structure -------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    result = _run([str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install x\nCMD python app.py\n")
    result = _run([str(BIN / "hadolint"), "--no-color", str(bad)])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3025"):
        assert rule in result.stdout


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert re.search(r"^USER 10001", final_stage, re.M)
    assert "HEALTHCHECK" in final_stage
    assert len(re.findall(r"^FROM ", text, re.M)) == 2  # build + runtime stages
    # The dependency layer is built from the lock files alone, before the sources are copied.
    assert text.index("--no-install-project") < text.index("COPY . .")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".mlops", ".git", ".env"} <= set(ignored)


@pytest.mark.parametrize(
    ("shell", "script"), [("sh", "deploy/ray/head.sh"), ("bash", ".ci/promtool.sh")]
)
def test_shell_scripts_parse(shell: str, script: str) -> None:
    result = _run([shell, "-n", str(ROOT / script)])
    assert result.returncode == 0, result.stderr


def test_compose_matches_the_compose_spec() -> None:
    result = _run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_check_rejects_a_wrong_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  web:\n    image: x\n    ports: {a: 1}\n    restart: 3\n")
    result = _run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad)]
    )
    assert result.returncode == 1
    assert "services.web" in result.stdout


def test_compose_services_ports_and_secrets() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "dagster-code",
        "dagster-webserver",
        "dagster-daemon",
        "ray-head",
        "monitor-exporter",
        "prometheus",
        "grafana",
    }
    published = [port for svc in services.values() for port in svc.get("ports", [])]
    assert published, "the UI, the model and the dashboards are published"
    assert all(str(p).startswith("127.0.0.1:") for p in published), published
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_KEY.search(key):
                # A secret is only ever a reference to the environment (.env), with no default.
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*|:-)?\}", str(value)), (name, key)


def test_compose_and_the_instance_yaml_agree() -> None:
    """Run containers get the network, volumes and variables the services have."""
    compose = _compose()
    launcher = yaml.safe_load(COMPOSE_INSTANCE_YAML.read_text())["run_launcher"]["config"]
    ray_head = compose["services"]["ray-head"]
    # Runs share the Ray head's network namespace: the served_model step reaches Serve on
    # 127.0.0.1 there, and the other services by name (the head is on the compose network).
    assert launcher["container_kwargs"]["network_mode"] == f"container:{ray_head['container_name']}"
    assert "network" not in launcher
    assert ray_head["networks"] == ["mlops"]
    named = {v["name"]: k for k, v in compose["volumes"].items() if v and "name" in v}
    daemon = compose["services"]["dagster-daemon"]
    for mount in launcher["container_kwargs"]["volumes"]:
        volume, path = mount.split(":")
        assert f"{named[volume]}:{path}" in daemon["volumes"]
    assert set(launcher["env_vars"]) <= set(daemon["environment"])
    # The code server names the image runs are launched in.
    assert "DAGSTER_CURRENT_IMAGE" in compose["services"]["dagster-code"]["environment"]
    # Every path a service command names is in the repository.
    for svc in compose["services"].values():
        for arg in _command(svc):
            if arg.startswith(f"{IMAGE_ROOT}/"):
                assert (ROOT / arg.removeprefix(f"{IMAGE_ROOT}/")).is_file(), arg


def test_serve_config_of_the_ray_head_is_valid() -> None:
    """deploy/ray/serve.yaml: Ray's own schema, the app's config model, the asset's paths."""
    from ray.serve.schema import ServeDeploySchema

    from mlops_assets.serve.deployment import ServeConfig, build_serve_app

    raw = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_serve_app
    config = ServeConfig.model_validate(app.args)
    home = Paths(home=Path(_service("ray-head")["environment"]["MLOPS_HOME"]))
    assert config.registry_root == str(home.registry)
    assert config.warehouse_root == str(home.warehouse)
    assert config.prediction_log_dir == str(home.prediction_log)
    assert config.state_dir == str(home.home / "ray" / "serve")
    assert config.http_port == int(_service("ray-head")["ports"][0].split(":")[-1])
    # The proxy listens on every interface of the container; the published port is loopback.
    assert schema.http_options.host == "0.0.0.0"
    assert schema.http_options.port == config.http_port


def test_serve_config_matches_what_the_served_model_asset_deploys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Same fingerprint: after a head restart, the asset's next deploy is an in-place swap."""
    from mlops_assets.serve.assets import serve_config
    from mlops_assets.serve.deployment import ServeConfig
    from resources import default_resources

    environment = _service("ray-head")["environment"]
    monkeypatch.setenv("MLOPS_HOME", environment["MLOPS_HOME"])
    monkeypatch.setenv("MLOPS_SERVE_PORT", environment["MLOPS_SERVE_PORT"])
    for name in ("MLOPS_API_TOKEN", "RAY_ADDRESS", "MLOPS_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    r = default_resources()
    asset = serve_config(r["registry"], r["warehouse"], r["ray_serve"], r["prediction_log_files"])
    raw = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    head = ServeConfig.model_validate(raw["applications"][0]["args"])
    assert head.fingerprint() == asset.fingerprint()
    # head.sh adds the token from the environment, as the asset does.
    monkeypatch.setenv("MLOPS_API_TOKEN", "t0ken")
    r = default_resources()
    ray_serve = r["ray_serve"].process_config_and_initialize()  # EnvVar resolved, as in a run
    assert ray_serve.api_token == "t0ken"
    with_token = serve_config(r["registry"], r["warehouse"], ray_serve, r["prediction_log_files"])
    args = {**raw["applications"][0]["args"], "api_token": "t0ken"}
    assert ServeConfig.model_validate(args).fingerprint() == with_token.fingerprint()

    # head.sh's own renderer, run here: the token is added, nothing else changes.
    script = (ROOT / "deploy" / "ray" / "head.sh").read_text()
    snippet = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    snippet = snippet.replace(f"{IMAGE_ROOT}/", f"{ROOT}/")
    rendered = tmp_path / "serve.yaml"
    for token, expected in (("t0ken", "t0ken"), ("", None)):
        env = {**os.environ, "MLOPS_API_TOKEN": token}
        result = _run([sys.executable, "-c", snippet, str(rendered)], env=env)
        assert result.returncode == 0, result.stderr
        out = yaml.safe_load(rendered.read_text())
        assert out["applications"][0]["args"].pop("api_token", None) == expected
        assert out == raw


# -- the entry commands, run outside Docker -------------------------------------------------------


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return [str(part) for part in command] if isinstance(command, list) else command.split()


def _localize(cmd: list[str], port: int, workspace: Path) -> list[str]:
    """The container command for this machine: 127.0.0.1, a free port, paths in the checkout."""
    out = []
    for i, arg in enumerate(cmd):
        previous = cmd[i - 1] if i else ""
        if previous in ("--host", "-h"):
            arg = "127.0.0.1"
        elif previous in ("--port", "-p"):
            arg = str(port)
        elif previous in ("--workspace", "-w"):
            arg = str(workspace)
        elif arg.startswith(f"{IMAGE_ROOT}/"):
            arg = str(ROOT / arg.removeprefix(f"{IMAGE_ROOT}/"))
        out.append(arg)
    exe = BIN / out[0]
    return [str(exe) if exe.exists() else out[0], *out[1:]]


@contextmanager
def _started(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        # Our own process group only (the code server has a child gRPC process).
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def _until(check: Any, timeout: float, what: str, procs: dict[str, Any]) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        last = check()
        if last:
            return last
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout}s (last: {last})")


LOCATIONS_QUERY = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


RELOAD_MUTATION = """
mutation { reloadRepositoryLocation(repositoryLocationName: "mlops_assets") { __typename } }
"""


def test_compose_entry_commands_come_up(tmp_path: Path) -> None:
    """Code server, webserver and daemon from compose.yaml, on the compose Dagster instance."""
    server = postgres_server()
    ports = {"code": free_port(), "web": free_port()}
    workspace = tmp_path / "workspace.yaml"
    compose_workspace = yaml.safe_load((ROOT / "deploy/dagster/workspace.yaml").read_text())
    grpc = compose_workspace["load_from"][0]["grpc_server"]
    assert (grpc["host"], grpc["port"]) == ("dagster-code", 4000)
    grpc.update(host="127.0.0.1", port=ports["code"])
    workspace.write_text(yaml.safe_dump(compose_workspace))

    with throwaway_database(server) as database:
        env = {
            **os.environ,
            **compose_instance_env(server, database, tmp_path / "storage"),
            "DAGSTER_HOME": str(compose_dagster_home(tmp_path / "dagster_home")),
            "MLOPS_HOME": str(tmp_path / "mlops"),
            "DAGSTER_CURRENT_IMAGE": "mlops-assets:test",
        }
        procs: dict[str, Any] = {}
        commands = {
            "dagster-code": _localize(_command(_service("dagster-code")), ports["code"], workspace),
            "dagster-webserver": _localize(
                _command(_service("dagster-webserver")), ports["web"], workspace
            ),
            "dagster-daemon": _localize(_command(_service("dagster-daemon")), 0, workspace),
        }
        with (
            _started(commands["dagster-code"], env, tmp_path / "code.log") as code,
            _started(commands["dagster-webserver"], env, tmp_path / "web.log") as web,
            _started(commands["dagster-daemon"], env, tmp_path / "daemon.log") as daemon,
        ):
            procs = {
                "dagster-code": (code, tmp_path / "code.log"),
                "dagster-webserver": (web, tmp_path / "web.log"),
                "dagster-daemon": (daemon, tmp_path / "daemon.log"),
            }
            # The code server: compose's own healthcheck command.
            health = _localize(
                _service("dagster-code")["healthcheck"]["test"][1:], ports["code"], workspace
            )
            _until(lambda: _run(health, env=env).returncode == 0, 240, "code server", procs)

            # The webserver answers, and has loaded the code location over gRPC.
            base = f"http://127.0.0.1:{ports['web']}"

            def location_loaded() -> Any:
                try:
                    answer = httpx.post(
                        f"{base}/graphql", json={"query": LOCATIONS_QUERY}, timeout=10
                    ).json()
                except (httpx.HTTPError, json.JSONDecodeError):
                    return None
                entries = answer["data"]["workspaceOrError"]["locationEntries"]
                if entries[0]["loadStatus"] != "LOADED":
                    return None
                if entries[0]["locationOrLoadError"]["__typename"] == "PythonError":
                    # The first load can time out while the code server imports the project
                    # (seen once in CI): ask for a reload, as the UI's button does, and wait.
                    httpx.post(f"{base}/graphql", json={"query": RELOAD_MUTATION}, timeout=60)
                    return None
                return entries

            entries = _until(location_loaded, 240, "webserver", procs)
            assert entries[0]["name"] == "mlops_assets"
            assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation"
            assert httpx.get(f"{base}/server_info", timeout=10).status_code == 200

            # The image's HEALTHCHECK script, on the webserver, then on a closed port.
            probe = [sys.executable, str(ROOT / "deploy" / "healthcheck.py")]
            ok = _run(probe, env={**env, "MLOPS_HEALTHCHECK_URL": f"{base}/server_info"})
            assert ok.returncode == 0, ok.stderr
            closed = f"http://127.0.0.1:{free_port()}/server_info"
            refused = _run(probe, env={**env, "MLOPS_HEALTHCHECK_URL": closed})
            assert refused.returncode == 1
            assert closed in refused.stderr

            # The daemon: compose's liveness check reads its heartbeats from PostgreSQL.
            liveness = _localize(
                _service("dagster-daemon")["healthcheck"]["test"][1:], 0, workspace
            )
            _until(lambda: _run(liveness, env=env).returncode == 0, 240, "daemon", procs)
