"""A write that fails during a materialization: the asset fails with a clear message, the stored
partition stays readable and unchanged, no temporary file is left, and the catalog records no new
version.

Three real ways for a write to fail: the kernel refuses to grow a file past ``RLIMIT_FSIZE`` (a
full disk, as one process sees it: ``EFBIG``), the rename into place fails (``ENOSPC`` injected
into ``os.replace`` through the real write path), and a read-only table directory (``chmod``; as
root the permission bits do not apply, so that case is skipped there).
"""

from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import resource
import signal
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from mlops_assets.definitions import defs
from resources import default_resources
from resources import storage as storage_module
from resources.files import land_month
from tests.reliability.pipeline_harness import temp_files
from tests.test_pipeline import failure_message, materialize

MONTH = "2013-01"
FILE_SIZE_LIMIT = 16 * 1024  # bytes; a month of raw flights is ~1 MB of Parquet


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _materializations(instance: dg.DagsterInstance, key: str) -> int:
    return len(
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[MONTH]), limit=100
        ).records
    )


def _stored_first_version(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> tuple[Path, str, pl.DataFrame]:
    """raw_flights for the month materialized once; then a corrected export lands."""
    landed = land_month(MONTH, mlops_home / "landing")
    assert materialize(["raw_flights"], instance, resources, partition=MONTH).success
    stored = resources["warehouse"].path("raw_flights", MONTH)
    frame = pl.read_parquet(stored)
    # The next version differs (a corrected export with fewer rows), so "unchanged" means it.
    lines = landed.read_bytes().splitlines(keepends=True)
    landed.write_bytes(b"".join(lines[: len(lines) // 2]))
    return stored, _sha(stored), frame


def _assert_previous_version_intact(
    resources: dict[str, Any], stored: Path, sha: str, frame: pl.DataFrame
) -> None:
    assert _sha(stored) == sha
    assert resources["warehouse"].read("raw_flights", [MONTH]).equals(frame)
    with resources["warehouse"].connect() as con:
        assert con.execute("SELECT count(*) FROM raw_flights").fetchone()[0] == frame.height
    assert temp_files(stored.parent) == []
    assert sorted(p.name for p in stored.parent.iterdir()) == [stored.name]


def _materialize_past_a_file_size_limit(home: str, month: str, limit: int) -> tuple[bool, str]:
    """In a fresh process: ``raw_flights`` with file growth capped at ``limit`` bytes."""
    os.environ["MLOPS_HOME"] = home
    # Without this the kernel kills the process (SIGXFSZ); ignored, write() fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    # The in-memory instance: only the warehouse write meets the limit.
    result = dg.materialize(
        list(defs.assets), selection=["raw_flights"], partition_key=month,
        resources=default_resources(), raise_on_error=False,
    )  # fmt: skip
    return result.success, "" if result.success else failure_message(result)


def test_a_full_disk_fails_the_write_and_keeps_the_stored_partition(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    stored, sha, frame = _stored_first_version(mlops_home, resources, instance)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        success, message = pool.apply(
            _materialize_past_a_file_size_limit, (str(mlops_home), MONTH, FILE_SIZE_LIMIT)
        )
    assert not success
    assert f"could not store table 'raw_flights' partition '{MONTH}'" in message
    assert "File too large" in message
    assert "the stored version, if any, is unchanged" in message
    _assert_previous_version_intact(resources, stored, sha, frame)


def test_a_failed_rename_fails_the_asset_and_keeps_the_stored_partition(
    mlops_home: Path,
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stored, sha, frame = _stored_first_version(mlops_home, resources, instance)
    real_replace = os.replace
    attempts: list[str] = []

    def full_disk(src: Any, dst: Any) -> None:
        if str(dst).endswith(".parquet"):
            attempts.append(str(dst))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(storage_module.os, "replace", full_disk)
    result = materialize(["raw_flights"], instance, resources, partition=MONTH)
    monkeypatch.undo()
    assert not result.success
    assert attempts == [str(stored)]
    message = failure_message(result)
    assert f"could not store table 'raw_flights' partition '{MONTH}' at {stored}" in message
    assert "No space left on device" in message
    _assert_previous_version_intact(resources, stored, sha, frame)
    assert _materializations(instance, "raw_flights") == 1  # no new version in the catalog
    # Space back: the same materialization succeeds and replaces the partition.
    assert materialize(["raw_flights"], instance, resources, partition=MONTH).success
    assert pl.read_parquet(stored).height < frame.height
    assert _materializations(instance, "raw_flights") == 2


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (see the other tests)")
def test_a_read_only_table_directory_fails_clearly_and_keeps_the_partition(
    mlops_home: Path, resources: dict[str, Any], instance: dg.DagsterInstance
) -> None:
    stored, sha, frame = _stored_first_version(mlops_home, resources, instance)
    stored.parent.chmod(0o555)
    try:
        result = materialize(["raw_flights"], instance, resources, partition=MONTH)
    finally:
        stored.parent.chmod(0o755)
    assert not result.success
    message = failure_message(result)
    assert f"could not store table 'raw_flights' partition '{MONTH}'" in message
    assert "Permission denied" in message
    _assert_previous_version_intact(resources, stored, sha, frame)
    assert _materializations(instance, "raw_flights") == 1
