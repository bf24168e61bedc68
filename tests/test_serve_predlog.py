"""The prediction log: per-process JSON-lines segments, rotation, and a crash-tolerant reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from mlops_assets.serve.predlog import (
    FRAME_SCHEMA,
    PredictionLog,
    prediction_log_segments,
    read_prediction_log,
)

RECORD: dict[str, Any] = {
    "year": 2013, "month": 1, "day": 14, "sched_dep_time": 830, "sched_arr_time": 1105,
    "carrier": "UA", "flight": 1545, "tailnum": None, "origin": "EWR", "dest": "IAH",
    "distance": 1400.0, "temp": 30.5,
}  # fmt: skip


def answer(log: PredictionLog, request_id: str, n: int = 1, version: str = "m0001") -> None:
    log.log_predictions(
        request_id=request_id,
        model_version=version,
        inputs=[{**RECORD, "flight": i + 1} for i in range(n)],
        probabilities=[0.25] * n,
        delayed=[False] * n,
        latency_ms=1.5,
    )


def test_lines_round_trip_to_a_flat_frame(tmp_path: Path) -> None:
    with PredictionLog(tmp_path) as log:
        answer(log, "r1", n=3)
        log.log_rejection(
            request_id="r2",
            status=422,
            error="flights.0.month: too big",
            latency_ms=0.4,
            model_version="m0001",
        )
        segment = log.path
    assert segment is not None
    assert segment.name.startswith("predlog-") and f"-{os.getpid()}-0001.jsonl" in segment.name
    frame = read_prediction_log(tmp_path)
    assert frame.schema == pl.Schema(FRAME_SCHEMA)
    assert frame["kind"].to_list() == ["prediction"] * 3 + ["rejection"]
    assert frame["flight"].to_list() == [1, 2, 3, None]
    assert frame["record_index"].to_list() == [0, 1, 2, None]
    assert frame["temp"].to_list()[:3] == [30.5] * 3 and frame["wind_dir"].null_count() == 4
    assert frame["status"].to_list() == [200, 200, 200, 422]
    assert frame["error"][3] == "flights.0.month: too big"
    assert frame["segment"].unique().to_list() == [segment.name]
    assert frame["time"].dtype == pl.Datetime("us", "UTC")
    # Every line is strict JSON (no NaN), one object per line.
    for line in segment.read_text().splitlines():
        assert isinstance(json.loads(line), dict)


def test_non_finite_numbers_are_written_as_null(tmp_path: Path) -> None:
    def strict(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    with PredictionLog(tmp_path) as log:
        log.log_predictions(
            request_id="nan",
            model_version="m0001",
            inputs=[{**RECORD, "temp": float("nan"), "dewp": float("-inf")}],
            probabilities=[float("nan")],
            delayed=[False],
            latency_ms=2.0,
        )
        segment = log.path
    assert segment is not None
    line = json.loads(segment.read_text(), parse_constant=strict)
    assert line["batch"]["temp"] == [None] and line["batch"]["dewp"] == [None]
    assert line["batch"]["delay_probability"] == [None]
    frame = read_prediction_log(tmp_path)
    assert frame["temp"].to_list() == [None] and frame["dewp"].to_list() == [None]


def test_segments_rotate_by_size_and_age(tmp_path: Path) -> None:
    with PredictionLog(tmp_path, max_bytes=1500) as log:
        for i in range(12):
            answer(log, f"r{i}", n=2)
    by_size = prediction_log_segments(tmp_path)
    assert len(by_size) > 3
    assert all(p.stat().st_size < 1500 + 2 * 700 for p in by_size)
    frame = read_prediction_log(tmp_path)
    assert frame.height == 24
    assert frame["request_id"].unique(maintain_order=True).to_list() == [f"r{i}" for i in range(12)]

    aged = tmp_path / "aged"
    with PredictionLog(aged, max_age_seconds=0.05) as log:
        answer(log, "a")
        time.sleep(0.1)
        answer(log, "b")
    assert len(prediction_log_segments(aged)) == 2


def test_a_partial_last_line_and_a_damaged_line_are_skipped(tmp_path: Path) -> None:
    with PredictionLog(tmp_path) as log:
        answer(log, "kept", n=2)
        segment = log.path
    assert segment is not None
    with open(segment, "ab") as handle:  # a writer killed in the middle of a line
        handle.write(b'{"kind":"prediction","request_id":"half","ti')
    frame = read_prediction_log(tmp_path)
    assert frame["request_id"].to_list() == ["kept", "kept"]

    lines = segment.read_bytes().split(b"\n")
    segment.write_bytes(lines[0] + b"\n" + b"{not json\n" + lines[1] + b"\n")
    frame = read_prediction_log(tmp_path)
    assert frame["request_id"].to_list() == ["kept", "kept"]


def test_segments_of_one_line_per_prediction_still_read(tmp_path: Path) -> None:
    """Segments written before 2026-11 hold one line per prediction; they read the same."""
    legacy = {"kind": "prediction", "request_id": "old", "time": "2026-10-01T12:00:00+00:00",
              "model_version": "m0001", "status": 200, "error": None, "latency_ms": 1.0,
              "delay_probability": 0.5, "delayed": True}  # fmt: skip
    lines = [{**legacy, "record_index": i, "inputs": {**RECORD, "flight": 7 + i}} for i in range(2)]
    old = tmp_path / "predlog-20261001T120000000000Z-host-1-0001.jsonl"
    old.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with PredictionLog(tmp_path) as log:
        answer(log, "new", n=2)
    frame = read_prediction_log(tmp_path)
    assert frame["request_id"].to_list() == ["old", "old", "new", "new"]
    assert frame["flight"].to_list() == [7, 8, 1, 2]
    assert frame["record_index"].to_list() == [0, 1, 0, 1]
    assert frame["delay_probability"].to_list() == [0.5, 0.5, 0.25, 0.25]
    assert frame["kind"].unique().to_list() == ["prediction"]


def test_an_empty_or_missing_folder_reads_as_an_empty_frame(tmp_path: Path) -> None:
    assert read_prediction_log(tmp_path / "nothing").schema == pl.Schema(FRAME_SCHEMA)
    assert read_prediction_log(tmp_path).height == 0


def test_threads_share_one_writer_and_never_interleave_lines(tmp_path: Path) -> None:
    with PredictionLog(tmp_path, max_bytes=20_000, fsync_interval_seconds=0.01) as log:

        def work(t: int) -> None:
            for i in range(40):
                answer(log, f"t{t}-{i}", n=3)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    frame = read_prediction_log(tmp_path)
    assert frame.height == 6 * 40 * 3
    counts = frame.group_by("request_id").agg(pl.col("record_index").sort())
    assert counts.height == 240
    assert all(r == [0, 1, 2] for r in counts["record_index"].to_list())


def test_each_process_writes_its_own_segments(tmp_path: Path) -> None:
    script = (
        "import sys; from mlops_assets.serve.predlog import PredictionLog\n"
        "with PredictionLog(sys.argv[1], fsync_interval_seconds=0) as log:\n"
        "    log.log_rejection(request_id=sys.argv[2], status=400, error='x', latency_ms=1)\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), f"p{i}"], cwd=Path(__file__).parents[1]
        )
        for i in range(2)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    with PredictionLog(tmp_path) as log:
        answer(log, "parent")
    segments = prediction_log_segments(tmp_path)
    pids = {p.name.rsplit("-", 2)[-2] for p in segments}
    assert len(segments) == 3 and len(pids) == 3 and str(os.getpid()) in pids
    assert sorted(read_prediction_log(tmp_path)["request_id"].to_list()) == ["p0", "p1", "parent"]


def test_misuse_is_refused(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, fsync_interval_seconds=0)
    with pytest.raises(ValueError, match="1 records but 2 probabilities"):
        log.log_predictions(
            request_id="x",
            model_version="m1",
            inputs=[RECORD],
            probabilities=[0.1, 0.2],
            delayed=[False, False],
            latency_ms=1,
        )
    answer(log, "ok")
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        answer(log, "late")
    with pytest.raises(ValueError, match="positive"):
        PredictionLog(tmp_path, max_bytes=0)
    assert read_prediction_log(tmp_path)["request_id"].to_list() == ["ok"]
