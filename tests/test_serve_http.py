"""The serving HTTP contract, under a real uvicorn server on 127.0.0.1, with a real model.

The model is a small LightGBM trained through the project's own code on the real January data
(package files -> validation -> the feature function -> preprocessing -> ``train.model.fit``),
stored in a temporary registry and loaded back, hash-verified, with ``Predictor.from_registry``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import lightgbm as lgb
import numpy as np
import orjson
import polars as pl
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from realdata import valid_table

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import (
    BOOKING_COLUMNS,
    FEATURE_NAMES,
    FEATURES,
    LABEL,
    WEATHER_FIELDS,
    build_features,
)
from mlops_assets.serve import compiled, fastpath
from mlops_assets.serve.app import (
    INLINE_COMPILED_MAX_RECORDS,
    INLINE_MAX_RECORDS,
    SCORING_THREADS,
    _answer,
    build_app,
    default_scorer,
)
from mlops_assets.serve.columnar import (
    ARROW_MEDIA_TYPE,
    INPUT_SCHEMA,
    RULES,
    Bookings,
    impossible_calendar_rows,
    to_arrow,
)
from mlops_assets.serve.predictor import Predictor, PredictorError, time_predict
from mlops_assets.serve.predlog import PredictionLog, read_prediction_log
from mlops_assets.serve.schema import FlightRecord, parsing_request_model, predict_request_model
from mlops_assets.train.model import Matrix, fit
from resources.registry import ModelIntegrityError, ModelRegistryResource

TOKEN = "s3cret-token"
MAX_RECORDS = 64


# -- fixtures: real data, a real model, a real server ---------------------------------------


@pytest.fixture(scope="module")
def tables() -> dict[str, pl.DataFrame]:
    return {
        "flights": valid_table("flights", 1),
        "weather": valid_table("weather"),
        "planes": valid_table("planes"),
    }


@pytest.fixture(scope="module")
def trained(
    tables: dict[str, pl.DataFrame], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    features = build_features(tables["flights"], tables["weather"], tables["planes"])
    labelled = features.filter(pl.col(LABEL).is_not_null())
    preprocessor = Preprocessor.fit(labelled)
    booster = fit(
        {"num_leaves": 15, "learning_rate": 0.1, "min_child_samples": 50},
        Matrix.from_features(labelled, preprocessor),
        30,
        seed=13,
        num_threads=2,
    )
    registry = ModelRegistryResource(root=str(tmp_path_factory.mktemp("registry")))
    manifest = registry.register(
        booster.model_to_string(),
        preprocessor.to_json(),
        {
            "params": {"num_leaves": 15, "num_boost_round": 30},
            "features": [{"name": f.name, "kind": f.kind} for f in FEATURES],
            "metrics": {"valid_auc": 0.7, "valid_log_loss": float("nan")},
            "training": {"months": {"train": ["2013-01"]}},
        },
    )
    return {"registry": registry, "version": manifest["version"], "preprocessor": preprocessor}


@pytest.fixture(scope="module")
def predictor(tables: dict[str, pl.DataFrame], trained: dict[str, Any]) -> Predictor:
    return Predictor.from_registry(
        trained["registry"], trained["version"], tables["planes"], tables["weather"]
    )


@contextmanager
def live(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("predlog")


@pytest.fixture(scope="module")
def server(predictor: Predictor, log_dir: Path) -> Iterator[str]:
    """The app as deployed: model loaded, prediction log on, no token."""
    with PredictionLog(log_dir) as sink:
        app = build_app(
            lambda: predictor, max_records=MAX_RECORDS, max_body_bytes=200_000, log_sink=sink
        )
        with live(app) as url:
            yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=20) as c:
        yield c


def booking_records(flights: pl.DataFrame) -> list[dict[str, Any]]:
    return flights.select(list(BOOKING_COLUMNS)).to_dicts()


GOOD: dict[str, Any] = {
    "year": 2013, "month": 1, "day": 14, "sched_dep_time": 830, "sched_arr_time": 1105,
    "carrier": "UA", "flight": 1545, "tailnum": "N14228", "origin": "EWR", "dest": "IAH",
    "distance": 1400.0,
}  # fmt: skip


# -- serving features and predictions are training's ----------------------------------------


def test_record_fields_are_exactly_the_booking_and_weather_columns() -> None:
    assert list(FlightRecord.model_fields) == [*BOOKING_COLUMNS, *WEATHER_FIELDS]


def test_serving_features_equal_training_features(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any], predictor: Predictor
) -> None:
    # Every 40th January flight: all carriers and origins, cancelled flights, unknown tails.
    flights = tables["flights"].gather_every(40)
    assert flights.get_column("tailnum").null_count() > 0
    training = build_features(flights, tables["weather"], tables["planes"])
    serving = predictor.features(booking_records(flights))
    assert serving.select(FEATURE_NAMES).equals(training.select(FEATURE_NAMES))
    assert serving.get_column("flight").equals(flights.get_column("flight"))
    assert training.get_column("temp").null_count() < training.height


def test_fast_path_inputs_are_the_training_matrix(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any], predictor: Predictor
) -> None:
    # Every January flight, the load-time sample (DST days, unknown codes and tails, weather
    # sent with the booking) and one record per weather override: what training would feed.
    assert predictor.fast_path_status.startswith("on, verified")
    records = booking_records(tables["flights"])
    records += fastpath.sample_records(tables["weather"], tables["planes"])
    records += [{**GOOD, w: 12.5} for w in WEATHER_FIELDS]
    flights = pl.DataFrame(records, schema=INPUT_SCHEMA)
    training = Matrix.from_features(
        build_features(flights, tables["weather"], tables["planes"]), trained["preprocessor"]
    ).x
    served = np.vstack(
        [predictor.matrix(records[i : i + 256]) for i in range(0, len(records), 256)]
    )
    assert served.shape == training.shape
    assert np.array_equal(served, training, equal_nan=True)
    assert predictor.probabilities(records[:200]).tolist() == (
        predictor.booster.predict(training[:200]).tolist()
    )


def test_fast_path_agrees_with_the_feature_function_past_2037(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any]
) -> None:
    """Local hours to UTC as polars computes them (its rules past 2037 differ from zoneinfo's),
    checked by the load-time comparison on DST days and spread-out hours of every year."""
    weather = tables["weather"]
    later = [
        weather.with_columns(pl.col("time_hour").dt.offset_by(f"{year - 2013}y"))
        for year in (2038, 2100)
    ]
    stored = trained["registry"].load(trained["version"])
    predictor = Predictor.from_stored(stored, tables["planes"], pl.concat([weather, *later]))
    assert predictor.fast_path_status.startswith("on, verified"), predictor.fast_path_status


def nudged(real: Any) -> Any:
    """``real`` off by one ulp on row 3: a difference any verification must catch."""

    def matrix(self: Any, bookings: Bookings) -> np.ndarray:
        x = real(self, bookings)
        x[3] = np.nextafter(x[3], np.inf)
        return x

    return matrix


def test_fast_path_that_differs_or_does_not_know_the_features_is_not_used(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = trained["registry"].load(trained["version"])
    records = booking_records(tables["flights"].head(5))
    expected = Predictor.from_stored(
        stored, tables["planes"], tables["weather"], fast_path=False
    ).probabilities(records)
    for way, method in (("rows", "rows_matrix"), ("columns", "columns_matrix")):
        monkeypatch.setattr(
            fastpath.FastMatrix, method, nudged(getattr(fastpath.FastMatrix, method))
        )
        skewed = Predictor.from_stored(stored, tables["planes"], tables["weather"])
        assert skewed.fast_path_status.startswith(f"off: its {way} path differs"), way
        assert "row(s) [3]" in skewed.fast_path_status
        assert skewed.probabilities(records).tolist() == expected.tolist()
        monkeypatch.undo()
    monkeypatch.setattr(fastpath, "KNOWN_FEATURES", ("dep_hour",))
    unknown = Predictor.from_stored(stored, tables["planes"], tables["weather"])
    assert unknown.fast_path_status.startswith("off: the feature list changed")
    assert unknown.describe()["serving"]["fast_path"] == unknown.fast_path_status
    assert unknown.probabilities(records).tolist() == expected.tolist()


def _own_predictor(tables: dict[str, pl.DataFrame], trained: dict[str, Any]) -> Predictor:
    """A predictor of the trained model apart from the shared fixture, for a test that changes
    it (compiles its trees, replaces a method)."""
    stored = trained["registry"].load(trained["version"])
    return Predictor.from_stored(stored, tables["planes"], tables["weather"])


def test_compiled_trees_score_every_january_flight_like_lightgbm(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = _own_predictor(tables, trained)
    bookings = Bookings.from_records(booking_records(tables["flights"]))
    reference = predictor.score(bookings)
    assert predictor.trees_status == "lightgbm: not compiled"
    status = predictor.compile_trees()
    assert status.startswith("compiled (lleaves"), status
    assert predictor.describe()["serving"]["trees"] == status

    def no_lightgbm(*args: Any, **kwargs: Any) -> np.ndarray:
        raise AssertionError("LightGBM scored although the compiled trees are verified")

    monkeypatch.setattr(predictor.booster, "predict", no_lightgbm)
    for n in (1, 8, bookings.n):  # one record, a micro-batch, all ~27k
        part = Bookings.from_records(booking_records(tables["flights"].head(n)))
        got = predictor.score(part)
        assert got.shape == (n,)
        assert np.max(np.abs(got - reference[:n])) <= compiled.TOLERANCE
        # the answers' yes/no is the same flight for flight
        assert np.array_equal(got >= predictor.threshold, reference[:n] >= predictor.threshold)


def test_compiled_trees_that_differ_or_do_not_compile_are_not_used(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = trained["registry"].load(trained["version"])
    records = booking_records(tables["flights"].head(300))
    # A real difference: the compiler is handed the model without its last tree.
    fewer = lgb.Booster(
        model_str=lgb.Booster(model_str=stored.model_text).model_to_string(num_iteration=29)
    )
    real_compile = compiled.CompiledTrees.compile.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        compiled.CompiledTrees,
        "compile",
        classmethod(lambda cls, booster: real_compile(cls, fewer)),
    )
    skewed = Predictor.from_stored(stored, tables["planes"], tables["weather"])
    status = skewed.compile_trees()
    assert status.startswith("lightgbm: compiled trees differ from LightGBM by"), status
    assert skewed.describe()["serving"]["trees"] == status
    assert skewed.probabilities(records).tolist() == (
        skewed.booster.predict(skewed.matrix(records)).tolist()
    )
    monkeypatch.undo()

    import lleaves

    def broken(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("LLVM is unavailable")

    monkeypatch.setattr(lleaves.Model, "compile", broken)
    failed = Predictor.from_stored(stored, tables["planes"], tables["weather"])
    assert failed.compile_trees() == (
        "lightgbm: the trees did not compile: RuntimeError: LLVM is unavailable"
    )
    assert failed.probabilities(records).tolist() == (
        failed.booster.predict(failed.matrix(records)).tolist()
    )


def test_compiled_trees_split_large_batches_with_one_helper_thread(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any]
) -> None:
    predictor = _own_predictor(tables, trained)
    trees = compiled.CompiledTrees.compile(predictor.booster)
    x = predictor.matrix(booking_records(tables["flights"].head(1001)))
    whole = trees.model.predict(x, n_jobs=1)  # type: ignore[attr-defined]
    calls: list[tuple[str, int]] = []
    real_predict = trees.model.predict  # type: ignore[attr-defined]

    def recording_predict(matrix: np.ndarray, n_jobs: int) -> np.ndarray:
        calls.append((threading.current_thread().name, len(matrix)))
        return real_predict(matrix, n_jobs=n_jobs)

    trees.model.predict = recording_predict  # type: ignore[attr-defined]
    split = compiled.SPLIT_MIN_ROWS
    for n in (1, split - 1, split, split + 1, 1001):
        calls.clear()
        got = trees.predict(x[:n])
        assert np.array_equal(got, whole[:n])  # row by row: the same bits, split or not
        if n < split:
            assert calls == [(threading.current_thread().name, n)]
        else:
            helper = [c for c in calls if c[0].startswith("mlops-trees")]
            assert sorted(calls) == sorted(
                [(threading.current_thread().name, n // 2), (helper[0][0], n - n // 2)]
            )


def _passes_in_a_forked_child(check: Callable[[], bool]) -> None:
    """Run ``check`` in a forked child; fail if it is false, raises or never returns."""
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when the check holds
        code = 1
        try:
            code = 0 if check() else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child never got its answer")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_forked_child_splits_compiled_predictions_too(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any]
) -> None:
    """After a fork the helper thread is gone: the child gets its own instead of waiting for
    ever on the parent's."""
    predictor = _own_predictor(tables, trained)
    trees = compiled.CompiledTrees.compile(predictor.booster)
    x = predictor.matrix(booking_records(tables["flights"].head(compiled.SPLIT_MIN_ROWS * 2)))
    expected = trees.predict(x)  # the parent's helper thread is running now
    _passes_in_a_forked_child(lambda: np.array_equal(trees.predict(x), expected))


def test_a_forked_child_scores_large_batches_on_its_own_pool(
    tables: dict[str, pl.DataFrame],
) -> None:
    """The scoring pool's threads do not survive a fork either: the child's large batches go
    to a new pool instead of waiting for ever on the parent's threads."""

    class Scorer:  # the pool is under test, not LightGBM (whose OpenMP a fork does not like)
        trees_compiled = False

        @staticmethod
        def score(bookings: Bookings) -> np.ndarray:
            assert threading.current_thread().name.startswith("mlops-score")
            return np.arange(bookings.n, dtype=np.float64)

    large = Bookings.from_records(booking_records(tables["flights"].head(INLINE_MAX_RECORDS + 1)))
    expected = np.arange(large.n, dtype=np.float64)
    scored = asyncio.run(default_scorer(Scorer(), large))  # type: ignore[arg-type]
    assert np.array_equal(scored, expected)  # the parent's pool has a thread now
    _passes_in_a_forked_child(
        lambda: np.array_equal(asyncio.run(default_scorer(Scorer(), large)), expected)  # type: ignore[arg-type]
    )


def test_background_work_runs_at_a_lower_priority() -> None:
    seen: dict[str, int] = {}
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def work() -> None:
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    compiled.in_background(work, "test-background").join(timeout=10)
    assert seen["nice"] == min(19, caller + 10)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller


def test_http_predictions_equal_booster_predict_on_training_features(
    tables: dict[str, pl.DataFrame],
    trained: dict[str, Any],
    predictor: Predictor,
    client: httpx.Client,
) -> None:
    flights = tables["flights"].gather_every(97)
    matrix = Matrix.from_features(
        build_features(flights, tables["weather"], tables["planes"]), trained["preprocessor"]
    )
    booster = lgb.Booster(model_str=trained["registry"].load(trained["version"]).model_text)
    expected = booster.predict(matrix.x)
    records = booking_records(flights)
    got: list[float] = []
    for start in range(0, len(records), MAX_RECORDS):
        response = client.post("/predict", json={"flights": records[start : start + MAX_RECORDS]})
        assert response.status_code == 200, response.text
        assert response.headers["x-model-version"] == trained["version"]
        body = response.json()
        assert body["model_version"] == trained["version"]
        got += [p["delay_probability"] for p in body["predictions"]]
        assert all(p["delayed"] == (p["delay_probability"] >= 0.5) for p in body["predictions"])
    # JSON floats round-trip exactly: the served numbers are the booster's, bit for bit.
    assert got == expected.tolist()
    assert 0.05 < float(np.mean(got)) < 0.6


def test_answers_come_back_in_request_order(
    tables: dict[str, pl.DataFrame], predictor: Predictor, client: httpx.Client
) -> None:
    records = booking_records(tables["flights"].sample(MAX_RECORDS, seed=3))
    first = client.post("/predict", json={"flights": records}).json()["predictions"]
    backwards = client.post("/predict", json={"flights": records[::-1]}).json()["predictions"]
    assert backwards == first[::-1]
    singles = [
        client.post("/predict", json={"flights": [r]}).json()["predictions"][0] for r in records[:5]
    ]
    assert singles == first[:5]
    assert [p.model_dump() for p in predictor.predict(records)] == first


def test_weather_sent_with_the_booking_wins_over_the_lookup(
    predictor: Predictor, client: httpx.Client
) -> None:
    looked_up = predictor.features([GOOD])
    sent = predictor.features([{**GOOD, "temp": -20.0, "visib": 0.25}])
    assert looked_up["temp"][0] != -20.0 and sent["temp"][0] == -20.0
    assert sent["visib"][0] == 0.25 and sent["dewp"][0] == looked_up["dewp"][0]
    response = client.post("/predict", json={"flights": [GOOD, {**GOOD, "temp": -20.0}]})
    assert response.status_code == 200


def test_concurrent_requests_get_their_own_answers(
    tables: dict[str, pl.DataFrame], predictor: Predictor, server: str
) -> None:
    records = booking_records(tables["flights"].sample(48, seed=11))
    expected = [p.delay_probability for p in predictor.predict(records)]
    results: dict[int, float] = {}
    failures: list[str] = []

    def worker(offset: int) -> None:
        with httpx.Client(base_url=server, timeout=20) as c:
            for i in range(offset, len(records), 8):
                response = c.post("/predict", json={"flights": [records[i]]})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    results[i] = response.json()["predictions"][0]["delay_probability"]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert [results[i] for i in range(len(records))] == expected


@pytest.mark.parametrize(
    "record",
    [
        pytest.param({**GOOD, "month": 3, "day": 10, "sched_dep_time": 230}, id="dst-gap-hour"),
        pytest.param({**GOOD, "year": 2031}, id="year-without-weather"),
        pytest.param({**GOOD, "carrier": "ZZ", "dest": "XYZ", "tailnum": None}, id="unseen"),
        pytest.param({k: v for k, v in GOOD.items() if k != "tailnum"}, id="no-tailnum"),
        pytest.param({**GOOD, **dict.fromkeys(WEATHER_FIELDS, None)}, id="weather-nulls"),
        pytest.param({**GOOD, "month": 2, "day": 29, "year": 2012}, id="leap-day"),
    ],
)
def test_valid_edge_records_are_answered(client: httpx.Client, record: dict[str, Any]) -> None:
    response = client.post("/predict", json={"flights": [record]})
    assert response.status_code == 200, response.text
    p = response.json()["predictions"][0]["delay_probability"]
    assert 0.0 <= p <= 1.0


# -- bad input: a clear 4xx, never a 5xx ----------------------------------------------------


def _body(flights: list[Any] | Any) -> bytes:
    return json.dumps({"flights": flights}).encode()


JSON = {"content-type": "application/json"}


def rec(**changes: Any) -> bytes:
    """A one-record batch: the good record with ``changes`` (None drops the field)."""
    record = {k: v for k, v in {**GOOD, **changes}.items() if v is not None or k not in changes}
    return _body([record])


def at(name: str, index: int = 0) -> list[Any]:
    return ["body", "flights", index, name]


DROP = None
BAD_PAYLOADS = [
    # (id, body, headers, expected status, expected path of the first error or None)
    ("truncated-json", b'{"flights": [', JSON, 400, None),
    ("empty-body", b"", JSON, 400, None),
    ("not-utf8", b"\xff\xfe\x00", JSON, 400, None),
    ("trailing-garbage", _body([GOOD]) + b" x", JSON, 400, None),
    ("single-quotes", b"{'flights': []}", JSON, 400, None),
    ("nested-too-deep", b"[" * 5000, JSON, 400, None),
    ("top-level-array", json.dumps([GOOD]).encode(), JSON, 422, ["body"]),
    ("no-flights-key", b"{}", JSON, 422, ["body", "flights"]),
    ("flights-not-a-list", json.dumps({"flights": GOOD}).encode(), JSON, 422, ["body", "flights"]),
    ("flights-null", b'{"flights": null}', JSON, 422, ["body", "flights"]),
    ("empty-batch", _body([]), JSON, 422, ["body", "flights"]),
    ("too-many-records", _body([GOOD] * (MAX_RECORDS + 1)), JSON, 422, ["body", "flights"]),
    ("unknown-top-level", _body([GOOD])[:-1] + b', "x": 1}', JSON, 422, ["body", "x"]),
    ("record-null", _body([None]), JSON, 422, ["body", "flights", 0]),
    ("post-departure-field", rec(dep_delay=3.0), JSON, 422, at("dep_delay")),
    ("missing-carrier", rec(carrier=DROP), JSON, 422, at("carrier")),
    ("month-13", rec(month=13), JSON, 422, at("month")),
    ("month-as-string", rec(month="1"), JSON, 422, at("month")),
    ("month-fractional", rec(month=1.5), JSON, 422, at("month")),
    ("year-bool", rec(year=True), JSON, 422, at("year")),
    ("feb-30", rec(month=2, day=30), JSON, 422, at("day")),
    ("day-0", rec(day=0), JSON, 422, at("day")),
    ("dep-time-75-minutes", rec(sched_dep_time=1275), JSON, 422, at("sched_dep_time")),
    ("arr-time-2400", rec(sched_arr_time=2400), JSON, 422, at("sched_arr_time")),
    ("dep-time-negative", rec(sched_dep_time=-5), JSON, 422, at("sched_dep_time")),
    ("carrier-one-char", rec(carrier="U"), JSON, 422, at("carrier")),
    ("carrier-lower-case", rec(carrier="ua"), JSON, 422, at("carrier")),
    ("carrier-fullwidth", rec(carrier="\uff35\uff21"), JSON, 422, at("carrier")),
    ("origin-lower-case", rec(origin="jfk"), JSON, 422, at("origin")),
    ("dest-too-long", rec(dest="TOOLONG"), JSON, 422, at("dest")),
    ("distance-zero", rec(distance=0), JSON, 422, at("distance")),
    ("distance-negative", rec(distance=-719.0), JSON, 422, at("distance")),
    ("distance-as-string", rec(distance="719"), JSON, 422, at("distance")),
    ("distance-nan", rec(distance=float("nan")), JSON, 422, at("distance")),
    ("temp-infinity", rec(temp=float("inf")), JSON, 422, at("temp")),
    ("temp-overflow", rec(temp=1.5).replace(b"1.5", b"-1e999"), JSON, 422, at("temp")),
    ("wind-dir-400", rec(wind_dir=400.0), JSON, 422, at("wind_dir")),
    ("tailnum-number", rec(tailnum=14228), JSON, 422, at("tailnum")),
    ("flight-zero", rec(flight=0), JSON, 422, at("flight")),
    ("flight-float", rec(flight=1e3), JSON, 422, at("flight")),
    ("second-record-bad", _body([GOOD, {**GOOD, "month": 0}]), JSON, 422, at("month", 1)),
    ("text-plain", _body([GOOD]), {"content-type": "text/plain"}, 415, None),
    ("form-encoded", b"flights=1", {"content-type": "application/x-www-form-urlencoded"}, 415,
     None),
    ("no-content-type", _body([GOOD]), {}, 415, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "loc"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_PAYLOADS],
)
def test_bad_payloads_get_a_clear_4xx(
    client: httpx.Client, body: bytes, headers: dict[str, str], status: int, loc: list[Any] | None
) -> None:
    response = client.post("/predict", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    assert "x-model-version" not in response.headers
    detail = response.json()["detail"]
    if loc is None:
        assert isinstance(detail, str) and detail
    else:
        assert detail[0]["loc"] == loc, detail
        assert all(e["msg"] and e["type"] for e in detail)
        assert all("input" not in e for e in detail)  # never echo the payload back


def test_the_fast_parsing_model_has_the_record_fields_and_constraints() -> None:
    """Valid bodies are parsed by a model without the Python validators: same fields else."""
    fast = parsing_request_model(MAX_RECORDS).model_json_schema()
    full = predict_request_model(MAX_RECORDS).model_json_schema()
    assert fast["properties"]["flights"] | {"items": None} == full["properties"]["flights"] | {
        "items": None
    }
    (fast_record,) = fast["$defs"].values()
    full_record = full["$defs"]["FlightRecord"]
    for key in ("properties", "required", "additionalProperties"):
        assert fast_record[key] == full_record[key], key


def test_bad_payloads_are_many_and_distinct() -> None:
    assert len(BAD_PAYLOADS) >= 25
    assert len({case[1] for case in BAD_PAYLOADS}) == len(BAD_PAYLOADS) - 1  # 415s share a body


# -- bulk requests as an Arrow IPC stream: the same rules, the same answers -----------------

ARROW = {"content-type": ARROW_MEDIA_TYPE}


def arrow(records: list[dict[str, Any]] | pl.DataFrame) -> bytes:
    return to_arrow(records)


@pytest.mark.parametrize(
    "flights",
    [
        pytest.param([{**GOOD, "month": 13}], id="month-13"),
        pytest.param([{**GOOD, "year": 1989}], id="year-1989"),
        pytest.param([{**GOOD, "month": 2, "day": 30}], id="feb-30"),
        pytest.param([{**GOOD, "month": 2, "day": 29, "year": 2100}], id="feb-29-2100"),
        pytest.param([{**GOOD, "day": 0}], id="day-0"),
        pytest.param([{**GOOD, "sched_dep_time": 1275}], id="dep-time-75-minutes"),
        pytest.param([{**GOOD, "sched_arr_time": 2400}], id="arr-time-2400"),
        pytest.param([{**GOOD, "sched_dep_time": -5}], id="dep-time-negative"),
        pytest.param([{**GOOD, "carrier": "ua"}], id="carrier-lower-case"),
        pytest.param([{**GOOD, "carrier": "\uff35\uff21"}], id="carrier-fullwidth"),
        pytest.param([{**GOOD, "origin": "jfk"}], id="origin-lower-case"),
        pytest.param([{**GOOD, "dest": "TOOLONG"}], id="dest-too-long"),
        pytest.param([{**GOOD, "tailnum": "n1"}], id="tailnum-lower-case"),
        pytest.param([{**GOOD, "tailnum": "N12\n"}], id="tailnum-trailing-newline"),
        pytest.param([{**GOOD, "tailnum": ""}], id="tailnum-empty"),
        pytest.param([{**GOOD, "carrier": "U"}], id="carrier-too-short"),
        pytest.param([GOOD, {**GOOD, "origin": None}], id="origin-null"),
        pytest.param([GOOD, GOOD, {**GOOD, "dest": "ÅRH"}], id="dest-non-ascii-third"),
        pytest.param([{**GOOD, "distance": 0.0}], id="distance-zero"),
        pytest.param([{**GOOD, "distance": float("nan")}], id="distance-nan"),
        pytest.param([{**GOOD, "temp": float("inf")}], id="temp-infinity"),
        pytest.param([{**GOOD, "wind_dir": 400.0}], id="wind-dir-400"),
        pytest.param([{**GOOD, "flight": 0}], id="flight-zero"),
        pytest.param([GOOD, {**GOOD, "month": 0}], id="second-record-bad"),
        pytest.param([{**GOOD, "month": 0, "day": 0, "carrier": "x"}], id="three-errors"),
        pytest.param([{**GOOD, "month": 0, "carrier": "x"}] * 30, id="errors-capped"),
    ],
)
def test_arrow_bodies_get_the_json_bodies_errors(
    client: httpx.Client, flights: list[dict[str, Any]]
) -> None:
    """Each invalid value: the same 422, paths, types and messages in both formats."""
    as_json = client.post("/predict", content=json.dumps({"flights": flights}), headers=JSON)
    as_arrow = client.post("/predict", content=arrow(flights), headers=ARROW)
    assert as_json.status_code == as_arrow.status_code == 422, as_arrow.text
    assert as_arrow.json()["detail"] == as_json.json()["detail"]


def test_the_arrow_screen_flags_exactly_what_flight_record_refuses() -> None:
    """The byte-level pattern check agrees with pydantic on every string, in any slice."""
    strings = [
        "AB", None, "N123", "n12", "A", "ABCDEFGH", "AB\n", "\nAB", "ÄB", "", "ZZ9", "A B", "AB7",
        "N12345", "N123456", "N1234567", "JFK", "ORD1", "ORD12", "ÅR",
    ]  # fmt: skip
    for field in ("carrier", "tailnum", "origin", "dest"):
        column = pl.Series(field, strings, dtype=pl.String)
        expected = []
        for value in strings:
            try:
                FlightRecord.model_validate({**GOOD, field: value}, strict=True)
                expected.append(False)
            except ValidationError:
                expected.append(True)
        assert RULES[field].broken(column).tolist() == expected, field
        assert RULES[field].broken(column.slice(3, 9)).tolist() == expected[3:12], field


@pytest.mark.parametrize(
    ("frame", "loc", "error_type"),
    [
        pytest.param(pl.DataFrame([{**GOOD, "month": "1"}]), "month", "int_type", id="month-str"),
        pytest.param(pl.DataFrame([{**GOOD, "year": True}]), "year", "int_type", id="year-bool"),
        pytest.param(pl.DataFrame([{**GOOD, "flight": 1e3}]), "flight", "int_type", id="flt-flt"),
        pytest.param(pl.DataFrame([{**GOOD, "tailnum": 14228}]), "tailnum", "str_type",
                     id="tailnum-int"),
        pytest.param(pl.DataFrame([{**GOOD, "distance": "719"}]), "distance", "float_type",
                     id="distance-str"),
        pytest.param(pl.DataFrame([{**GOOD, "dep_delay": 3.0}]), "dep_delay", "extra_forbidden",
                     id="post-departure-column"),
        pytest.param(pl.DataFrame([GOOD]).drop("carrier"), "carrier", "missing", id="no-carrier"),
    ],
)  # fmt: skip
def test_arrow_column_errors_name_the_column(
    client: httpx.Client, frame: pl.DataFrame, loc: str, error_type: str
) -> None:
    response = client.post("/predict", content=arrow(frame), headers=ARROW)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "flights", loc] and error["type"] == error_type
    assert loc in error["msg"] or error_type in ("missing", "extra_forbidden")


def test_arrow_batch_limits_and_damaged_streams(client: httpx.Client) -> None:
    empty = client.post("/predict", content=arrow(pl.DataFrame([GOOD]).clear()), headers=ARROW)
    assert empty.status_code == 422 and empty.json()["detail"][0]["type"] == "too_short"
    many = client.post("/predict", content=arrow([GOOD] * (MAX_RECORDS + 1)), headers=ARROW)
    assert many.status_code == 422
    assert many.json()["detail"][0]["loc"] == ["body", "flights"]
    assert many.json()["detail"][0]["type"] == "too_long"
    good = arrow([GOOD])
    for damaged in (b"", b"not arrow", good[: len(good) // 2], good[:-9] + b"\xff" * 9):
        response = client.post("/predict", content=damaged, headers=ARROW)
        assert response.status_code in (400, 422), (damaged[:20], response.text)
        if response.status_code == 400:
            assert "Arrow IPC stream" in response.json()["detail"]
    assert client.post("/predict", content=good, headers=ARROW).status_code == 200


def test_arrow_and_json_bodies_get_the_same_answers_and_log_lines(
    predictor: Predictor, tables: dict[str, pl.DataFrame], tmp_path: Path
) -> None:
    records = [
        *booking_records(tables["flights"].head(40)),
        {**GOOD, "month": 3, "day": 10, "sched_dep_time": 230, "tailnum": None},
        {**GOOD, "carrier": "ZZ", "dest": "XYZ", "temp": 80.5, "visib": 2.0},
        {**GOOD, "month": 2, "day": 29, "year": 2012, "wind_gust": 30.0},
    ]
    frame = pl.DataFrame(records, schema=INPUT_SCHEMA)  # weather mostly null
    with PredictionLog(tmp_path) as sink:
        app = build_app(lambda: predictor, log_sink=sink)
        with live(app) as url, httpx.Client(base_url=url) as c:
            as_json = c.post("/predict", json={"flights": records}, headers={"x-request-id": "j"})
            as_arrow = c.post(
                "/predict", content=arrow(frame), headers={**ARROW, "x-request-id": "a"}
            )
            # Integer weather and narrow integer types are accepted, as JSON accepts 30 for 30.0.
            narrow = frame.with_columns(pl.col("month").cast(pl.Int8), pl.col("temp").cast(
                pl.Int32, strict=False))  # fmt: skip
            as_narrow = c.post("/predict", content=arrow(narrow), headers=ARROW)
    assert as_json.status_code == as_arrow.status_code == as_narrow.status_code == 200
    assert as_arrow.json() == as_json.json()
    assert as_arrow.headers["x-model-version"] == predictor.version
    expected = [float(p) for p in predictor.probabilities(records)]
    assert [p["delay_probability"] for p in as_arrow.json()["predictions"]] == expected
    assert len(as_narrow.json()["predictions"]) == len(records)
    logged = read_prediction_log(tmp_path).filter(pl.col("kind") == "prediction")
    by_format = [
        logged.filter(pl.col("request_id") == rid).drop("segment", "request_id", "time",
                                                        "latency_ms")
        for rid in ("j", "a")
    ]  # fmt: skip
    assert by_format[0].height == len(records)
    assert by_format[0].equals(by_format[1])


def test_too_many_records_error_does_not_echo_the_batch(client: httpx.Client) -> None:
    response = client.post("/predict", json={"flights": [GOOD] * (MAX_RECORDS * 4)})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["type"] == "too_long" and str(MAX_RECORDS) in error["msg"]
    assert len(response.content) < 500


def test_many_errors_are_capped(client: httpx.Client) -> None:
    bad = {**GOOD, "month": 0, "day": 0, "carrier": "x", "origin": "x", "dest": "x"}
    response = client.post("/predict", json={"flights": [bad] * MAX_RECORDS})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 51 and detail[-1]["type"] == "too_many_errors"


def test_oversized_bodies_get_413_by_length_and_by_streamed_size(client: httpx.Client) -> None:
    huge = b'{"flights": [' + b" " * 2_000_000 + b"]}"
    by_length = client.post("/predict", content=huge, headers=JSON)
    assert by_length.status_code == 413, by_length.text
    assert "200000 bytes" in by_length.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"flights": ['
        for _ in range(40):
            yield b" " * 10_000

    streamed = client.post("/predict", content=chunks(), headers=JSON)
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413
    # The connection pool and the server are fine afterwards.
    assert client.post("/predict", json={"flights": [GOOD]}).status_code == 200


def test_expect_continue_gets_413_before_sending_the_body(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
        )
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head


def test_a_custom_scorer_scores_with_the_request_s_predictor(predictor: Predictor) -> None:
    seen: list[tuple[str, int]] = []

    async def scorer(p: Predictor, bookings: Bookings) -> np.ndarray:
        seen.append((p.version, bookings.n))
        return p.score(bookings)

    async def short(p: Predictor, bookings: Bookings) -> np.ndarray:
        return p.score(bookings)[:-1]

    with live(build_app(lambda: predictor, scorer=scorer)) as url, httpx.Client(base_url=url) as c:
        assert c.post("/predict", json={"flights": [GOOD] * 3}).status_code == 200
    assert seen == [(predictor.version, 3)]
    with live(build_app(lambda: predictor, scorer=short)) as url, httpx.Client(base_url=url) as c:
        assert c.post("/predict", json={"flights": [GOOD] * 3}).status_code == 500


def test_methods_routes_and_request_ids(client: httpx.Client) -> None:
    wrong_method = client.get("/predict")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["allow"]
    assert client.put("/healthz").status_code == 405
    assert client.get("/nope").status_code == 404
    mine = client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    hostile = client.get("/healthz", headers={"x-request-id": "a b\tc" + "x" * 300})
    assert (
        hostile.headers["x-request-id"] != "a b\tc" and len(hostile.headers["x-request-id"]) == 32
    )
    generated = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3


def test_healthz_model_and_openapi(
    client: httpx.Client, trained: dict[str, Any], predictor: Predictor
) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "model_version": trained["version"]}
    assert health.headers["x-model-version"] == trained["version"]
    model = client.get("/model").json()
    assert (
        model["version"] == trained["version"] and model["sha256"] == predictor.manifest["sha256"]
    )
    assert model["metrics"] == {"valid_auc": 0.7, "valid_log_loss": None}  # NaN made JSON-safe
    assert model["training"]["months"]["train"] == ["2013-01"]
    assert [f["name"] for f in model["features"]] == list(FEATURE_NAMES)
    assert model["serving"]["threshold"] == 0.5 and model["serving"]["max_records"] == MAX_RECORDS
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/healthz", "/model"} <= set(spec["paths"])
    request_schema = spec["components"]["schemas"]["PredictRequest"]
    assert request_schema["properties"]["flights"]["maxItems"] == MAX_RECORDS
    record = spec["components"]["schemas"]["FlightRecord"]
    assert record["additionalProperties"] is False and "carrier" in record["required"]
    assert set(spec["paths"]["/predict"]["post"]["responses"]) >= {"200", "400", "413", "422"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_no_model_means_503_and_bad_input_still_4xx() -> None:
    with live(build_app(lambda: None)) as url, httpx.Client(base_url=url) as c:
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["model_version"] is None
        predict = c.post("/predict", json={"flights": [GOOD]})
        assert predict.status_code == 503 and predict.headers["retry-after"] == "5"
        assert c.get("/model").status_code == 503
        assert c.post("/predict", json={"flights": [{**GOOD, "month": 13}]}).status_code == 422


def test_bearer_token_is_required_when_configured(predictor: Predictor) -> None:
    app = build_app(lambda: predictor, api_token=TOKEN)
    with live(app) as url, httpx.Client(base_url=url) as c:
        body = {"flights": [GOOD]}
        missing = c.post("/predict", json=body)
        assert missing.status_code == 401 and missing.json()["detail"] == "missing bearer token"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        for header in [
            f"Bearer {TOKEN}x",
            f"Basic {TOKEN}",
            TOKEN,
            "Bearer",
            f"Bearer {TOKEN[:-1]}",
        ]:
            wrong = c.post("/predict", json=body, headers={"authorization": header})
            assert wrong.status_code == 401, header
        assert c.get("/model").status_code == 401
        ok = c.post("/predict", json=body, headers={"authorization": f"bearer {TOKEN}"})
        assert ok.status_code == 200
        authorized = {"authorization": f"Bearer {TOKEN}"}
        assert c.get("/model", headers=authorized).status_code == 200
        # Probes, scrapers and the docs stay open.
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        # Unauthenticated callers learn nothing about their payload.
        assert c.post("/predict", content=b"{bad", headers=JSON).status_code == 401


def test_a_failing_model_is_a_500_with_a_request_id_not_a_crash(predictor: Predictor) -> None:
    class Broken(Predictor):
        def score(self, bookings: Any) -> Any:
            raise RuntimeError("boom")

    broken = Broken.from_stored(predictor_stored(predictor), predictor.planes, predictor.weather)
    with live(build_app(lambda: broken)) as url, httpx.Client(base_url=url) as c:
        response = c.post("/predict", json={"flights": [GOOD]})
        assert response.status_code == 500 and response.headers["x-request-id"]
        assert response.headers["x-model-version"] == predictor.version
        assert c.get("/healthz").status_code == 200


def predictor_stored(predictor: Predictor) -> Any:
    from resources.registry import StoredModel

    return StoredModel(
        predictor.version,
        predictor.booster.model_to_string(),
        predictor.preprocessor.to_json(),
        predictor.manifest,
    )


# -- the prediction log and the metrics -----------------------------------------------------


def test_prediction_log_has_a_line_per_prediction_and_per_rejection(
    predictor: Predictor, tmp_path: Path
) -> None:
    folder = tmp_path / "predlog"
    ids: dict[str, int] = {}
    with PredictionLog(folder) as sink:
        app = build_app(lambda: predictor, max_records=8, log_sink=sink)
        with live(app) as url, httpx.Client(base_url=url) as c:
            for n in (1, 3, 8):
                response = c.post(
                    "/predict", json={"flights": [GOOD] * n}, headers={"x-request-id": f"ok-{n}"}
                )
                assert response.status_code == 200
                ids[response.headers["x-request-id"]] = n
            rejected = [
                c.post("/predict", json={"flights": [{**GOOD, "month": 13}]}),
                c.post("/predict", content=b"{", headers=JSON),
                c.post("/predict", json={"flights": [GOOD] * 9}),
                c.get("/predict"),
            ]
            assert [r.status_code for r in rejected] == [422, 400, 422, 405]
            assert c.get("/healthz").status_code == 200  # not a prediction: not logged
    frame = read_prediction_log(folder)
    predictions = frame.filter(pl.col("kind") == "prediction")
    assert predictions.height == 1 + 3 + 8
    assert dict(predictions.group_by("request_id").len().iter_rows()) == ids
    assert predictions.get_column("model_version").unique().to_list() == [predictor.version]
    assert predictions.filter(pl.col("request_id") == "ok-3")["record_index"].to_list() == [0, 1, 2]
    assert predictions["carrier"].unique().to_list() == ["UA"]
    assert (predictions["latency_ms"] > 0).all() and predictions[
        "delay_probability"
    ].is_not_null().all()
    assert predictions["time"].dtype == pl.Datetime("us", "UTC")
    rejections = frame.filter(pl.col("kind") == "rejection")
    assert rejections["status"].to_list() == [422, 400, 422, 405]
    assert rejections["request_id"].to_list() == [r.headers["x-request-id"] for r in rejected]
    errors = rejections["error"].to_list()
    assert "flights.0.month" in errors[0] and errors[1].startswith("malformed JSON")
    assert "at most 8 items" in errors[2]
    assert rejections["year"].is_null().all()


def test_metrics_expose_requests_errors_predictions_and_batch_sizes(
    predictor: Predictor,
) -> None:
    with live(build_app(lambda: predictor)) as url, httpx.Client(base_url=url) as c:
        for n in (1, 2, 5):
            assert c.post("/predict", json={"flights": [GOOD] * n}).status_code == 200
        assert c.post("/predict", json={"flights": []}).status_code == 422
        c.get("/no-such-route")
        text = c.get("/metrics").text
    v = predictor.version
    assert 'mlops_serve_requests_total{method="POST",route="/predict",status="200"} 3.0' in text
    assert 'mlops_serve_errors_total{route="/predict",status="422"} 1.0' in text
    assert 'mlops_serve_errors_total{route="unmatched",status="404"} 1.0' in text
    assert f'mlops_serve_predictions_total{{model_version="{v}"}} 8.0' in text
    assert "mlops_serve_batch_size_count 3.0" in text
    assert 'mlops_serve_batch_size_bucket{le="4.0"} 2.0' in text
    assert 'mlops_serve_request_latency_seconds_count{route="/predict"} 4.0' in text
    assert f'mlops_serve_model_loaded{{model_version="{v}"}} 1.0' in text


# -- the predictor: verified loads, thresholds, smoke tests, latency ------------------------


def test_smoke_test_and_threshold_from_the_manifest(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any], predictor: Predictor
) -> None:
    smoke = predictor.smoke_test()
    assert 0.0 < smoke.delay_probability < 1.0
    stored = trained["registry"].load(trained["version"])
    strict = Predictor.from_stored(
        stored.__class__(
            stored.version,
            stored.model_text,
            stored.preprocessor_json,
            {**stored.manifest, "threshold": 0.01},
        ),
        tables["planes"],
        tables["weather"],
    )
    assert strict.threshold == 0.01 and strict.smoke_test().delayed
    for bad in (0, 1.5, "0.3", True):
        with pytest.raises(PredictorError, match="threshold"):
            Predictor.from_stored(
                stored.__class__(
                    stored.version,
                    stored.model_text,
                    stored.preprocessor_json,
                    {**stored.manifest, "threshold": bad},
                ),
                tables["planes"],
                tables["weather"],
            )


def test_a_tampered_or_mismatched_model_is_refused(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any], tmp_path: Path
) -> None:
    registry: ModelRegistryResource = trained["registry"]
    stored = registry.load(trained["version"])
    copy = ModelRegistryResource(root=str(tmp_path / "registry"))
    version = copy.register(stored.model_text, stored.preprocessor_json, {})["version"]
    model_file = tmp_path / "registry" / "models" / version / "model.txt"
    model_file.write_text(model_file.read_text().replace("learning_rate", "learning_rat3", 1))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Predictor.from_registry(copy, version, tables["planes"], tables["weather"])
    renamed = stored.model_text.replace("feature_names=dep_hour", "feature_names=hour", 1)
    with pytest.raises(PredictorError, match="trained on features"):
        Predictor.from_stored(
            stored.__class__(stored.version, renamed, stored.preprocessor_json, stored.manifest),
            tables["planes"],
            tables["weather"],
        )
    with pytest.raises(PredictorError, match="lacks column"):
        Predictor.from_stored(stored, tables["planes"], tables["weather"].drop("temp"))


def test_predict_latency(tables: dict[str, pl.DataFrame], predictor: Predictor) -> None:
    records = booking_records(tables["flights"].sample(256, seed=5))
    one = time_predict(predictor, records[:1])
    batch = time_predict(predictor, records, repeats=20)
    print(
        f"\npredict() 1 record: p50 {one['p50_ms']:.2f} ms, p90 {one['p90_ms']:.2f} ms; "
        f"256 records: p50 {batch['p50_ms']:.2f} ms, p90 {batch['p90_ms']:.2f} ms"
    )
    assert one["p50_ms"] < 50 and batch["p50_ms"] < 200


def test_every_call_of_a_predictor_uses_its_one_thread_count(
    tables: dict[str, pl.DataFrame], predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LightGBM keeps a call's thread count process-wide: mixed counts must never meet."""
    monkeypatch.setattr(predictor, "num_threads", 2)
    asked: list[Any] = []
    real_predict = predictor.booster.predict

    def recording_predict(x: np.ndarray, **options: Any) -> np.ndarray:
        asked.append((len(x), options.get("num_threads")))
        return real_predict(x, **options)

    monkeypatch.setattr(predictor.booster, "predict", recording_predict)
    records = booking_records(tables["flights"].head(200))
    for n in (1, 8, 64, 200):
        bookings = Bookings.from_records(records[:n])
        got = predictor.score(bookings)
        assert np.array_equal(got, real_predict(predictor.matrix(bookings), num_threads=1))
    assert asked == [(1, 2), (8, 2), (64, 2), (200, 2)]


def _scoring_threads(
    predictor: Predictor, bookings: Bookings, calls: int
) -> list[threading.Thread]:
    """The thread each of ``calls`` requests was scored on, each request its own task on a loop
    run with ``run_forever`` as in a Ray Serve replica; the answers must be ``score``'s."""
    threads: list[threading.Thread] = []
    real_score = predictor.score
    expected = real_score(bookings)

    def recording_score(bookings: Bookings) -> np.ndarray:
        threads.append(threading.current_thread())
        return real_score(bookings)

    predictor.score = recording_score  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True, name="replica-loop")
    runner.start()
    try:
        for _ in range(calls):
            answer = asyncio.run_coroutine_threadsafe(default_scorer(predictor, bookings), loop)
            assert np.array_equal(answer.result(timeout=30), expected)
    finally:
        del predictor.score
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=10)
        loop.close()
    assert len(threads) == calls
    return threads


def test_large_batches_reuse_long_lived_scoring_threads(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any]
) -> None:
    """On LightGBM, large batches go to the scoring pool, whose threads outlive the requests
    (AnyIO's stopped with each request's task)."""
    predictor = _own_predictor(tables, trained)
    large = Bookings.from_records(booking_records(tables["flights"].head(INLINE_MAX_RECORDS + 1)))
    threads = _scoring_threads(predictor, large, 6)
    assert all(t.name.startswith("mlops-score") and t.is_alive() for t in threads)
    assert len(set(threads)) <= SCORING_THREADS
    small = Bookings.from_records(booking_records(tables["flights"].head(INLINE_MAX_RECORDS)))
    assert {t.name for t in _scoring_threads(predictor, small, 2)} == {"replica-loop"}


def test_compiled_trees_score_batches_up_to_their_limit_on_the_loop(
    tables: dict[str, pl.DataFrame], trained: dict[str, Any]
) -> None:
    """Compiled trees are fast enough that the hop to a thread costs more than it saves."""
    predictor = _own_predictor(tables, trained)
    assert predictor.compile_trees().startswith("compiled"), predictor.trees_status
    assert predictor.trees_compiled
    flights = tables["flights"]
    at_limit = Bookings.from_records(booking_records(flights.head(INLINE_COMPILED_MAX_RECORDS)))
    assert {t.name for t in _scoring_threads(predictor, at_limit, 3)} == {"replica-loop"}
    above = Bookings.from_records(booking_records(flights.head(INLINE_COMPILED_MAX_RECORDS + 1)))
    assert all(t.name.startswith("mlops-score") for t in _scoring_threads(predictor, above, 3))


def test_answer_bytes_are_orjson_s_dict_form_for_every_size() -> None:
    rng = np.random.default_rng(3)
    edges = [0.0, 1.0, 5e-324, 1e-300, 0.9999999999999999, 1 / 3, float("nan")]
    for n in [0, 1, 16, 17, 18, 1000, *rng.integers(2, 1200, 30).tolist()]:
        p = rng.random(n) ** rng.uniform(0.1, 30)
        p[: min(n, len(edges))] = edges[: min(n, len(edges))]
        delayed = p >= 0.5
        expected = orjson.dumps(
            {
                "model_version": "m0042",
                "predictions": [
                    {"delay_probability": x, "delayed": y}
                    for x, y in zip(p.tolist(), delayed.tolist(), strict=True)
                ],
            }
        )
        assert _answer("m0042", p, delayed) == expected, n
    with pytest.raises(ValueError, match="100 probabilities but 99 decisions"):
        _answer("m0042", np.zeros(100), np.zeros(99, dtype=bool))


def test_calendar_rule_agrees_for_small_and_large_batches() -> None:
    """Up to 8 records are checked in plain Python, more with numpy: the same rows either way,
    and the ones ``FlightRecord`` refuses (leap years, month ends, clock minutes)."""
    records = [
        {**GOOD, "year": y, "month": m, "day": d, "sched_dep_time": dep, "sched_arr_time": arr}
        for y, m, d, dep, arr in itertools.product(
            (2012, 2013, 2100), range(1, 13), (1, 28, 29, 30, 31), (0, 59, 60, 2359), (830, 875)
        )
    ]
    flagged = impossible_calendar_rows(Bookings.from_records(records))
    small = [
        start + i
        for start in range(0, len(records), 7)
        for i in impossible_calendar_rows(Bookings.from_records(records[start : start + 7]))
    ]
    assert small == flagged
    refused = []
    for i, record in enumerate(records):
        try:
            FlightRecord.model_validate(record)
        except ValidationError:
            refused.append(i)
    assert flagged == refused and 0 < len(flagged) < len(records)


def test_request_model_limit_is_configurable() -> None:
    assert predict_request_model(3).model_json_schema()["properties"]["flights"]["maxItems"] == 3
    with pytest.raises(ValueError, match="at least 1"):
        predict_request_model(0)


def test_mlops_predict_sends_json_or_csv_and_prints_a_table(
    server: str, tables: dict[str, pl.DataFrame], tmp_path: Path
) -> None:
    import subprocess
    import sys

    mlops = str(Path(sys.executable).parent / "mlops")
    records = booking_records(tables["flights"].head(3))
    (tmp_path / "flights.json").write_text(json.dumps({"flights": records}))
    pl.DataFrame(records).write_csv(tmp_path / "flights.csv")
    expected = httpx.post(f"{server}/predict", json={"flights": records}).json()
    for name in ("flights.json", "flights.csv"):
        result = subprocess.run([mlops, "predict", str(tmp_path / name), "--url", server],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"model {expected['model_version']}"
        rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == 3
        for row, answer in zip(rows, expected["predictions"], strict=True):
            assert f"| {answer['delay_probability']:.4f} | {answer['delayed']} |" in row

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**records[0], "month": 13}]))
    result = subprocess.run([mlops, "predict", str(bad), "--url", server],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "HTTP 422" in result.stderr and "month" in result.stderr
    down = f"http://127.0.0.1:{_closed_port()}"
    result = subprocess.run([mlops, "predict", str(tmp_path / "flights.json"), "--url", down],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and f"the endpoint {down} is not answering" in result.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
