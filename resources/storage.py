"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_temp_files(target: Path) -> list[Path]:
    """Delete temporary files of ``target`` left by writers that died (``kill -9``, OOM).

    A temporary file is named ``.<target>.<pid>.<random>.tmp``; one whose writer process no longer
    exists on this machine can never be renamed into place.
    """
    removed = []
    prefix = f".{target.name}."
    for tmp in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temp_files(target)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet_atomic(frame: pl.DataFrame, target: Path) -> Path:
    with atomic_path(target) as tmp:
        frame.write_parquet(tmp, compression="zstd", statistics=True)
    return target


def write_bytes_atomic(data: bytes, target: Path) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def write_text_atomic(text: str, target: Path) -> Path:
    return write_bytes_atomic(text.encode("utf-8"), target)
