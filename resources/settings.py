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
