"""Classification metrics, curves and plots: plain functions on labels and probabilities."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from sklearn import metrics as skm

CALIBRATION_BINS = 10
GROUP_METRICS = ("rows", "positive_rate", "auc", "log_loss", "brier", "f1")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, log loss, Brier, precision/recall/F1 at ``threshold``, and calibration error."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    out: dict[str, float] = {
        "rows": float(len(y)),
        "positive_rate": float(y.mean()) if len(y) else math.nan,
        "mean_prediction": float(p.mean()) if len(p) else math.nan,
        "nan_predictions": float(np.isnan(p).sum()),
    }
    if len(y) == 0 or np.isnan(p).any():
        return out
    clipped = np.clip(p, 1e-7, 1 - 1e-7)
    predicted = p >= threshold
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y, predicted, average="binary", zero_division=0.0
    )
    two_classes = len(np.unique(y)) == 2
    out |= {
        "auc": float(skm.roc_auc_score(y, p)) if two_classes else math.nan,
        "average_precision": float(skm.average_precision_score(y, p)) if two_classes else math.nan,
        "log_loss": float(skm.log_loss(y, clipped, labels=[0, 1])),
        "brier": float(skm.brier_score_loss(y, p)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "calibration_error": expected_calibration_error(y, p),
    }
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Mean |observed rate - mean prediction| over equal-width bins, weighted by bin size."""
    table = calibration_table(y, p, bins)
    if table.is_empty():
        return math.nan
    weights = table["rows"] / table["rows"].sum()
    return float((weights * (table["observed"] - table["predicted"]).abs()).sum())


def calibration_table(y: np.ndarray, p: np.ndarray, bins: int = CALIBRATION_BINS) -> pl.DataFrame:
    frame = pl.DataFrame({"y": np.asarray(y, dtype=np.float64), "p": np.asarray(p)})
    return (
        frame.with_columns((pl.col("p") * bins).floor().clip(0, bins - 1).alias("bin"))
        .group_by("bin")
        .agg(
            pl.len().alias("rows"),
            pl.col("p").mean().alias("predicted"),
            pl.col("y").mean().alias("observed"),
        )
        .sort("bin")
    )


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The decision threshold that maximizes F1 (chosen on validation, applied to test)."""
    precision, recall, thresholds = skm.precision_recall_curve(y, p)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))]) if len(thresholds) else 0.5


def metrics_by(
    frame: pl.DataFrame, p: np.ndarray, by: str, threshold: float, label: str
) -> pl.DataFrame:
    """Per-group metrics (a month, a carrier): rows, positive rate, AUC, log loss, Brier."""
    rows = []
    scored = frame.select(by, label).with_columns(pl.Series("p", p))
    for (key,), group in scored.group_by(by, maintain_order=True):
        m = binary_metrics(group[label].to_numpy(), group["p"].to_numpy(), threshold)
        rows.append({by: key, **{k: m.get(k, math.nan) for k in GROUP_METRICS}})
    return pl.DataFrame(rows).sort(by)


@dataclass(frozen=True)
class Scored:
    """One model's predictions on one evaluation set."""

    name: str
    y: np.ndarray
    p: np.ndarray


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


def plot_curves(scored: list[Scored], title: str) -> bytes:
    """ROC and precision-recall curves of several models on the same rows."""
    fig = Figure(figsize=(10, 4.2))
    roc_ax, pr_ax = fig.subplots(1, 2)
    for s in scored:
        if len(np.unique(s.y)) < 2 or np.isnan(s.p).any():
            continue
        fpr, tpr, _ = skm.roc_curve(s.y, s.p)
        roc_ax.plot(fpr, tpr, label=f"{s.name} (AUC {skm.roc_auc_score(s.y, s.p):.3f})")
        if np.ptp(s.p) == 0:  # a constant score's PR "curve" is just the positive rate
            pr_ax.axhline(s.y.mean(), label=s.name, color=roc_ax.lines[-1].get_color())
            continue
        precision, recall, _ = skm.precision_recall_curve(s.y, s.p)
        pr_ax.plot(recall, precision, label=s.name, color=roc_ax.lines[-1].get_color())
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC — {title}")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall — {title}")
    roc_ax.legend(loc="lower right", fontsize=8)
    pr_ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def plot_calibration_and_confusion(s: Scored, threshold: float, title: str) -> bytes:
    fig = Figure(figsize=(10, 4.2))
    cal_ax, cm_ax = fig.subplots(1, 2)
    table = calibration_table(s.y, s.p)
    cal_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    cal_ax.plot(table["predicted"], table["observed"], marker="o")
    cal_ax.set(xlabel="mean predicted probability", ylabel="observed delay rate",
               title=f"Calibration — {title}", xlim=(0, 1), ylim=(0, 1))  # fmt: skip
    matrix = skm.confusion_matrix(s.y, s.p >= threshold, labels=[0, 1])
    cm_ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        cm_ax.text(j, i, f"{value:,}", ha="center", va="center",
                   color="white" if value > matrix.max() / 2 else "black")  # fmt: skip
    cm_ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["on time", "delayed"],
              yticklabels=["on time", "delayed"], xlabel="predicted", ylabel="actual",
              title=f"Confusion matrix at {threshold:.2f}")  # fmt: skip
    return _png(fig)
