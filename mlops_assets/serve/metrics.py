"""Prometheus metrics of the serving app, in a registry of its own.

Each app gets a private ``CollectorRegistry``: two apps in one process (tests, a swap that
builds a new app) never collide on metric names, and ``/metrics`` shows exactly this app's series.
Route labels are route templates (``/predict``), never raw paths, so a scanner probing random
URLs cannot blow up the number of series.

Several replicas: a scrape of ``/metrics`` reaches one replica, so per-process counters would
each show a part, changing from scrape to scrape. With ``multiprocess_dir`` (the Ray Serve
deployment sets it, with ``PROMETHEUS_MULTIPROC_DIR`` in each replica's environment, per app),
every replica writes its values to files there and any replica's ``/metrics`` renders all of
them: counters and histograms summed over the replicas (also those that have exited, so totals
never go backwards), ``model_loaded`` the max over live replicas. The files are on the replica's
node: on a multi-node cluster each node's replicas share one view (scrape each node, or use
direct ingress and scrape every replica's own port).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

PREFIX = "mlops_serve"
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class ServeMetrics:
    """The counters and histograms ``build_app`` updates, and their text exposition."""

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        if multiprocess_dir is not None:
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(multiprocess_dir):
                # prometheus_client picks file-backed values when it is imported, from this env.
                raise RuntimeError(
                    "multiprocess metrics need PROMETHEUS_MULTIPROC_DIR="
                    f"{multiprocess_dir} in the environment before prometheus_client is imported"
                )
            Path(multiprocess_dir).mkdir(parents=True, exist_ok=True)
            forget_dead_processes(multiprocess_dir)
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "Time from request to response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Requests answered with a 4xx or 5xx status, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.predictions = Counter(
            f"{PREFIX}_predictions",
            "Records scored, by model version.",
            ["model_version"],
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Records per scored request.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.predict_seconds = Histogram(
            f"{PREFIX}_predict_seconds",
            "Feature building and model scoring time per request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_loaded = Gauge(
            f"{PREFIX}_model_loaded",
            "1 for the model version last seen serving.",
            ["model_version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._current_version: str | None = None

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, str(status)).inc()

    def observe_batch(self, model_version: str, size: int, seconds: float) -> None:
        self.predictions.labels(model_version).inc(size)
        self.batch_size.observe(size)
        self.predict_seconds.observe(seconds)
        if model_version != self._current_version:
            # A swap: the old version's gauge drops to 0 so dashboards show one live model.
            if self._current_version is not None:
                self.model_loaded.labels(self._current_version).set(0)
            self.model_loaded.labels(model_version).set(1)
            self._current_version = model_version

    def render(self) -> tuple[bytes, str]:
        """The text exposition (of every replica sharing ``multiprocess_dir``) and its type."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess_dir)
        return generate_latest(merged), CONTENT_TYPE_LATEST


_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def forget_dead_processes(folder: str) -> list[int]:
    """Drop the live-gauge files of processes that no longer run (a killed replica's)."""
    dead = set()
    for entry in Path(folder).iterdir():
        match = _LIVE_FILE.match(entry.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, folder)
    return sorted(dead)
