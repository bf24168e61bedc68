"""The serving HTTP contract (DESIGN.md, "Serving contract") as a plain FastAPI app.

``build_app`` builds it; nothing happens at import time. The model comes from an injected
``get_predictor`` callable, read once per request, so whoever owns the app (a Ray Serve replica,
a test, a local uvicorn) decides how models are loaded and swapped, and a request is answered
and tagged by one model even if a swap lands mid-request.

Bad input always gets a clear 4xx, never a 5xx:

- 401 missing or wrong bearer token (when a token is configured; ``/healthz``, ``/metrics`` and
  the OpenAPI pages stay open for probes, scrapers and readers);
- 415 a body that is not declared as JSON; 413 a body over the limit, by ``Content-Length`` and
  by the bytes actually received (a chunked body has no length up front);
- 400 malformed JSON; 422 unknown or missing fields, wrong types, NaN/infinity, values out of
  range, too many records, each error with its path (``loc``) from ``body``;
- 404/405 unknown routes and wrong methods; 503 while no model is loaded.

The body is read and validated by hand (``model_validate_json``, pydantic's Rust parser) rather
than by FastAPI's parameter machinery: that is what lets the limit apply while streaming, keeps
malformed JSON a 400, and parses in one pass.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlops_assets.serve.columnar import (
    ARROW_MEDIA_TYPE,
    ArrowBodyError,
    Bookings,
    impossible_calendar_rows,
    read_arrow,
    validate_frame,
)
from mlops_assets.serve.metrics import ServeMetrics
from mlops_assets.serve.predictor import Predictor
from mlops_assets.serve.predlog import PredictionLog
from mlops_assets.serve.schema import (
    DEFAULT_MAX_RECORDS,
    ErrorBody,
    Health,
    PredictResponse,
    parsing_request_model,
    predict_request_model,
)

Scorer = Callable[[Predictor, Bookings], Awaitable[np.ndarray]]
"""Scores one request's validated records with the model it was tagged with: P(delayed) each."""

log = logging.getLogger(__name__)

MODEL_VERSION_HEADER = "X-Model-Version"
REQUEST_ID_HEADER = "X-Request-ID"
# Client request ids are echoed into headers and logs: only a short, plain token is trusted.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_ERRORS_SHOWN = 50
INLINE_MAX_RECORDS = 32
# With compiled trees a 1,000-record request costs the loop ~2.5 ms (matrix ~1 ms, trees
# ~1.6 ms split with their helper thread), less than the hop to a scoring thread and back to
# the GIL costs under load. Measured, 1,000-record Arrow requests at 2/4/8 clients: 101k/105k/
# 109k rows/s inline against 88k/96k at 2/4 on the pool (benchmarks/README.md, session 16).
# Still on the pool: LightGBM (inline it got 64-69k rows/s against 72-88k on the pool).
INLINE_COMPILED_MAX_RECORDS = 2000
# After refusing an oversized body, read (and discard) up to this much more of it, so ordinary
# clients that send the whole body before reading see the 413 instead of a connection reset.
DRAIN_LIMIT_BYTES = 8 * 1024 * 1024
_PHRASES = {400: "bad request", 401: "unauthorized", 404: "not found",
            405: "method not allowed", 413: "body too large", 415: "unsupported media type",
            422: "invalid request", 500: "internal error", 503: "unavailable"}  # fmt: skip

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed JSON"},
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    413: {"model": ErrorBody, "description": "Body larger than the limit"},
    415: {"model": ErrorBody, "description": "Body not sent as application/json"},
    422: {"model": ErrorBody, "description": "Invalid records; `loc` is the path of each error"},
    503: {"model": ErrorBody, "description": "No model loaded yet"},
}


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Request id on every response, metrics for every request, rejected predictions logged.

    Plain ASGI (not ``BaseHTTPMiddleware``): no extra task or body copy per request.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServeMetrics,
        log_sink: PredictionLog | None,
        echo_request_id: bool = True,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.log_sink = log_sink
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                if self.echo_request_id:
                    message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error on %s %s (request %s)", scope["method"], scope["path"], request_id
            )
            state.setdefault("error", "internal error")
            if not response_started:
                body = json.dumps(
                    {"detail": "internal server error", "request_id": request_id}
                ).encode()
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(route, scope["method"], status, elapsed)
            if status >= 400 and route == "/predict" and self.log_sink is not None:
                try:
                    self.log_sink.log_rejection(
                        request_id=request_id,
                        status=status,
                        error=state.get("error") or _PHRASES.get(status, f"HTTP {status}"),
                        latency_ms=elapsed * 1000,
                        model_version=state.get("model_version"),
                    )
                except Exception:
                    log.exception("could not log rejected request %s", request_id)


def _error(
    request: Request,
    status: int,
    detail: str | list[dict[str, Any]],
    headers: Mapping[str, str] | None = None,
    summary: str | None = None,
) -> JSONResponse:
    """An error answer; its summary is kept on the request for the rejection log."""
    request.state.error = summary or (detail if isinstance(detail, str) else _PHRASES[status])
    return JSONResponse({"detail": detail}, status_code=status, headers=dict(headers or {}))


def _validation_error(request: Request, exc: ValidationError) -> JSONResponse:
    # No `input` (it could echo a whole oversized batch) and no `ctx` (may hold exceptions).
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    invalid_json = next((e for e in errors if e["type"] == "json_invalid"), None)
    if invalid_json is not None:
        return _error(request, 400, f"malformed JSON: {invalid_json['msg']}")
    return _invalid(request, errors)


def _invalid(request: Request, errors: list[Any]) -> JSONResponse:
    """422 with each error's path from ``body`` (pydantic's error dicts)."""
    detail = [
        {"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"]}
        for e in errors[:MAX_ERRORS_SHOWN]
    ]
    if len(errors) > MAX_ERRORS_SHOWN:
        detail.append(
            {
                "type": "too_many_errors",
                "loc": ["body"],
                "msg": f"{len(errors) - MAX_ERRORS_SHOWN} more errors not shown",
            }
        )
    summary = "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in detail[:5])
    return _error(request, 422, detail, summary=summary)


def _json_safe(value: Any) -> Any:
    """Manifests may hold NaN metrics (valid to Python's json, not to strict JSON): null them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


SCORING_THREADS = 4
# Large batches are scored on these long-lived threads (``Booster.predict`` releases the GIL);
# the pool starts them on first use. Not Starlette's ``run_in_threadpool``: AnyIO stops its
# worker thread when the "root task" ends, and in an event loop run with ``run_forever`` (a Ray
# Serve replica's) that is the request's own task. A replica then started a new thread for
# every large request, and LightGBM's OpenMP a new thread team with it (measured: 469 threads
# created in 4 s at one client).
SCORING_POOL = ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="mlops-score")


def _scoring_pool_after_fork() -> None:
    # A forked child has none of the parent's threads, but a pool that started some believes
    # it still has them: a batch submitted in the child would wait forever.
    global SCORING_POOL
    SCORING_POOL = ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="mlops-score")


os.register_at_fork(after_in_child=_scoring_pool_after_fork)


async def default_scorer(predictor: Predictor, bookings: Bookings) -> np.ndarray:
    """Small batches inline, large ones on a scoring thread.

    Measured here: the hop to a worker thread adds ~2 ms to a one-record request (more than
    the scoring blocks the loop), while a large batch on LightGBM holds the loop for ~10 ms, so
    it goes to a thread and the loop keeps reading requests and answering health checks. Once
    the compiled trees score (three times faster, see :mod:`~mlops_assets.serve.compiled`),
    batches up to ``INLINE_COMPILED_MAX_RECORDS`` stay on the loop too: the hop back to the
    loop, waiting for the GIL behind busy threads, costs more than it saves.
    """
    inline = INLINE_COMPILED_MAX_RECORDS if predictor.trees_compiled else INLINE_MAX_RECORDS
    if bookings.n <= inline:
        return predictor.score(bookings)
    return await asyncio.get_running_loop().run_in_executor(SCORING_POOL, predictor.score, bookings)


_OPEN = b'{"delay_probability":'
_THEN = np.array([b',"delayed":false},' + _OPEN, b',"delayed":true},' + _OPEN], dtype=object)
_LAST = (b',"delayed":false}', b',"delayed":true}')
# Up to this many predictions a dict per prediction is cheaper than the byte splice below.
_DICTS_MAX = 16


def _answer(model_version: str, probabilities: np.ndarray, delayed: np.ndarray) -> bytes:
    """The ``PredictResponse`` body: the bytes ``orjson.dumps`` gives for its dict form.

    For many predictions the numbers are written by orjson in one call on the numpy column
    and spliced between constant byte strings (~0.1 ms for 1,000 instead of ~0.3 ms building a
    dict per prediction, on the event loop of a replica bound by its one GIL).
    """
    if len(probabilities) <= _DICTS_MAX:
        return orjson.dumps(
            {
                "model_version": model_version,
                "predictions": [
                    {"delay_probability": p, "delayed": d}
                    for p, d in zip(probabilities.tolist(), delayed.tolist(), strict=True)
                ],
            }
        )
    if len(probabilities) != len(delayed):
        raise ValueError(f"{len(probabilities)} probabilities but {len(delayed)} decisions")
    numbers = orjson.dumps(
        np.ascontiguousarray(probabilities, dtype=np.float64), option=orjson.OPT_SERIALIZE_NUMPY
    )[1:-1].split(b",")  # a float's JSON has no comma
    parts: list[bytes] = [b""] * (2 * len(numbers))
    parts[0::2] = numbers
    parts[1::2] = _THEN[np.asarray(delayed, dtype=np.intp)].tolist()
    parts[-1] = _LAST[bool(delayed[-1])]
    head = b'{"model_version":' + orjson.dumps(model_version) + b',"predictions":['
    return head + _OPEN + b"".join(parts) + b"]}"


async def _drain(request: Request, limit: int) -> None:
    if request.headers.get("expect", "").lower() == "100-continue":
        return  # the client waits for our go-ahead: it will read the 413 without sending
    drained = 0
    try:
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > limit:
                break
    except Exception:  # the client went away: nothing left to protect
        return


def build_app(
    get_predictor: Callable[[], Predictor | None],
    *,
    max_records: int = DEFAULT_MAX_RECORDS,
    max_body_bytes: int = 1_000_000,
    api_token: str | None = None,
    log_sink: PredictionLog | None = None,
    metrics: ServeMetrics | None = None,
    scorer: Scorer = default_scorer,
    echo_request_id: bool = True,
) -> FastAPI:
    """The serving app. ``get_predictor`` returns the model to use now (None: not loaded yet).

    An empty ``api_token`` counts as unset. Pass ``metrics`` to keep counters across rebuilds.
    ``scorer`` scores one request's validated records with the predictor the request was
    tagged with; a Ray Serve replica can pass one that goes through a ``@serve.batch`` method.
    ``echo_request_id=False`` leaves the ``X-Request-ID`` response header to a server in front
    that already sets it (Ray Serve's proxy echoes the id it put in the request headers, which is
    the id read and logged here), so a response never carries two.
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    request_model = predict_request_model(max_records)
    parsing_model = parsing_request_model(max_records)
    token = api_token.encode("utf-8") if api_token else None
    metrics = metrics or ServeMetrics()

    app = FastAPI(
        title="Flight delay predictions",
        summary="Will this flight arrive more than 15 minutes late? (mlops-assets)",
        description=(
            f"Up to {max_records} flights per call, answered in request order. Bad input gets a "
            "4xx with the path of each error. "
            + ("`/predict` and `/model` need `Authorization: Bearer <token>`." if token else "")
        ),
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        log_sink=log_sink,
        echo_request_id=echo_request_id,
    )

    def authorize(request: Request) -> JSONResponse | None:
        if token is None:
            return None
        header = request.headers.get("authorization")
        scheme, _, credentials = (header or "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the token matched.
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode("utf-8"), token
        ):
            return None
        return _error(
            request,
            401,
            "missing bearer token" if header is None else "invalid bearer token",
            {"WWW-Authenticate": 'Bearer realm="mlops"'},
        )

    async def read_body(request: Request) -> tuple[str, bytes] | JSONResponse:
        """The body and its kind (``json`` or ``arrow``), or the error answer."""
        content_type = request.headers.get("content-type", "")
        media = content_type.partition(";")[0].strip().lower()
        if media == ARROW_MEDIA_TYPE:
            kind = "arrow"
        elif media == "application/json" or (
            media.startswith("application/") and media.endswith("+json")
        ):
            kind = "json"
        else:
            return _error(
                request,
                415,
                f"send the body as application/json (or {ARROW_MEDIA_TYPE}), "
                f"not {media or 'an undeclared type'}",
            )
        too_large = f"the body is larger than {max_body_bytes} bytes"
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _error(request, 400, "invalid Content-Length header")
            if int(declared) > max_body_bytes:
                await _drain(request, DRAIN_LIMIT_BYTES)
                return _error(request, 413, too_large)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    await _drain(request, DRAIN_LIMIT_BYTES)
                    return _error(request, 413, too_large)
                chunks.append(chunk)
        except ClientDisconnect:
            return _error(request, 400, "the client disconnected before sending the whole body")
        return kind, b"".join(chunks)

    def parse(request: Request, kind: str, body: bytes) -> Bookings | JSONResponse:
        """Validated records as columns, or the 400/422 answer."""
        if kind == "json":
            try:  # the fast parse, then the two calendar rules on the columns
                bookings = Bookings.from_models(parsing_model.model_validate_json(body).flights)
                if not impossible_calendar_rows(bookings):
                    return bookings
            except ValidationError:
                pass
            try:  # invalid: the full model gives every error, in order, with its path
                batch = request_model.model_validate_json(body)
            except ValidationError as exc:
                return _validation_error(request, exc)
            return Bookings.from_models(batch.flights)  # not reached while the models agree
        try:
            frame = read_arrow(body)
        except ArrowBodyError as exc:
            return _error(request, 400, str(exc))
        bookings, errors = validate_frame(frame, max_records)
        return _invalid(request, errors) if bookings is None else bookings

    def version_headers(predictor: Predictor) -> dict[str, str]:
        return {MODEL_VERSION_HEADER: predictor.version}

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        summary="Delay probability for each flight, in request order",
    )
    async def predict(request: Request) -> Response:
        denied = authorize(request)
        if denied is not None:
            return denied
        body = await read_body(request)
        if isinstance(body, Response):
            return body
        bookings = parse(request, *body)
        if isinstance(bookings, Response):
            return bookings
        predictor = get_predictor()
        if predictor is None:
            return _error(
                request, 503, "no model is loaded yet; retry shortly", {"Retry-After": "5"}
            )
        request.state.model_version = predictor.version
        scoring_started = time.perf_counter()
        try:
            probabilities = await scorer(predictor, bookings)
            if len(probabilities) != bookings.n:
                raise RuntimeError(f"{len(probabilities)} predictions for {bookings.n} records")
        except Exception:
            log.exception(
                "model %s failed on request %s", predictor.version, request.state.request_id
            )
            return _error(
                request, 500, "the model failed to score this request", version_headers(predictor)
            )
        finished = time.perf_counter()
        metrics.observe_batch(predictor.version, bookings.n, finished - scoring_started)
        delayed = probabilities >= predictor.threshold
        if log_sink is not None:
            try:
                log_sink.log_predictions(
                    request_id=request.state.request_id,
                    model_version=predictor.version,
                    inputs=bookings,
                    probabilities=probabilities,
                    delayed=delayed,
                    latency_ms=(finished - request.state.started) * 1000,
                )
            except Exception:
                # Fail closed: an answer the monitor stage never sees would silently bias it.
                log.exception(
                    "prediction log write failed for request %s", request.state.request_id
                )
                return _error(
                    request,
                    503,
                    "the prediction log is unavailable; retry shortly",
                    version_headers(predictor),
                )
        return Response(
            _answer(predictor.version, probabilities, delayed),
            media_type="application/json",
            headers=version_headers(predictor),
        )

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "description": "No model loaded"}},
        summary="Liveness and the model version being served",
    )
    async def healthz() -> Response:
        predictor = get_predictor()
        if predictor is None:
            return JSONResponse({"status": "unavailable", "model_version": None}, status_code=503)
        return JSONResponse(
            {"status": "ok", "model_version": predictor.version}, headers=version_headers(predictor)
        )

    @app.get(
        "/model",
        responses={k: ERROR_RESPONSES[k] for k in (401, 503)},
        summary="The served model's manifest: version, metrics, lineage, feature schema",
    )
    async def model(request: Request) -> Response:
        denied = authorize(request)
        if denied is not None:
            return denied
        predictor = get_predictor()
        if predictor is None:
            return _error(request, 503, "no model is loaded yet")
        described = predictor.describe()
        described["serving"]["max_records"] = max_records
        return JSONResponse(_json_safe(described), headers=version_headers(predictor))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    def openapi() -> dict[str, Any]:
        # The body is parsed by hand, so its schema is attached here, under the usual names.
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            body = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["PredictRequest"] = body
            schema["paths"]["/predict"]["post"]["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
                    ARROW_MEDIA_TYPE: {
                        "schema": {
                            "type": "string",
                            "format": "binary",
                            "description": (
                                "The same flights as an Arrow IPC stream: one column per "
                                "FlightRecord field (weather and tailnum optional), one row per "
                                "flight, checked with FlightRecord's rules. Errors name the row "
                                "and field like the JSON format's; column errors name the column."
                            ),
                        }
                    },
                },
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
