"""The promotion gate's rules, decided on frozen-set metrics."""

from __future__ import annotations

import math

from mlops_assets.evaluate.gate import GateRules, decide

RULES = GateRules(min_auc_gain=0.002, max_calibration_error=0.05, baseline_margin=0.01)
BASELINES = {"base_rate": {"auc": 0.5}, "logistic": {"auc": 0.69}}


def m(auc: float, calibration: float = 0.01, nan: int = 0) -> dict[str, float]:
    return {"auc": auc, "calibration_error": calibration, "nan_predictions": nan}


def test_first_model_must_beat_every_baseline() -> None:
    assert decide(m(0.74), None, BASELINES, RULES).passed
    rejected = decide(m(0.695), None, BASELINES, RULES)
    assert not rejected.passed and "logistic baseline" in rejected.reason


def test_challenger_must_beat_champion_by_the_margin() -> None:
    assert decide(m(0.745), m(0.742), BASELINES, RULES).passed
    rejected = decide(m(0.7435), m(0.742), BASELINES, RULES)
    assert not rejected.passed and "+0.0015 < 0.002" in rejected.reason
    assert rejected.details["auc_gain"] == 0.7435 - 0.742


def test_a_challenger_that_learned_from_newer_months_may_lose_by_the_smaller_margin() -> None:
    rules = GateRules(min_auc_gain=0.002, min_auc_gain_newer_data=-0.005)
    newer = decide(m(0.738), m(0.742), BASELINES, rules, newer_months=["2013-07"])
    assert newer.passed and "(-0.0040 ≥ -0.005; it learns from 2013-07" in newer.reason
    too_far = decide(m(0.736), m(0.742), BASELINES, rules, newer_months=["2013-07"])
    assert not too_far.passed and "-0.005 required" in too_far.reason
    same_data = decide(m(0.741), m(0.742), BASELINES, rules, newer_months=[])
    assert not same_data.passed and "0.002 required; no month the champion" in same_data.reason


def test_sanity_checks_come_first() -> None:
    nan = decide(m(0.9, nan=3), None, BASELINES, RULES)
    assert not nan.passed and "NaN" in nan.reason
    uncalibrated = decide(m(0.9, calibration=0.2), m(0.7), BASELINES, RULES)
    assert not uncalibrated.passed and "calibration error 0.2000" in uncalibrated.reason
    assert uncalibrated.details["auc_gain"] == 0.9 - 0.7  # what the rule cost, in the UI too
    undefined = decide(m(math.nan), m(0.7), BASELINES, RULES)
    assert not undefined.passed and "one class" in undefined.reason


def test_leakage_into_the_frozen_set_is_refused() -> None:
    decision = decide(m(0.9), m(0.7), BASELINES, RULES, overlap_months=["2013-06"])
    assert not decision.passed and "2013-06" in decision.reason


def test_a_champion_that_trained_on_the_frozen_set_is_no_fair_comparison() -> None:
    decision = decide(m(0.9), m(0.7), BASELINES, RULES, champion_overlap_months=["2013-06"])
    assert not decision.passed and "champion was trained" in decision.reason
    assert "2013-06" in decision.reason


def test_the_champion_itself_passes_without_change() -> None:
    decision = decide(m(0.74), None, BASELINES, RULES, same_model=True)
    assert decision.passed and "already the champion" in decision.reason


def test_no_pickle_anywhere_in_the_project() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    banned = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve"}
    # The one exception builds pickles to prove that they are refused and never unpickled.
    allowed = {root / "tests" / "reliability" / "test_security.py"}
    offenders = []
    for path in root.glob("*/**/*.py"):
        if ".venv" in path.parts or path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in banned]
    assert offenders == []
