"""Ray for the pipeline: a cluster at ``RAY_ADDRESS``, or the project's own local head.

``ray`` is imported only when a connection is made: most Dagster steps never need it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dagster as dg
from pydantic import Field

log = logging.getLogger(__name__)


class RayResource(dg.ConfigurableResource):
    """Where Ray work runs, and where Ray Serve listens.

    ``address`` empty (the default) means the local head this project starts and owns: state,
    lock and log under ``state_dir``, Ray's own files under ``temp_dir``; it is reused by later
    steps and runs, and stopped with ``mlops_assets.serve.ray_runtime.stop_local_ray`` (by PID,
    never ``ray stop``). Otherwise ``address`` is an existing cluster (``RAY_ADDRESS``), which
    this resource only joins.
    """

    address: str = Field(default="", description="Ray cluster address; empty: the local head")
    num_cpus: int = Field(default=2, description="CPUs the local head offers")
    state_dir: str = Field(description="state, lock and log of the local head")
    temp_dir: str = Field(default="", description="Ray temp dir for the local head (short)")
    http_host: str = Field(default="127.0.0.1", description="Serve HTTP proxy interface")
    http_port: int = Field(default=8000, description="Serve HTTP proxy port")
    api_token: str = Field(
        default="", description="bearer token the endpoint requires (MLOPS_API_TOKEN); empty: none"
    )
    direct_ingress: bool = Field(
        default=False,
        description="local head only: each serving replica also answers HTTP on its own port "
        "(Ray Serve direct ingress, no proxy hop); the proxy port keeps answering too",
    )
    direct_ingress_min_port: int = Field(
        default=30000, description="first port handed to a direct-ingress replica"
    )

    # On by default since session 12: +40-65 % req/s at 32 clients on direct ingress in an
    # alternating A/B (benchmarks/README.md, bench_serving), lower p50 at one client.
    throughput_optimized: bool = Field(
        default=True,
        description="local head only: Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED bundle (user "
        "code on the replica's event loop, gRPC between proxy and replica, buffered request "
        "logs, no log copies to stderr, GC frozen after start)",
    )

    def head_environment(self) -> dict[str, str]:
        """Feature flags the local head is started with (Ray reads them at process start)."""
        from mlops_assets.serve.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

        env: dict[str, str] = {
            # A request lost with a dying replica gets a retryable 503, not Ray's bare 500.
            PROXY_CALLBACK_ENV: PROXY_CALLBACK,
            # Ray starts its workers at nice 15 (below the raylet), so a serving replica got
            # the CPU only when nothing else wanted it: the client, a Dagster run or training
            # on the same cores took it first (direct ingress, 32 clients: 413 vs 798 req/s
            # between two rounds of one run). Serving is the latency-critical work here.
            "RAY_worker_niceness": "0",
        }
        if self.throughput_optimized:
            # The bundle also switches direct ingress on; it stays this resource's choice.
            env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
            env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1" if self.direct_ingress else "0"
        if not self.direct_ingress:
            return env
        return env | {
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(self.direct_ingress_min_port),
            # Ray's default range is 1000 ports wide; keep its width from our start.
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(self.direct_ingress_min_port + 1000),
        }

    @property
    def is_local(self) -> bool:
        return not self.address

    def ensure_connected(self) -> str:
        """Connect this process to Ray (starting the local head if needed); return the address."""
        import ray

        from mlops_assets.serve.ray_runtime import default_temp_dir, ray_environment

        if self.is_local:
            from mlops_assets.serve.ray_runtime import start_local_ray

            temp_dir = Path(self.temp_dir) if self.temp_dir else default_temp_dir(self.state_dir)
            address = start_local_ray(
                self.state_dir,
                num_cpus=self.num_cpus,
                temp_dir=temp_dir,
                extra_env=self.head_environment(),
            )
            # The driver must agree with the head on auth and temp dir (Ray reads the env).
            os.environ.update(ray_environment(temp_dir))
        else:
            address = self.address
        if ray.is_initialized():
            return address
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        log.info("connected to Ray at %s", address)
        return address

    def disconnect(self) -> None:
        """Leave the cluster (the cluster and Serve keep running)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
