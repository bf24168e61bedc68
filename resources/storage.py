"""Atomic file writes: a reader sees the old file or the new one, never half of either.

On the local disk: a temporary file and a rename. On an object store (a root given as a URL):
one PUT per object (see the object-store section below).
"""

from __future__ import annotations

import glob
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import polars as pl

if TYPE_CHECKING:
    from upath import UPath

StoragePath: TypeAlias = "Path | UPath"
"""Where a file lives: the local disk (``Path``) or an fsspec file system (``UPath``)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie, exited but not reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux) or it just exited: kill(0) said it was there
    return state not in ("Z", "X")


def remove_orphaned_temp_files(target: Path) -> list[Path]:
    """Delete temporary files of ``target`` left by writers that died (``kill -9``, OOM).

    A temporary file is named ``.<target>.<pid>.<random>.tmp``; one whose writer process no longer
    exists on this machine can never be renamed into place.
    """
    removed = []
    prefix = f".{target.name}."
    for tmp in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
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


def write_parquet_atomic(frame: pl.DataFrame, target: StoragePath) -> StoragePath:
    if not is_local(target):
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd", statistics=True)
        return put_object(buffer.getvalue(), target)
    with atomic_path(target) as tmp:
        frame.write_parquet(tmp, compression="zstd", statistics=True)
    return target


def write_bytes_atomic(data: bytes, target: StoragePath) -> StoragePath:
    if not is_local(target):
        return put_object(data, target)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def write_text_atomic(text: str, target: StoragePath) -> StoragePath:
    return write_bytes_atomic(text.encode("utf-8"), target)


# -- object stores (fsspec / universal-pathlib) ------------------------------------------------
#
# A root given as a URL (``s3://bucket/prefix``, ``memory://...``, any fsspec protocol) is a
# ``UPath``; a plain path (or ``file://``) stays a ``pathlib.Path`` and everything above applies
# unchanged. An object store has no rename: an object is written with one PUT (``pipe_file``;
# s3fs switches to a multipart upload for large bodies), and S3 makes an object visible only
# once its upload completes, so a reader still sees the old object or the new one, never a part.
# Credentials and the endpoint come from the environment, read by the fsspec backend itself
# (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_ENDPOINT_URL`` for s3fs).

_LOCAL_SCHEMES = ("", "file", "local")
# s3fs caches directory listings for the life of the process by default: a long-lived process
# would never see versions or partitions another process wrote. Listings are always re-read.
# (Only s3fs is tested here; other backends keep their own defaults.)
_NO_LISTINGS_CACHE = {"s3", "s3a"}


def url_scheme(location: str | os.PathLike[str]) -> str:
    text = str(location)
    return text.split("://", 1)[0].lower() if "://" in text else ""


def is_url(location: str | os.PathLike[str]) -> bool:
    """True for a location on an fsspec file system other than the local disk."""
    return url_scheme(location) not in _LOCAL_SCHEMES


def is_local(path: StoragePath) -> bool:
    return isinstance(path, Path)


def storage_path(location: str | os.PathLike[str]) -> StoragePath:
    """``location`` as a ``pathlib.Path`` when it is on the local disk, else as a ``UPath``."""
    if hasattr(location, "fs") and not isinstance(location, Path):  # already a UPath
        return location  # type: ignore[return-value]
    text = str(location)
    if not is_url(text):
        return Path(text.removeprefix("file://")) if url_scheme(text) else Path(text)
    from upath import UPath

    options = {"use_listings_cache": False} if url_scheme(text) in _NO_LISTINGS_CACHE else {}
    return UPath(text, **options)


def absolute_location(location: str) -> str:
    """A URL as it is; a local path made absolute (for processes with another working dir)."""
    return location if is_url(location) else str(Path(location).resolve())


def put_object(data: bytes, target: StoragePath) -> StoragePath:
    """Write one object with a single PUT (no temporary object, no rename on object stores)."""
    target.fs.pipe_file(target.path, data)  # type: ignore[union-attr]
    return target


def read_parquet(path: StoragePath) -> pl.DataFrame:
    """One Parquet file from the local disk or an object store."""
    if is_local(path):
        return pl.read_parquet(path)
    return pl.read_parquet(io.BytesIO(path.read_bytes()))
