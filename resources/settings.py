"""The one place that decides where things live, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    home: Path

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def sources(self) -> Path:
        return self.home / "sources"

    @property
    def registry(self) -> Path:
        return self.home / "registry"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def prediction_log(self) -> Path:
        return self.logs / "predictions"


def mlops_paths() -> Paths:
    """Paths under ``MLOPS_HOME`` (default ``./.mlops``), made absolute."""
    return Paths(home=Path(os.environ.get("MLOPS_HOME", ".mlops")).expanduser().resolve())


def storage_roots() -> tuple[str, str]:
    """Where the warehouse and the registry live: under ``MLOPS_STORAGE_URL`` when it is set
    (an object store URL such as ``s3://bucket/prefix``, read through fsspec), else under
    ``MLOPS_HOME``.

    Local-only, whatever this says: landing files (the landing sensor scans a local directory),
    HTML/PNG reports, the prediction log written by the Serve replicas, the embedded SQLite
    reference database and the local Ray head all stay in ``MLOPS_HOME``.
    """
    url = os.environ.get("MLOPS_STORAGE_URL", "").strip().rstrip("/")
    if url:
        return f"{url}/warehouse", f"{url}/registry"
    paths = mlops_paths()
    return str(paths.warehouse), str(paths.registry)
