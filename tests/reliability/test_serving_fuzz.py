"""The HTTP API fuzzed from its own OpenAPI schema with schemathesis: never a 5xx, and every
answer conforms to the schema (documented status codes, response bodies and content types).

Two targets: the FastAPI app in-process through ASGI (fast: runs by default), and the real Ray
Serve HTTP path on 127.0.0.1 (``reliability_full``). Both serve a real model from the registry.
Each operation gets a bounded number of generated cases, valid and invalid (schemathesis'
positive and negative modes). The status counts are printed at the end of the module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mlops_assets.serve.app import build_app
from mlops_assets.serve.deployment import ModelTarget, load_predictor
from mlops_assets.serve.ray_runtime import free_port
from resources.ray import RayResource
from tests.reliability.serving_fixtures import (
    Stores,
    build_stores,
    local_head,
    short_home,
)

pytestmark = pytest.mark.timeout(600)

MAX_EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def fuzz(schema: Any, call: Callable[[Any], Any]) -> Counter[str]:
    """Each operation, valid and invalid cases: never a 5xx, every answer conforms."""
    seen: Counter[str] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/healthz", "/model"}
    for operation in operations:
        # Invalid cases need something to break: a body (the GET routes take no parameters).
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,
            )
            def run(case: Any) -> None:
                response = call(case)
                seen[f"{response.status_code}"] += 1
                case.validate_response(response, checks=CHECKS)

            run()
    return seen


def _summary(target: str, seen: Counter[str]) -> str:
    server_errors = sum(n for status, n in seen.items() if status.startswith("5"))
    return (
        f"\nschemathesis via {target}: {sum(seen.values())} cases, statuses "
        f"{dict(sorted(seen.items()))}, 5xx {server_errors}"
    )


@pytest.fixture(scope="module")
def stores() -> Iterator[Stores]:
    with short_home("mlfz") as home:
        yield build_stores(home)


def test_asgi_api_never_answers_5xx_and_conforms(stores: Stores) -> None:
    version = stores.versions[0]
    target = ModelTarget(
        model_version=version,
        registry_root=stores.registry.root,
        warehouse_root=stores.warehouse.root,
    )
    predictor = load_predictor(target)
    app = build_app(lambda: predictor, max_records=50, max_body_bytes=200_000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen = fuzz(schema, lambda case: case.call())
    print(_summary("ASGI in-process", seen))
    assert seen["200"] > 0 and seen["422"] > 0


@pytest.mark.reliability_full
def test_ray_http_api_never_answers_5xx_and_conforms(stores: Stores) -> None:
    from mlops_assets.serve import assets as serve_assets
    from mlops_assets.serve.deployment import deploy
    from resources.prediction_log import PredictionLogResource

    resource = RayResource(
        state_dir=str(Path(stores.home) / "ray"),
        temp_dir=str(Path(stores.home) / "rt"),
        http_port=free_port(),
    )
    with local_head(resource):
        config = serve_assets.serve_config(
            stores.registry,
            stores.warehouse,
            resource,
            PredictionLogResource(folder=str(Path(stores.home) / "predlog")),
        ).model_copy(update={"max_records": 50, "max_body_bytes": 200_000})
        deploy(config, stores.versions[0])
        schema = schemathesis.openapi.from_url(f"{config.url}/openapi.json")
        seen = fuzz(schema, lambda case: case.call(base_url=config.url, timeout=30))
    print(_summary(f"Ray Serve HTTP {config.url}", seen))
    assert seen["200"] > 0 and seen["422"] > 0
