"""Feature drift with Evidently (its current API), guarded against degenerate columns.

What drift *means* here: Evidently's per-column verdicts (Wasserstein distance for numeric
columns, Jensen-Shannon for categorical ones, both pinned so that a verdict does not switch
test with the sample size), weighted by the champion's gain importance. Weather columns drift
with the seasons every month; a column the model hardly uses should not trigger a retrain on
its own, so the retrain signal is the *importance-weighted* drifted share, and the plain share
is shown next to it.

Columns that cannot be compared are skipped with the reason, never crash the report and never
turn the share into NaN: all-null or too few values on either side, or a partition smaller
than ``min_rows``. A column constant on both sides is compared directly (same value: no drift).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

NUMERIC_METHOD = "wasserstein"
CATEGORICAL_METHOD = "jensenshannon"
MISSING_CATEGORY = "<missing>"


@dataclass(frozen=True)
class ColumnDrift:
    column: str
    kind: Literal["numeric", "categorical"]
    status: Literal["measured", "skipped"]
    drifted: bool
    score: float | None
    method: str
    threshold: float | None
    importance: float
    reason: str = ""


@dataclass
class DriftResult:
    columns: list[ColumnDrift]
    current_rows: int
    reference_rows: int
    sampled: bool
    notes: list[str] = field(default_factory=list)
    snapshot: object | None = None  # the Evidently snapshot, for the HTML report

    @property
    def measured(self) -> list[ColumnDrift]:
        return [c for c in self.columns if c.status == "measured"]

    @property
    def share(self) -> float:
        """Drifted share of the measured columns (0.0 when none could be measured)."""
        measured = self.measured
        return sum(c.drifted for c in measured) / len(measured) if measured else 0.0

    @property
    def weighted_share(self) -> float:
        """Importance-weighted drifted share over the measured columns."""
        measured = self.measured
        total = sum(c.importance for c in measured)
        if total <= 0:
            return self.share
        return sum(c.importance for c in measured if c.drifted) / total

    def table(self) -> pl.DataFrame:
        return pl.DataFrame(
            [asdict(c) for c in self.columns],
            schema={
                "column": pl.String, "kind": pl.String, "status": pl.String,
                "drifted": pl.Boolean, "score": pl.Float64, "method": pl.String,
                "threshold": pl.Float64, "importance": pl.Float64, "reason": pl.String,
            },
        ).sort(["drifted", "importance"], descending=True)  # fmt: skip

    def save_html(self, path: Path) -> Path | None:
        if self.snapshot is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        self.snapshot.save_html(str(tmp))  # type: ignore[attr-defined]
        tmp.replace(path)
        return path


def _skip(column: str, kind: str, importance: float, reason: str) -> ColumnDrift:
    return ColumnDrift(column, kind, "skipped", False, None, "", None, importance, reason)  # type: ignore[arg-type]


def _guard(
    column: str, kind: str, current: pl.Series, reference: pl.Series, importance: float,
    min_values: int,
) -> ColumnDrift | None:  # fmt: skip
    """A verdict or skip for a column Evidently cannot compare meaningfully, else None."""
    for side, series in (("current", current), ("reference", reference)):
        values = series.len() - series.null_count()
        if values == 0:
            return _skip(column, kind, importance, f"all null in the {side} data")
        if values < min_values:
            return _skip(
                column, kind, importance, f"only {values} value(s) in the {side} data "
                f"(< {min_values})",
            )  # fmt: skip
    cur_unique, ref_unique = current.drop_nulls().unique(), reference.drop_nulls().unique()
    if cur_unique.len() == 1 and ref_unique.len() == 1:
        same = cur_unique.item() == ref_unique.item()
        return ColumnDrift(
            column, kind, "measured", not same, 0.0 if same else 1.0, "constant", None,  # type: ignore[arg-type]
            importance, "constant on both sides" + ("" if same else ", different values"),
        )  # fmt: skip
    return None


def measure_drift(
    current: pl.DataFrame,
    reference: pl.DataFrame,
    columns: dict[str, Literal["numeric", "categorical"]],
    importance: dict[str, float] | None = None,
    *,
    threshold: float = 0.1,
    max_rows: int | None = 50_000,
    min_rows: int = 30,
    seed: int = 0,
) -> DriftResult:
    """Per-column drift of ``current`` against ``reference`` (Evidently, current API).

    ``threshold`` is the distance above which a column counts as drifted (Evidently's default
    for both pinned methods). Each side is sampled down to ``max_rows`` rows (seeded) when
    larger; the distances do not depend on sample size the way p-values do.
    """
    importance = importance or {}
    total = sum(importance.get(c, 0.0) for c in columns)
    weights = {c: (importance.get(c, 0.0) / total if total > 0 else 0.0) for c in columns}
    result = DriftResult([], current.height, reference.height, sampled=False)
    for side, frame in (("current", current), ("reference", reference)):
        if frame.height < min_rows:
            reason = f"{side} data has {frame.height} row(s) (< {min_rows}): drift not measured"
            result.notes.append(reason)
            result.columns = [_skip(c, k, weights[c], reason) for c, k in columns.items()]
            return result
    if max_rows is not None:
        if current.height > max_rows:
            current, result.sampled = current.sample(max_rows, seed=seed), True
        if reference.height > max_rows:
            reference, result.sampled = reference.sample(max_rows, seed=seed + 1), True

    verdicts: dict[str, ColumnDrift] = {}
    compare: dict[str, str] = {}
    for column, kind in columns.items():
        if column not in current.columns or column not in reference.columns:
            verdicts[column] = _skip(column, kind, weights[column], "column missing")
            continue
        guarded = _guard(
            column, kind, current[column], reference[column], weights[column], min_rows
        )
        if guarded is not None:
            verdicts[column] = guarded
        else:
            compare[column] = kind
    if compare:
        result.snapshot, measured = _evidently(current, reference, compare, threshold)
        for column, kind in compare.items():
            score, method, drifted = measured.get(column, (math.nan, "", False))
            if score is None or not math.isfinite(score):
                verdicts[column] = _skip(
                    column, kind, weights[column], "Evidently returned no finite score"
                )
            else:
                verdicts[column] = ColumnDrift(
                    column, kind, "measured", drifted, float(score), method, threshold,  # type: ignore[arg-type]
                    weights[column],
                )  # fmt: skip
    result.columns = [verdicts[c] for c in columns]
    return result


def _evidently(
    current: pl.DataFrame, reference: pl.DataFrame, columns: dict[str, str], threshold: float
) -> tuple[object, dict[str, tuple[float, str, bool]]]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    numeric = [c for c, k in columns.items() if k == "numeric"]
    categorical = [c for c, k in columns.items() if k == "categorical"]

    def to_pandas(frame: pl.DataFrame):  # pandas: what Evidently accepts
        return frame.select(
            *(pl.col(c).cast(pl.Float64) for c in numeric),
            *(pl.col(c).cast(pl.String).fill_null(MISSING_CATEGORY) for c in categorical),
        ).to_pandas()

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    report = Report(
        [
            DataDriftPreset(
                columns=list(columns),
                num_method=NUMERIC_METHOD,
                cat_method=CATEGORICAL_METHOD,
                threshold=threshold,
            )
        ],
        include_tests=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Evidently's order: current first, then reference.
        snapshot = report.run(
            Dataset.from_pandas(to_pandas(current), data_definition=definition),
            Dataset.from_pandas(to_pandas(reference), data_definition=definition),
        )
    payload = snapshot.dict()
    scores: dict[str, tuple[float, str]] = {}
    for metric in payload["metrics"]:
        config = metric.get("config") or {}
        if config.get("type", "").endswith("ValueDrift"):
            scores[config["column"]] = (metric["value"], config.get("method", ""))
    failed: set[str] = set()
    for test in payload.get("tests", []):
        params = (test.get("metric_config") or {}).get("params") or {}
        if params.get("type", "").endswith("ValueDrift") and test.get("status") == "FAIL":
            failed.add(params["column"])
    return snapshot, {c: (s, m, c in failed) for c, (s, m) in scores.items()}
