"""The served model: the registry champion live on Ray Serve, and a check on the live endpoint.

Ray Serve is imported inside the asset and check bodies only (``ray.serve`` takes ~1.7 s to
import; other steps never pay it).
"""

import time
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import polars as pl

from mlops_assets.metadata import markdown_table
from mlops_assets.serve.schema import SERVING
from resources.prediction_log import PredictionLogResource
from resources.ray import RayResource
from resources.registry import ModelRegistryResource
from resources.storage import absolute_location
from resources.warehouse import WarehouseResource

CHECK_NAME = "endpoint_serves_champion"


class ServedModelConfig(dg.Config):
    """Serving knobs (the defaults suit a 2-core machine)."""

    num_replicas: int = SERVING.num_replicas
    replica_num_cpus: float = SERVING.replica_num_cpus
    max_batch_size: int = SERVING.max_batch_size
    batch_wait_timeout_s: float = SERVING.batch_wait_timeout_s
    max_ongoing_requests: int = SERVING.max_ongoing_requests
    max_queued_requests: int = SERVING.max_queued_requests
    max_records: int = SERVING.max_records
    # Score with the model's trees compiled by lleaves once they equal LightGBM's answers
    # (compiled in the background after each swap; see serve/compiled.py).
    compile_trees: bool = True


def serve_config(
    registry: ModelRegistryResource,
    warehouse: WarehouseResource,
    ray_serve: RayResource,
    prediction_log_files: PredictionLogResource,
    config: ServedModelConfig | None = None,
) -> Any:
    """The ``ServeConfig`` these resources describe."""
    from mlops_assets.serve.deployment import ServeConfig

    knobs = config or ServedModelConfig()
    return ServeConfig(
        # Object-store URLs are passed on as they are (replicas read them through fsspec).
        registry_root=absolute_location(registry.root),
        warehouse_root=absolute_location(warehouse.root),
        http_host=ray_serve.http_host,
        http_port=ray_serve.http_port,
        prediction_log_dir=str(Path(prediction_log_files.folder).resolve()),
        state_dir=str(Path(ray_serve.state_dir).resolve() / "serve"),
        api_token=ray_serve.api_token or None,
        **knobs.model_dump(),
    )


@dg.asset(
    group_name="serve",
    kinds={"ray", "fastapi"},
    deps=["champion_model"],
)
def served_model(
    context: dg.AssetExecutionContext,
    config: ServedModelConfig,
    registry: ModelRegistryResource,
    warehouse: WarehouseResource,
    ray_serve: RayResource,
    prediction_log_files: PredictionLogResource,
) -> dg.MaterializeResult:
    """The champion model live on Ray Serve (swapped in place, verified before it takes traffic)."""
    from mlops_assets.serve.deployment import DeployError, deploy

    version = registry.champion()
    if version is None:
        raise dg.Failure("there is no champion model to serve: materialize champion_model first")
    address = ray_serve.ensure_connected()
    settings = serve_config(registry, warehouse, ray_serve, prediction_log_files, config)
    try:
        result = deploy(settings, version)
    except DeployError as exc:
        raise dg.Failure(f"deploying model {version} failed: {exc}") from exc
    context.log.info(
        f"{result['mode']}: {result['previous_versions'] or 'nothing'} -> {version} at "
        f"{result['endpoint']} in {result['seconds']:.1f}s"
    )
    replicas = pl.DataFrame(
        [
            {k: r.get(k) for k in ("replica_id", "pid", "model_version", "load_seconds")}
            for r in result["replicas"]
        ],
        schema={"replica_id": pl.String, "pid": pl.Int64, "model_version": pl.String,
                "load_seconds": pl.Float64},
    )  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "version": dg.MetadataValue.text(version),
            "endpoint": dg.MetadataValue.url(result["endpoint"]),
            "docs": dg.MetadataValue.url(f"{result['endpoint']}/docs"),
            # Ray direct ingress (RayResource.direct_ingress): each replica's own port, no proxy.
            "direct_endpoints": dg.MetadataValue.text(
                ", ".join(result["direct_endpoints"]) or "none (direct ingress off)"
            ),
            "mode": dg.MetadataValue.text(result["mode"]),
            "previous_versions": dg.MetadataValue.text(
                ", ".join(str(v) for v in result["previous_versions"]) or "none"
            ),
            "replicas": dg.MetadataValue.int(len(result["replicas"])),
            "replica_info": dg.MetadataValue.md(markdown_table(replicas, 20)),
            "deploy_seconds": dg.MetadataValue.float(result["seconds"]),
            "ray_address": dg.MetadataValue.text(address),
        }
    )


def endpoint_url(ray_serve: RayResource) -> str:
    return f"http://{ray_serve.http_host}:{ray_serve.http_port}"


@dg.asset_check(asset=served_model, name=CHECK_NAME)
def endpoint_serves_champion(
    registry: ModelRegistryResource, ray_serve: RayResource
) -> dg.AssetCheckResult:
    """The live endpoint answers (healthz, one real prediction) with the registry champion."""
    from mlops_assets.serve.predictor import SMOKE_RECORD

    url = endpoint_url(ray_serve)
    champion = registry.champion()
    headers = {"Authorization": f"Bearer {ray_serve.api_token}"} if ray_serve.api_token else {}
    observed: dict[str, Any] = {"champion": champion}
    problems: list[str] = []
    try:
        health = httpx.get(f"{url}/healthz", timeout=10)
        observed["healthz_status"] = health.status_code
        observed["healthz_version"] = health.json().get("model_version")
        started = time.perf_counter()
        answer = httpx.post(
            f"{url}/predict",
            json={"flights": [SMOKE_RECORD]},
            headers=headers,
            timeout=10,
        )
        observed["predict_ms"] = round((time.perf_counter() - started) * 1000, 2)
        observed["predict_status"] = answer.status_code
        if answer.status_code == 200:
            body = answer.json()
            observed["predict_version"] = body.get("model_version")
            observed["header_version"] = answer.headers.get("x-model-version")
            observed["delay_probability"] = body["predictions"][0]["delay_probability"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        problems.append(f"endpoint error: {type(exc).__name__}: {exc}")
    for key in ("healthz_version", "predict_version", "header_version"):
        if observed.get(key) != champion:
            problems.append(f"{key} is {observed.get(key)!r}, the champion is {champion!r}")
    metadata: dict[str, Any] = {
        k: v if isinstance(v, int | float) else dg.MetadataValue.text(str(v))
        for k, v in observed.items()
    }
    return dg.AssetCheckResult(
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems) or f"{url} answers with the champion {champion}",
        metadata={**metadata, "endpoint": dg.MetadataValue.url(url)},
    )


assets = [served_model]
asset_checks = [endpoint_serves_champion]
