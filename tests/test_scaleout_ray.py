"""An existing Ray cluster by address: training and serving run there, nothing local is started.

The cluster is started the way an operator would, with the Ray CLI (``ray start --head``,
detached), in its own session with its own temp dir and free ports, on 127.0.0.1, token auth
off for this local test (``RAY_AUTH_MODE=disabled`` for the CLI and this driver alike). The
project only gets its address (``RayResource.address``, i.e. ``RAY_ADDRESS``). At the end the
processes of that session, and only those, are stopped by PID (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import numpy as np
import polars as pl
import pytest
import ray
from ray.serve import context as serve_context
from realdata import valid_table

from mlops_assets.features.assets import PREPROCESSOR_FILE
from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import BOOKING_COLUMNS, FEATURE_NAMES, LABEL, build_features
from mlops_assets.serve import assets as serve_assets
from mlops_assets.serve.deployment import replica_infos
from mlops_assets.serve.ray_runtime import STATE_FILE, free_port, local_ray, session_pids
from mlops_assets.train import assets as train_assets
from mlops_assets.train.mlflow_bridge import MlflowResource
from mlops_assets.train.model import Matrix, SearchSettings, fit
from mlops_assets.train.on_ray import RemoteTrainingError, run_search, search_on_cluster
from resources.prediction_log import PredictionLogResource
from resources.ray import RayResource
from resources.registry import ModelRegistryResource
from resources.storage import write_text_atomic
from resources.warehouse import WarehouseResource

pytestmark = pytest.mark.timeout(300)

CLUSTER_CPUS = 2
TRAIN = {"n_trials": 2, "seed": 7, "num_threads": 1}


@dataclass(frozen=True)
class Cluster:
    address: str
    session_id: int
    temp_dir: str
    cwd: str
    """Where `ray start` ran: every process of the head keeps it (Ray's agents lose the
    ``RAY_TMPDIR`` entry of their environment to their process title, in about half the starts)."""


def _stop_session(cluster: Cluster, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, to the processes of the session our `ray start` created."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        for pid in session_pids(cluster.session_id, cluster.temp_dir, cluster.cwd):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while session_pids(cluster.session_id, cluster.temp_dir, cluster.cwd):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not session_pids(cluster.session_id, cluster.temp_dir, cluster.cwd):
            return


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="mlsc", dir="/tmp"))  # short: Ray socket paths
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(home: Path) -> Iterator[Cluster]:
    """A Ray head started with the CLI, detached; this process only joins it."""
    temp_dir = home / "rt"
    temp_dir.mkdir()
    auth = {
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(temp_dir),
        "TMPDIR": str(temp_dir),
    }
    # The cluster's own tuning (read by its Serve controller): on a loaded 2-core CI machine a
    # proxy can take longer than Serve's 5 s readiness timeout, and gets killed and restarted.
    tuning = {
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    }
    env = {**os.environ, **auth, **tuning}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    ports = [
        "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
        "--object-manager-port", "--dashboard-port",
    ]  # fmt: skip
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
        f"--num-cpus={CLUSTER_CPUS}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp_dir}",
        f"--object-store-memory={256 * 1024 * 1024}", "--disable-usage-stats",
        *(f"{flag}={free_port()}" for flag in ports),
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name, value in auth.items():
            patch.setenv(name, value)  # the driver agrees with the head on auth
        patch.delenv("RAY_ADDRESS", raising=False)
        started = time.monotonic()
        cluster = None
        try:
            # `ray start` gives the raylet a fixed 30 s to register; on a loaded machine it can
            # miss that, so a failed start is cleaned up and tried again (as start_local_ray does).
            for attempt in (1, 2, 3):
                with open(home / "ray-start.log", "ab") as log:
                    # A new session: every process of the head stays in it; we stop exactly those.
                    proc = subprocess.Popen(
                        command, env=env, stdout=log, stderr=subprocess.STDOUT,
                        start_new_session=True, cwd=home,
                    )  # fmt: skip
                cluster = Cluster(
                    f"127.0.0.1:{port}", proc.pid, temp_dir=str(temp_dir), cwd=str(home)
                )
                if proc.wait(timeout=180) == 0:
                    break
                _stop_session(cluster)
                assert attempt < 3, (home / "ray-start.log").read_text()[-3000:]
            print(f"cluster up in {time.monotonic() - started:.1f}s at {cluster.address}")
            yield cluster
        finally:
            # Serve goes away with the cluster: no serve.shutdown() (a ~30 s graceful drain here,
            # and without a connection it would start a local Ray). Forget its cached client, so
            # a later driver session whose job id happens to match cannot reuse it.
            ray.shutdown()
            serve_context._set_global_client(None)
            if cluster is not None:
                _stop_session(cluster)
                assert session_pids(cluster.session_id, cluster.temp_dir, cluster.cwd) == []


@pytest.fixture(scope="module")
def on_cluster(home: Path, cluster: Cluster) -> RayResource:
    return RayResource(address=cluster.address, state_dir=str(home / "ray"), http_port=free_port())


@pytest.fixture(scope="module")
def stores(home: Path) -> dict[str, Any]:
    """Warehouse (weather, planes, January as the training set) and an empty registry."""
    weather, planes = valid_table("weather"), valid_table("planes")
    flights = valid_table("flights", 1)
    warehouse = WarehouseResource(root=str(home / "warehouse"), reports_root=str(home / "reports"))
    warehouse.write("weather", weather, "2013-01")
    warehouse.write("planes", planes)
    labelled = build_features(flights, weather, planes).filter(pl.col(LABEL).is_not_null())
    frame = labelled.with_columns(
        pl.when(pl.col("flight_date").dt.day() <= 21)
        .then(pl.lit("train"))
        .otherwise(pl.lit("valid"))
        .alias("split")
    )
    preprocessor = Preprocessor.fit(frame.filter(pl.col("split") == "train"))
    warehouse.write("training_set", frame)
    write_text_atomic(
        preprocessor.to_json(), warehouse.table_dir("training_set") / PREPROCESSOR_FILE
    )
    registry = ModelRegistryResource(root=str(home / "registry"))
    records = flights.select(list(BOOKING_COLUMNS)).sample(20, seed=3).to_dicts()
    return {"warehouse": warehouse, "registry": registry, "frame": frame,
            "preprocessor": preprocessor, "records": records}  # fmt: skip


def _matrices(stores: dict[str, Any]) -> tuple[Matrix, Matrix]:
    frame, preprocessor = stores["frame"], stores["preprocessor"]
    train = Matrix.from_features(frame.filter(pl.col("split") == "train"), preprocessor)
    valid = Matrix.from_features(frame.filter(pl.col("split") == "valid"), preprocessor)
    return train, valid


@pytest.fixture(scope="module")
def trained(
    home: Path, stores: dict[str, Any], on_cluster: RayResource, cluster: Cluster
) -> dict[str, Any]:
    """challenger_model materialized with the cluster address configured."""
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        started = time.monotonic()
        result = dg.materialize(
            [train_assets.challenger_model],
            resources={
                "warehouse": stores["warehouse"],
                "registry": stores["registry"],
                "ray_serve": on_cluster,
                "mlflow_tracking": MlflowResource(),  # tracking off
            },
            run_config={"ops": {"challenger_model": {"config": TRAIN}}},
            instance=instance,
        )
        seconds = time.monotonic() - started
    assert result.success
    (event,) = result.asset_materializations_for_node("challenger_model")
    metadata = {k: v.value for k, v in event.metadata.items()}
    print(f"challenger_model on the cluster: {seconds:.1f}s ({metadata['trained_on']})")
    return metadata


# -- the local default never starts Ray for training ------------------------------------------


def test_without_an_address_the_search_runs_in_process_and_starts_no_ray(
    tmp_path: Path, stores: dict[str, Any]
) -> None:
    connected_before = ray.is_initialized()
    local = RayResource(state_dir=str(tmp_path / "ray"))
    train, valid = _matrices(stores)
    result, where = run_search(train, valid, SearchSettings(n_trials=1, num_threads=1), local)
    assert where.mode == "in-process" and where.pid == os.getpid()
    assert result.trials.height == 1
    assert not (tmp_path / "ray").exists(), "the local default started a Ray head"
    assert ray.is_initialized() == connected_before


def test_search_on_cluster_refuses_without_an_address(tmp_path: Path) -> None:
    with pytest.raises(RemoteTrainingError, match="no Ray cluster address"):
        search_on_cluster(
            Matrix(x=None, y=None),  # type: ignore[arg-type]
            Matrix(x=None, y=None),  # type: ignore[arg-type]
            SearchSettings(),
            RayResource(state_dir=str(tmp_path / "ray")),
        )


# -- training on the cluster ------------------------------------------------------------------


def test_training_runs_on_the_cluster_with_the_same_model_bytes(
    tmp_path: Path, stores: dict[str, Any], trained: dict[str, Any], cluster: Cluster
) -> None:
    registry: ModelRegistryResource = stores["registry"]
    version = trained["version"]
    manifest = registry.manifest(version)
    compute = manifest["training"]["compute"]
    assert compute["mode"] == "ray" and compute["address"] == cluster.address
    # Another process, one the cluster started (its session), not this test process.
    assert compute["pid"] != os.getpid()
    assert compute["pid"] in session_pids(cluster.session_id, cluster.temp_dir, cluster.cwd)
    assert compute["node_id"] in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert "Ray task on the cluster at " + cluster.address in trained["trained_on"]
    # The same search in this process, then challenger_model's fit on train + valid with what
    # it chose, gives the same model, byte for byte.
    train, valid = _matrices(stores)
    local, where = run_search(
        train, valid, SearchSettings(**TRAIN), RayResource(state_dir=str(tmp_path / "ray"))
    )
    assert where.mode == "in-process"
    assert manifest["params"]["num_boost_round"] == local.best_iteration
    fitted = stores["frame"].filter(pl.col("split") != "test")
    final = fit(
        local.params, Matrix.from_features(fitted, Preprocessor.fit(fitted)),
        local.best_iteration, seed=TRAIN["seed"], num_threads=TRAIN["num_threads"],
    )  # fmt: skip
    stored = registry.load(version)  # verified against its sha256
    assert stored.model_text == final.model_to_string()
    assert trained["trials"] == local.trials.height == TRAIN["n_trials"]


def test_a_search_asking_for_more_cpus_than_the_cluster_has_fails_clearly(
    stores: dict[str, Any], on_cluster: RayResource
) -> None:
    train, valid = _matrices(stores)
    settings = SearchSettings(n_trials=1, num_threads=CLUSTER_CPUS + 6)
    with pytest.raises(RemoteTrainingError, match=rf"asks for 8 CPUs .* has {CLUSTER_CPUS}"):
        search_on_cluster(train, valid, settings, on_cluster)


def test_a_search_that_fails_on_the_cluster_raises_with_the_cause(
    stores: dict[str, Any], on_cluster: RayResource
) -> None:
    train, valid = _matrices(stores)
    narrow = Matrix(x=np.ascontiguousarray(train.x[:, :3]), y=train.y)  # 3 of the features
    cause = rf"ValueError: Length of feature_name\({len(FEATURE_NAMES)}\) and num_feature\(3\)"
    with pytest.raises(RemoteTrainingError, match=rf"failed on the Ray cluster at \S+: {cause}"):
        search_on_cluster(narrow, valid, SearchSettings(n_trials=1, num_threads=1), on_cluster)


# -- serving on the cluster -------------------------------------------------------------------


def test_serving_deploys_on_the_cluster_and_answers_on_loopback(
    home: Path,
    stores: dict[str, Any],
    trained: dict[str, Any],
    on_cluster: RayResource,
    cluster: Cluster,
) -> None:
    registry: ModelRegistryResource = stores["registry"]
    version = trained["version"]
    registry.promote(version, "test: trained on the cluster")
    log_dir = home / "predlog"
    result = dg.materialize(
        [serve_assets.served_model, serve_assets.endpoint_serves_champion],
        resources={
            "registry": registry,
            "warehouse": stores["warehouse"],
            "ray_serve": on_cluster,
            "prediction_log_files": PredictionLogResource(folder=str(log_dir)),
        },
    )
    assert result.success
    (event,) = result.asset_materializations_for_node("served_model")
    assert event.metadata["ray_address"].value == cluster.address
    (check,) = result.get_asset_check_evaluations()
    assert check.passed, check.description
    url = f"http://127.0.0.1:{on_cluster.http_port}"
    with httpx.Client(base_url=url, timeout=30) as client:
        response = client.post("/predict", json={"flights": stores["records"]})
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == version
    body = response.json()
    assert body["model_version"] == version and len(body["predictions"]) == 20
    # The replica is a process of the cluster; the project started no head of its own.
    config = serve_assets.serve_config(
        registry, stores["warehouse"], on_cluster, PredictionLogResource(folder=str(log_dir))
    )
    (replica,) = replica_infos(config)
    assert replica["pid"] in session_pids(cluster.session_id, cluster.temp_dir, cluster.cwd)
    # (Ray reports 127.0.0.1 as the machine's address: compare the port.)
    gcs = ray.get_runtime_context().gcs_address
    assert gcs.rpartition(":")[2] == cluster.address.rpartition(":")[2]
    assert local_ray(on_cluster.state_dir) is None
    assert not (Path(on_cluster.state_dir) / STATE_FILE).exists()
