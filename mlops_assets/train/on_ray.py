"""Where the challenger search runs: in this process by default, on a Ray cluster when one is set.

With ``RayResource.address`` empty (the local default) the search runs in the calling process
and Ray is neither imported nor started. With an address (``RAY_ADDRESS``), the whole Optuna
search and the final refit run as one Ray task on the cluster (``num_cpus`` = the LightGBM
threads), and the task returns the model as LightGBM **text** plus plain numbers: no Booster is
pickled, and the driver rebuilds the Booster from the text (the text round-trips byte for byte).

The cluster's workers must be able to import this project (the same wheel or an editable
install on every node), as for the Serve replicas.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from mlops_assets.train.model import Matrix, SearchResult, SearchSettings, search
from resources.ray import RayResource

DEFAULT_TASK_TIMEOUT_S = 3600.0


class RemoteTrainingError(RuntimeError):
    """The search could not run on the configured Ray cluster."""


@dataclass(frozen=True)
class TrainedWhere:
    """Where a search ran: ``mode`` is ``"in-process"`` or ``"ray"``."""

    mode: str
    pid: int
    hostname: str
    address: str | None = None
    node_id: str | None = None

    @classmethod
    def here(cls) -> TrainedWhere:
        """This process."""
        return cls(mode="in-process", pid=os.getpid(), hostname=socket.gethostname())

    def describe(self) -> str:
        if self.mode == "ray":
            return (
                f"Ray task on the cluster at {self.address} (node {(self.node_id or '?')[:12]}, "
                f"host {self.hostname}, pid {self.pid})"
            )
        return f"in-process (host {self.hostname}, pid {self.pid})"

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "pid": self.pid,
            "hostname": self.hostname,
            "address": self.address,
            "node_id": self.node_id,
        }


def _search_payload(
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    settings: SearchSettings,
) -> dict[str, Any]:
    """The search, with a result made only of text and numbers (what the Ray task returns)."""
    import ray

    result = search(Matrix(train_x, train_y), Matrix(valid_x, valid_y), settings)
    return {
        "model_text": result.booster.model_to_string(),
        "params": result.params,
        "best_iteration": result.best_iteration,
        "best_valid_auc": result.best_valid_auc,
        "trials_json": result.trials.write_json(),
        "seconds": result.seconds,
        "pruned": result.pruned,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
    }


def _from_payload(payload: dict[str, Any]) -> SearchResult:
    trials = pl.read_json(payload["trials_json"].encode("utf-8"))
    return SearchResult(
        params=dict(payload["params"]),
        best_iteration=int(payload["best_iteration"]),
        best_valid_auc=float(payload["best_valid_auc"]),
        trials=trials,
        booster=lgb.Booster(model_str=payload["model_text"]),
        seconds=float(payload["seconds"]),
        pruned=int(payload["pruned"]),
    )


def search_on_cluster(
    train: Matrix,
    valid: Matrix,
    settings: SearchSettings,
    ray_resource: RayResource,
    timeout_s: float = DEFAULT_TASK_TIMEOUT_S,
) -> tuple[SearchResult, TrainedWhere]:
    """Run :func:`search` as one Ray task on the cluster at ``ray_resource.address``."""
    import ray

    if ray_resource.is_local:
        raise RemoteTrainingError("no Ray cluster address is configured (RAY_ADDRESS)")
    address = ray_resource.ensure_connected()
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if cpus < settings.num_threads:
        raise RemoteTrainingError(
            f"the search asks for {settings.num_threads} CPUs (num_threads) but the Ray "
            f"cluster at {address} has {cpus:g} in total; lower num_threads or add nodes"
        )
    task = ray.remote(num_cpus=settings.num_threads, max_retries=0)(_search_payload)
    ref = task.remote(
        ray.put(train.x), ray.put(train.y), ray.put(valid.x), ray.put(valid.y), settings
    )
    try:
        payload = ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        ray.cancel(ref, force=True)
        raise RemoteTrainingError(
            f"the search on the Ray cluster at {address} did not finish in {timeout_s:.0f}s "
            "(is every CPU taken by other work?)"
        ) from exc
    except ray.exceptions.RayTaskError as exc:
        # The task's own exception (the remote traceback stays chained for the logs).
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        raise RemoteTrainingError(
            f"the search failed on the Ray cluster at {address}: {type(cause).__name__}: {cause}"
        ) from exc
    except ray.exceptions.RayError as exc:
        raise RemoteTrainingError(
            f"the search failed on the Ray cluster at {address}: {exc}"
        ) from exc
    result = _from_payload(payload)
    if result.booster.model_to_string() != payload["model_text"]:  # the text is the contract
        raise RemoteTrainingError("the model text did not survive the trip from the cluster")
    where = TrainedWhere(
        mode="ray",
        pid=int(payload["pid"]),
        hostname=str(payload["hostname"]),
        address=address,
        node_id=str(payload["node_id"]),
    )
    return result, where


def run_search(
    train: Matrix,
    valid: Matrix,
    settings: SearchSettings,
    ray_resource: RayResource | None = None,
) -> tuple[SearchResult, TrainedWhere]:
    """The search where the configuration says: the Ray cluster if an address is set, else here."""
    if ray_resource is not None and not ray_resource.is_local:
        return search_on_cluster(train, valid, settings, ray_resource)
    result = search(train, valid, settings)
    return result, TrainedWhere.here()
