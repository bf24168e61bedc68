"""What every extraction returns: the rows and their integrity record."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl


class SourceError(RuntimeError):
    """A source could not deliver a usable table; the message says what and where."""


@dataclass(frozen=True)
class Extract:
    """Rows read from one source, with where they came from and a checksum of what was read."""

    frame: pl.DataFrame
    source: str
    checksum: str  # sha256 of the bytes read (file, API pages) or of the rows (SQL)

    @property
    def integrity(self) -> dict[str, object]:
        return {
            "rows": self.frame.height,
            "columns": self.frame.width,
            "sha256": self.checksum,
            "source": self.source,
        }


def sha256_bytes(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def frame_checksum(frame: pl.DataFrame) -> str:
    """Order-sensitive content hash of a frame, stable across processes."""
    row_hashes = frame.hash_rows(seed=0, seed_1=1, seed_2=2, seed_3=3)
    return sha256_bytes(",".join(frame.columns).encode(), row_hashes.to_numpy().tobytes())


def require_columns(frame: pl.DataFrame, required: list[str], source: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SourceError(f"{source}: missing column(s) {missing}; found {frame.columns}")
