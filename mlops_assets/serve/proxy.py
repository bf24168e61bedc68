"""ASGI middleware for Ray Serve's HTTP proxy: a request lost with its replica gets a 503.

When a replica dies while it holds a request (``kill -9``, OOM, a node lost), Ray Serve's proxy
sends nothing for that request and the HTTP server under it fills in a bare ``500 Internal
Server Error``: to a client that is indistinguishable from the model failing, so nothing
retries it. Every request the app itself handles gets an answer from the app (its middleware
turns even an unexpected error into a JSON 500 with a request id), so a request that comes back
from the proxy with no answer at all was lost in Ray, not refused by the app: it is answered
``503`` with ``Retry-After``, the standard "unavailable, try again" that clients and balancers
retry (and Serve meanwhile routes to the surviving replicas and replaces the dead one).

Ray reads the middleware list in the proxy process from
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (set for the project's local head by
``RayResource.head_environment``; on another cluster, set it in the cluster's environment).
Imported by the proxy at start: keep this module free of heavy imports.
"""

from __future__ import annotations

import json

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "mlops_assets.serve.proxy.proxy_middlewares"
RETRY_AFTER_SECONDS = 1


class UnansweredAs503:
    """Answer 503 + ``Retry-After`` for an HTTP request the wrapped app returned no response to."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, receive, tracking_send)
        if started:
            return
        body = json.dumps(
            {"detail": "the request was lost with its serving replica; retry shortly"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def proxy_middlewares() -> list[Middleware]:
    """The proxy callback Ray Serve calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(UnansweredAs503)]
