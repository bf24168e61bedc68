"""A loaded, verified model plus its reference tables: booking records in, probabilities out.

Scoring goes through exactly the training path: :func:`build_features` joins the records with
origin weather and planes, :meth:`Preprocessor.transform` encodes them with the preprocessing
fitted on the training split, and ``lightgbm.Booster.predict`` scores the matrix (or, once
:meth:`Predictor.compile_trees` proved them equal, the same trees compiled to machine code).

Per-call cost is kept low without changing that path: the weather table (it grows by ~26k rows
a year) is sorted and indexed once, when the predictor is built, and each call hands
:func:`build_features` only the weather rows its records can match (their origin on the flight
date and the day either side: usually one slice). The left join then sees the same matching
rows as with the full table, so the features are identical, while the join no longer hashes the
whole weather history per call. The planes table is small and is passed whole.

Requests skip polars' ~3-4 ms of planning per call when they can:
:class:`~mlops_assets.serve.fastpath.FastMatrix` builds the same model matrix with numpy from
the records' columns (:class:`~mlops_assets.serve.columnar.Bookings`), ~0.1 ms for one record
and ~2 us a record in large batches. It is used only after it reproduced the polars path exactly
on a sample spanning the reference tables when the predictor was built (``fast_path_status``,
also in ``GET /model``); otherwise every request takes the polars path.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import (
    FEATURE_NAMES,
    PAST_WEATHER_FIELDS,
    WEATHER_FIELDS,
    build_features,
    weather_history,
)
from mlops_assets.serve.columnar import Bookings
from mlops_assets.serve.compiled import CompiledTrees, verified_trees
from mlops_assets.serve.fastpath import FastMatrix, sample_records
from mlops_assets.serve.schema import Prediction
from resources.registry import ModelRegistryResource, StoredModel

DEFAULT_THRESHOLD = 0.5
# The row position rides through build_features in the `flight` column: polars does not promise
# row order through joins, and `flight` is an identifier, never a feature (checked below).
_ORDER_COLUMN = "flight"
# A fixed, plausible booking used to prove a freshly loaded model answers before it takes traffic.
SMOKE_RECORD: dict[str, Any] = {
    "year": 2013, "month": 1, "day": 1, "sched_dep_time": 900, "sched_arr_time": 1200,
    "carrier": "UA", "flight": 1, "tailnum": None, "origin": "EWR", "dest": "ORD",
    "distance": 719.0,
}  # fmt: skip


class PredictorError(RuntimeError):
    """The model or its reference tables cannot serve (wrong features, failed smoke test)."""


class _RangeIndex:
    """Rows of a table sorted by a key, each key's rows one contiguous ``[start, stop)`` range.

    Taking the rows for a few keys is then one or a few slices (microseconds) rather than a
    filter or a hash join over the whole table.
    """

    def __init__(self, frame: pl.DataFrame, keys: list[str], key: pl.Expr | None = None) -> None:
        self.frame = frame.sort(keys, maintain_order=True)
        key_exprs = [*keys[:-1], key if key is not None else pl.col(keys[-1])]
        grouped = (
            self.frame.with_row_index("__row")
            .group_by(key_exprs)
            .agg(pl.col("__row").min().alias("__start"), pl.len().alias("__len"))
        )
        self.ranges: dict[Any, tuple[int, int]] = {}
        for *key_values, start, length in grouped.iter_rows():
            k = tuple(key_values) if len(key_values) > 1 else key_values[0]
            self.ranges[k] = (start, start + length)
        self.empty = self.frame.clear()

    def take(self, keys: set[Any]) -> pl.DataFrame:
        found = sorted(self.ranges[k] for k in keys if k in self.ranges)
        if not found:
            return self.empty
        merged = [list(found[0])]
        for start, stop in found[1:]:
            if start <= merged[-1][1]:  # adjacent or overlapping: extend the current slice
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        if len(merged) == 1:
            ((start, stop),) = merged
            return self.frame.slice(start, stop - start)
        return self.frame[np.concatenate([np.arange(a, b) for a, b in merged])]


def _threshold(manifest: Mapping[str, Any]) -> float:
    value = manifest.get("threshold", DEFAULT_THRESHOLD)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PredictorError(f"manifest threshold must be a number, got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise PredictorError(f"manifest threshold must lie strictly between 0 and 1: {value}")
    return float(value)


@dataclass(eq=False)
class Predictor:
    """A verified model ready to score booking records (built once, called many times)."""

    version: str
    manifest: dict[str, Any]
    booster: lgb.Booster
    preprocessor: Preprocessor
    weather: pl.DataFrame
    planes: pl.DataFrame
    threshold: float = DEFAULT_THRESHOLD
    num_threads: int = 0
    """LightGBM prediction threads, the same for every call; 0 leaves OpenMP's default.

    Never vary it from call to call in one process: LightGBM keeps the count of a call's
    ``num_threads`` in a process-wide variable, read once to size the per-thread buffers and
    again to size the parallel loop, so two concurrent calls with different counts can index
    past the buffers of one another (a benchmark run of a replica that mixed one and two threads
    hung; not reproduced since, and the counts are no longer mixed).
    """
    fast_path: bool = True
    """Encode small requests with :class:`FastMatrix` once it has proved equal at load."""
    _weather_index: _RangeIndex = field(init=False, repr=False)
    _weather_hours: int = field(init=False, repr=False, default=0)
    _fast: FastMatrix | None = field(init=False, repr=False, default=None)
    fast_path_status: str = field(init=False, default="off")
    _trees: CompiledTrees | None = field(init=False, repr=False, default=None)
    trees_status: str = field(init=False, default="lightgbm: not compiled")
    _sample: np.ndarray | None = field(init=False, repr=False, default=None)
    """The feature function's matrix of :func:`sample_records`, built once for both checks."""

    def __post_init__(self) -> None:
        if _ORDER_COLUMN in FEATURE_NAMES:
            raise PredictorError(f"{_ORDER_COLUMN!r} became a feature; pick another carrier")
        names = self.booster.feature_name()
        if names != list(FEATURE_NAMES):
            raise PredictorError(
                f"model {self.version} was trained on features {names}, but the feature "
                f"function produces {list(FEATURE_NAMES)}; refusing to serve it"
            )
        for table, frame, needed in [
            ("weather", self.weather, {"origin", "time_hour", *WEATHER_FIELDS}),
            ("planes", self.planes, {"tailnum", "year", "seats", "engines"}),
        ]:
            missing = sorted(needed - set(frame.columns))
            if missing:
                raise PredictorError(f"reference table {table} lacks column(s) {missing}")
        if not isinstance(self.weather.schema["time_hour"], pl.Datetime):
            raise PredictorError("reference weather needs a typed (validated) time_hour column")
        self._weather_hours = self.weather.height
        # The weather history needs the hours before a record's, which a slice of the table
        # may not hold: derive it once from the whole table (the slices then carry it).
        if not set(PAST_WEATHER_FIELDS) <= set(self.weather.columns):
            self.weather = weather_history(self.weather).collect()
        # Keyed by the UTC date of each weather hour: a local flight date D at any hour falls
        # on UTC date D-1, D or D+1 whatever the origin's offset, so those three keys cover it
        # (and for one origin they are adjacent ranges: a single slice).
        self._weather_index = _RangeIndex(
            self.weather, ["origin", "time_hour"], pl.col("time_hour").dt.date()
        )
        self.weather = self._weather_index.frame  # hold one copy, the sorted one
        if self.fast_path:
            self._fast, self.fast_path_status = self._verified_fast_path()

    def _verified_fast_path(self) -> tuple[FastMatrix | None, str]:
        """The fast path, if it encodes a sample spanning the tables exactly as the polars path."""
        fast, why = FastMatrix.build(self.weather, self.planes, self.preprocessor)
        if fast is None:
            return None, f"off: {why}"
        sample = sample_records(self.weather, self.planes)
        expected = self._sample_matrix(sample)
        bookings = Bookings.from_records(sample)
        # Both of its ways: record by record (a few records) and vectorized (more).
        for way, got in (("rows", fast.rows_matrix(bookings)),
                         ("columns", fast.columns_matrix(bookings))):  # fmt: skip
            if got.shape != expected.shape or not np.array_equal(got, expected, equal_nan=True):
                same = (got == expected) | (np.isnan(got) & np.isnan(expected))
                rows = np.flatnonzero(~same.all(axis=1)) if got.shape == expected.shape else []
                return None, (
                    f"off: its {way} path differs from the feature function on sample "
                    f"row(s) {rows[:5]}"
                )
        return fast, f"on, verified on {len(sample)} records"

    def _sample_matrix(self, records: list[dict[str, Any]] | None = None) -> np.ndarray:
        if self._sample is None:
            records = records or sample_records(self.weather, self.planes)
            self._sample = self._polars_matrix(records)
        return self._sample

    def compile_trees(self) -> str:
        """Score with the trees compiled by lleaves once they equal LightGBM; the new status.

        Takes seconds (see :mod:`~mlops_assets.serve.compiled`): a replica calls it on a
        thread of its own after the model took traffic. Until it returns, and for good if the
        compiled trees fail their comparison, ``Booster.predict`` scores.
        """
        trees, status = verified_trees(self.booster, self._sample_matrix(), self.num_threads)
        self._trees, self.trees_status = trees, status
        return status

    @property
    def trees_compiled(self) -> bool:
        """True once :meth:`compile_trees` proved the compiled trees equal and they score."""
        return self._trees is not None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_stored(
        cls, stored: StoredModel, planes: pl.DataFrame, weather: pl.DataFrame, **options: Any
    ) -> Predictor:
        """Build from a model whose bytes the registry has already verified."""
        try:
            booster = lgb.Booster(model_str=stored.model_text)
            preprocessor = Preprocessor.from_json(stored.preprocessor_json)
        except (lgb.basic.LightGBMError, ValueError, TypeError) as exc:
            raise PredictorError(f"model {stored.version} cannot be loaded: {exc}") from exc
        return cls(
            version=stored.version,
            manifest=dict(stored.manifest),
            booster=booster,
            preprocessor=preprocessor,
            weather=weather,
            planes=planes,
            threshold=_threshold(stored.manifest),
            **options,
        )

    @classmethod
    def from_registry(
        cls,
        registry: ModelRegistryResource,
        version: str,
        planes: pl.DataFrame,
        weather: pl.DataFrame,
        **options: Any,
    ) -> Predictor:
        """Load ``version`` (sha256-verified by the registry) with its reference tables."""
        return cls.from_stored(registry.load(version), planes, weather, **options)

    # -- scoring --------------------------------------------------------------------------

    def _weather_rows(self, bookings: Bookings) -> pl.DataFrame:
        """The only weather rows the records can join to."""
        one_day = dt.timedelta(days=1)
        days: set[tuple[str, dt.date]] = set()
        c = bookings.columns
        for year, month, day, origin in set(
            zip(c["year"], c["month"], c["day"], c["origin"], strict=True)
        ):
            date = dt.date(int(year), int(month), int(day))
            days.update(((origin, date - one_day), (origin, date), (origin, date + one_day)))
        return self._weather_index.take(days)

    def features(self, records: Sequence[Mapping[str, Any]] | Bookings) -> pl.DataFrame:
        """The feature rows for ``records``, in record order (what training would compute)."""
        bookings = records if isinstance(records, Bookings) else Bookings.from_records(records)
        frame = bookings.frame()
        ordered = frame.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias(_ORDER_COLUMN))
        # The planes table is small (a few thousand rows): joining it whole costs nothing.
        features = build_features(ordered, self._weather_rows(bookings), self.planes)
        if features.height != frame.height:
            raise PredictorError(
                f"{frame.height} records gave {features.height} feature rows: a reference "
                "table has duplicate keys"
            )
        # Restore the caller's flight numbers after putting the rows back in request order.
        return features.sort(_ORDER_COLUMN).with_columns(frame.get_column(_ORDER_COLUMN))

    def _polars_matrix(self, records: Sequence[Mapping[str, Any]] | Bookings) -> np.ndarray:
        x = self.preprocessor.transform(self.features(records)).to_numpy(order="c")
        return x.astype(np.float64, copy=False)

    def matrix(self, records: Sequence[Mapping[str, Any]] | Bookings) -> np.ndarray:
        """The model inputs for ``records``: the fast path when verified, else the polars plan."""
        bookings = records if isinstance(records, Bookings) else Bookings.from_records(records)
        if self._fast is not None:
            return self._fast.bookings_matrix(bookings)
        return self._polars_matrix(bookings)

    def score(self, bookings: Bookings) -> np.ndarray:
        """P(delayed) for each record, in order (float64)."""
        if not bookings.n:
            return np.empty(0, dtype=np.float64)
        matrix = self.matrix(bookings)
        trees = self._trees  # read once: compile_trees may set it from another thread
        if trees is not None:
            return trees.predict(matrix)
        options = {"num_threads": self.num_threads} if self.num_threads else {}
        return self.booster.predict(matrix, **options)

    def probabilities(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self.score(Bookings.from_records(records))

    def predict(self, records: Sequence[Mapping[str, Any]]) -> list[Prediction]:
        """Score validated booking records (``FlightRecord.model_dump()`` dicts), in order."""
        threshold = self.threshold
        # model_construct: the values come straight from LightGBM, already a probability.
        return [
            Prediction.model_construct(delay_probability=float(p), delayed=bool(p >= threshold))
            for p in self.probabilities(records)
        ]

    def smoke_test(self) -> Prediction:
        """Score one known booking; raise unless the answer is a finite probability.

        Run before a freshly loaded model takes traffic (verify, then swap).
        """
        try:
            (prediction,) = self.predict([SMOKE_RECORD])
        except Exception as exc:
            raise PredictorError(
                f"model {self.version} failed its smoke prediction: {exc}"
            ) from exc
        p = prediction.delay_probability
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise PredictorError(f"model {self.version} smoke prediction is not a probability: {p}")
        return prediction

    def describe(self) -> dict[str, Any]:
        """The manifest, plus what this process serves it with."""
        return {
            **self.manifest,
            "serving": {
                "threshold": self.threshold,
                "fast_path": self.fast_path_status,
                "trees": self.trees_status,
                "reference_tables": {
                    "weather_rows": self._weather_hours,
                    "planes_rows": self.planes.height,
                },
            },
        }


def time_predict(
    predictor: Predictor, records: Sequence[Mapping[str, Any]], repeats: int = 50
) -> dict[str, float]:
    """Median and 90th-percentile wall time of ``predict(records)`` in milliseconds."""
    predictor.predict(records)  # warm up: first calls pay one-off polars/LightGBM setup
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict(records)
        samples.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p90_ms": float(np.percentile(samples, 90)),
    }
