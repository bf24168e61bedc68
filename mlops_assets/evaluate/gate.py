"""The promotion gate: may a challenger replace the champion? A pure decision with a reason."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateRules:
    min_auc_gain: float = 0.002
    """The challenger's AUC on the frozen set minus the champion's must be at least this when
    what would serve has learned from no month the champion has not: a retrain on the same data
    must be better to replace it."""
    min_auc_gain_newer_data: float = -0.005
    """The same bound when what would serve has learned from months the champion has not (new
    data landed): a non-inferiority margin. The challenger may lose by up to 0.005 and still
    replace the champion, because one month's AUC (~28k flights) cannot show what one more month
    of data is worth. Replaying Jul–Dec, -0.005 served a mean AUC 0.0004-0.0033 higher than
    +0.002 (benchmarks/README.md)."""
    max_calibration_error: float = 0.10
    """Expected calibration error (10 bins) allowed on the frozen set. Loose on purpose: the
    delay rate itself moves month to month (20% in February, 31% in June), which shifts every
    model's calibration; the bound catches broken models, not seasonal prevalence."""
    baseline_margin: float = 0.01
    """A first model must beat every baseline's AUC by at least this."""


@dataclass(frozen=True)
class Decision:
    passed: bool
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


def decide(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    baselines: dict[str, dict[str, float]],
    rules: GateRules,
    *,
    overlap_months: list[str] | None = None,
    champion_overlap_months: list[str] | None = None,
    newer_months: list[str] | None = None,
    same_model: bool = False,
) -> Decision:
    """Decide on frozen-set metrics (``auc``, ``log_loss``, ``calibration_error``, ...)."""
    details = {
        "challenger_auc": challenger.get("auc"),
        "champion_auc": champion.get("auc") if champion else None,
        **{f"{name}_auc": m.get("auc") for name, m in baselines.items()},
    }
    if same_model:
        return Decision(True, "the challenger is already the champion; nothing changes", details)
    if challenger.get("nan_predictions", 0) > 0 or "auc" not in challenger:
        return Decision(False, "reject: the challenger predicts NaN", details)
    if overlap_months:
        return Decision(
            False,
            f"reject: frozen evaluation months {overlap_months} were used to train the "
            "challenger; refreeze the evaluation set on months it has not seen",
            details,
        )
    if champion_overlap_months:
        return Decision(
            False,
            f"reject: the champion was trained on the frozen evaluation months "
            f"{champion_overlap_months}, so it cannot be compared fairly on them; land a new "
            "month (the frozen set then moves to it)",
            details,
        )
    auc = challenger["auc"]
    if math.isnan(auc):
        return Decision(False, "reject: AUC undefined (the frozen set has one class)", details)
    if champion is not None:  # recorded before the calibration rule, which can reject a winner
        details["auc_gain"] = auc - champion["auc"]
    calibration = challenger.get("calibration_error", math.inf)
    if not calibration <= rules.max_calibration_error:
        return Decision(
            False,
            f"reject: calibration error {calibration:.4f} exceeds {rules.max_calibration_error}",
            details,
        )
    if champion is None:
        for name, m in baselines.items():
            if not auc >= m["auc"] + rules.baseline_margin:
                return Decision(
                    False,
                    f"reject: first model AUC {auc:.4f} does not beat the {name} baseline "
                    f"({m['auc']:.4f}) by {rules.baseline_margin}",
                    details,
                )
        beaten = ", ".join(f"{name} {m['auc']:.4f}" for name, m in baselines.items())
        return Decision(True, f"promote: first model; AUC {auc:.4f} beats {beaten}", details)
    gain = details["auc_gain"]
    margin = rules.min_auc_gain_newer_data if newer_months else rules.min_auc_gain
    why = (
        f"; it learns from {', '.join(newer_months)}, which the champion has not"
        if newer_months
        else "; no month the champion has not learned from"
    )
    if gain >= margin:
        return Decision(
            True,
            f"promote: AUC {auc:.4f} vs champion {champion['auc']:.4f} ({gain:+.4f} ≥ "
            f"{margin}{why})",
            details,
        )
    return Decision(
        False,
        f"reject: AUC {auc:.4f} vs champion {champion['auc']:.4f} ({gain:+.4f} < "
        f"{margin} required{why})",
        details,
    )
