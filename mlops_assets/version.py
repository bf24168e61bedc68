"""The code version recorded in every model manifest."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@cache
def code_version() -> str:
    """Package version plus a hash of the pipeline's source files (no git needed)."""
    digest = hashlib.sha256()
    for folder in ("mlops_assets", "resources"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    try:
        package = version("mlops-assets")
    except PackageNotFoundError:
        package = "0+unknown"
    return f"{package}+src.{digest.hexdigest()[:12]}"
