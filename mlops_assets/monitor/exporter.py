"""Prometheus exporter of the monitor stage: the drift the Dagster assets measured.

Serving exports its own metrics (``/metrics`` of the model endpoint); drift is measured by the
``flight_drift`` (per landed month) and ``live_traffic_drift`` (per day of requests) assets and
kept in their materialization metadata. This exporter reads that metadata from the Dagster
instance on every scrape (nothing is cached, so it never disagrees with the UI) and exposes:

- ``mlops_monitor_drift_share{asset, partition, weighting}``: the latest measured drifted share
  of each partition, ``weighting="importance"`` (the retrain signal) and ``"plain"``;
- ``mlops_monitor_drift_threshold{asset}``: the ``max_drift_share`` the check used last;
- ``mlops_monitor_up``: 1 when the instance could be read, else 0 (the scrape still answers).

Run: ``python -m mlops_assets.monitor.exporter --host 127.0.0.1 --port 9101`` (DAGSTER_HOME).
"""

import argparse
import logging
import signal
import threading
from collections.abc import Iterator, Sequence

import dagster as dg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DRIFT_ASSETS = ("flight_drift", "live_traffic_drift")
PREFIX = "mlops_monitor"
# Enough for years of monthly and daily partitions, each re-measured a few times.
MAX_EVENTS = 5000


class MonitorCollector(Collector):
    """Drift shares from the latest materialization of each partition of the drift assets."""

    def __init__(self, instance: dg.DagsterInstance, assets: Sequence[str] = DRIFT_ASSETS) -> None:
        self.instance = instance
        self.assets = tuple(assets)

    def describe(self) -> list[Metric]:
        return list(self._families())

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                f"{PREFIX}_drift_share",
                "Drifted share of the features, latest measurement of each partition.",
                labels=["asset", "partition", "weighting"],
            ),
            GaugeMetricFamily(
                f"{PREFIX}_drift_threshold",
                "max_drift_share the drift check used in its latest measurement.",
                labels=["asset"],
            ),
            GaugeMetricFamily(f"{PREFIX}_up", "1 when the Dagster instance could be read."),
        )

    def collect(self) -> Iterator[Metric]:
        share, threshold, up = self._families()
        try:
            for asset in self.assets:
                self._collect_asset(asset, share, threshold)
        except Exception:
            log.exception("could not read drift measurements from the Dagster instance")
            share, threshold, _ = self._families()  # no partial answers
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield from (share, threshold, up)

    def _collect_asset(
        self, asset: str, share: GaugeMetricFamily, threshold: GaugeMetricFamily
    ) -> None:
        records = self.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset)), limit=MAX_EVENTS, ascending=False
        ).records
        seen: set[str] = set()
        latest_threshold: float | None = None
        for record in records:  # newest first
            materialization = record.asset_materialization
            if materialization is None:
                continue
            metadata = materialization.metadata
            if latest_threshold is None and "max_drift_share" in metadata:
                latest_threshold = float(metadata["max_drift_share"].value)  # type: ignore[arg-type]
            partition = materialization.partition or ""
            if partition in seen or "weighted_drift_share" not in metadata:
                continue  # an older measurement, or a skipped one (no champion, no traffic)
            seen.add(partition)
            for weighting, key in (
                ("importance", "weighted_drift_share"),
                ("plain", "drift_share"),
            ):
                if key in metadata:
                    share.add_metric([asset, partition, weighting], float(metadata[key].value))  # type: ignore[arg-type]
        if latest_threshold is not None:
            threshold.add_metric([asset], latest_threshold)


def build_registry(instance: dg.DagsterInstance) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MonitorCollector(instance))
    return registry


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=9101, help="port of /metrics")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with dg.DagsterInstance.get() as instance:
        server, thread = start_http_server(
            args.port, addr=args.host, registry=build_registry(instance)
        )
        log.info("monitor metrics on http://%s:%d/metrics", args.host, args.port)
        stop.wait()
        server.shutdown()
        thread.join(timeout=5)


if __name__ == "__main__":
    main()
