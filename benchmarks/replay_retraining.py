"""Does the retraining loop pay? Replay Jul–Dec 2013 month by month, in one process.

Start with Jan–Jun landed: the pipeline trains its first champion (train / valid / test split
of the landed months, Optuna search with early stopping on valid, the first-model gate on the
test month against the base-rate and logistic baselines). That model, never replaced, is the
*static* baseline. Then for each month m = Jul..Dec:

1. score month m with the model serving at that time and with the static model (month m is
   unseen by both: it has not landed yet);
2. land m and run the policy: split the landed months (train = older months, optionally the
   last ``--window`` of them; valid = the ``--valid-months`` before the test month; test = m),
   train a challenger with early stopping on valid, and gate it against the champion on the
   frozen evaluation set = month m, which neither the challenger nor the champion trained on;
3. if the gate passes, the challenger serves from month m + 1 (``--refit``: its parameters
   and round count refit on train + valid, or on train + valid + test).

The defaults are the pipeline's policy (since session 18): the gate scores the challenger's
parameters and rounds fit on train + valid (``--gate holdout-refit``, what ``challenger_model``
registers), with a -0.005 non-inferiority margin, and what serves is the same refit on every
landed month (``--refit all``, what ``champion_model`` registers). The never-retrained model is
then the first champion refit on Jan–Jun.

The same plain functions as the Dagster assets, no Dagster: ``build_features``,
``split_months``/``assign_splits``, ``Preprocessor``, ``Matrix``/``search``/``fit``,
``binary_metrics``, ``decide``/``GateRules``. Seeded and deterministic; candidate trainings are
cached under ``.mlops/bench/replay`` (keyed by everything that changes the model bytes, the
code of the feature, split and model modules included), so varying only the gate is cheap.

    python -m benchmarks.replay_retraining                      # the pipeline's default policy
    python -m benchmarks.replay_retraining --refit none --gate challenger   # the policy before
    python -m benchmarks.replay_retraining --retrain-params search     # retrains search afresh
    python -m benchmarks.replay_retraining --leaf-refit-decay 0.7      # Booster.refit leaves
    python -m benchmarks.replay_retraining --json .mlops/bench/replay.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from mlops_assets.evaluate.gate import GateRules, decide
from mlops_assets.evaluate.metrics import best_f1_threshold, binary_metrics
from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.splits import assign_splits, split_months
from mlops_assets.features.transform import FEATURE_NAMES, LABEL, build_features
from mlops_assets.monitor.assets import DecayConfig
from mlops_assets.train import model as model_module
from mlops_assets.train.model import (
    Matrix,
    SearchSettings,
    fit,
    fit_with_params,
    search,
)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".mlops" / "bench" / "replay"  # --no-cache: a fresh temporary folder
MONTHS = [f"2013-{m:02d}" for m in range(1, 13)]
FIRST_LANDED = 6  # Jan–Jun
TARGET_MEAN_GAIN = 0.01
MAX_AUC_DROP = DecayConfig().max_auc_drop
TARGET_WORST_MONTH = -0.005
CODE_FILES = (
    REPO / "mlops_assets" / "features" / "transform.py",
    REPO / "mlops_assets" / "features" / "splits.py",
    REPO / "mlops_assets" / "features" / "preprocess.py",
    REPO / "mlops_assets" / "train" / "model.py",
)


@dataclass(frozen=True)
class Policy:
    window: int = 0
    """Train on the most recent ``window`` months before valid; 0 = all of them."""
    valid_months: int = 1
    refit: str = "all"
    """What serves after the gate passes: ``none`` = the challenger as trained; ``train+valid``
    / ``all`` = its params and best round count (scaled by ``refit_rounds_scale``) refit on
    train + valid / on train + valid + test."""
    refit_rounds_scale: float = 1.0
    half_life: float = 0.0
    """Recency weights on training rows: weight 0.5 ** (months before the valid month - 1) /
    half_life); 0 = unweighted."""
    min_auc_gain: float = GateRules.min_auc_gain_newer_data
    """Every retrain here learns from a month the champion has not: the newer-data margin."""
    max_calibration_error: float = GateRules.max_calibration_error
    gate: str = "holdout-refit"
    """What the gate scores on the frozen month: ``challenger`` = the challenger as trained
    (train, early stopping on valid); ``holdout-refit`` = its params and rounds refit on train +
    valid, i.e. the served refit minus the frozen month itself."""
    drop: tuple[str, ...] = ()
    """Features blanked to null everywhere (LightGBM then cannot split on them): a stand-in for
    removing them from the feature function, to try before editing it."""
    retrain_params: str = "champion"
    """Retrains after the first champion: ``champion`` (the loop's default since session 17) =
    no search, the serving champion's parameters with early stopping on valid for the round
    count (``model.fit_with_params``); ``search`` = a fresh Optuna search each time."""
    early_stopping_rounds: int = SearchSettings.early_stopping_rounds
    leaf_refit_decay: float = 0.0
    """> 0: no new trees; each challenger is the first champion's trees with their leaf values
    refit (``Booster.refit``, this ``decay_rate``) on every landed month it did not train on,
    the test month excepted."""
    trigger: str = "always"
    """When a landed month starts a retrain: ``always`` (after every month); ``decay`` = as the
    pipeline's ``retrain_decision`` on decay alone: only when the serving model's AUC on the
    month is more than ``max_auc_drop`` below its validation AUC (the drift trigger is left out:
    it needs the Evidently reports; on 2013 it fires with decay or not at all, see README)."""
    n_trials: int = 6
    seed: int = 13
    num_threads: int = 2


@dataclass
class Candidate:
    name: str
    booster: lgb.Booster
    preprocessor: Preprocessor
    months: dict[str, list[str]]
    params: dict[str, Any]
    rounds: int
    valid_auc: float
    threshold: float
    seconds: float
    cached: bool
    refit_months: list[str] = field(default_factory=list)

    def predict(self, frame: pl.DataFrame) -> np.ndarray:
        return self.booster.predict(Matrix.from_features(frame, self.preprocessor).x)

    def trained_on(self) -> set[str]:
        return set(self.months["train"]) | set(self.months["valid"]) | set(self.refit_months)


def load_features() -> pl.DataFrame:
    """All 2013 labelled features, through the project's validation and feature function."""
    from tests.realdata import valid_table

    features = build_features(valid_table("flights"), valid_table("weather"), valid_table("planes"))
    return features.filter(pl.col(LABEL).is_not_null())


def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in CODE_FILES:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _weights(frame: pl.DataFrame, valid_month: str, half_life: float) -> np.ndarray | None:
    if half_life <= 0:
        return None
    index = {m: i for i, m in enumerate(MONTHS)}
    age = frame.get_column("month_key").replace_strict(index, return_dtype=pl.Int64)
    age = index[valid_month] - 1 - age.to_numpy()
    return np.power(0.5, age / half_life)


class _Weighted:
    """Row weights for ``search``/``fit``: ``model.dataset`` wrapped for one call."""

    def __init__(self, weights: np.ndarray | None) -> None:
        self.weights = weights
        self.original = model_module.dataset

    def __enter__(self) -> None:
        if self.weights is None:
            return
        weights, original = self.weights, self.original

        def dataset(m: Matrix, reference: lgb.Dataset | None = None) -> lgb.Dataset:
            ds = original(m, reference)
            if reference is None and len(m.y) == len(weights):
                ds.set_weight(weights)
            return ds

        model_module.dataset = dataset

    def __exit__(self, *exc: object) -> None:
        model_module.dataset = self.original


def _cache_key(
    policy: Policy, months: dict[str, list[str]], kind: str, params: dict[str, Any] | None = None
) -> str:
    payload = {
        "kind": kind,
        "months": months,
        "half_life": policy.half_life,
        "drop": sorted(policy.drop),
        "n_trials": policy.n_trials,
        "seed": policy.seed,
        "num_threads": policy.num_threads,
        "rounds_scale": policy.refit_rounds_scale if kind == "refit" else None,
        "code": _code_hash(),
    }
    if params is not None:  # no search: these parameters, early stopping for the rounds
        payload["fixed_params"] = params
    if policy.early_stopping_rounds != SearchSettings.early_stopping_rounds:
        payload["early_stopping_rounds"] = policy.early_stopping_rounds
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def train_candidate(
    name: str,
    features: pl.DataFrame,
    landed: list[str],
    policy: Policy,
    params: dict[str, Any] | None = None,
) -> Candidate:
    """The pipeline's training_set + challenger_model on the landed months."""
    split = split_months(
        landed, valid_months=policy.valid_months, test_months=1, train_window=policy.window or None
    )
    frame = assign_splits(features.filter(pl.col("month_key").is_in(landed)), split)
    train = frame.filter(pl.col("split") == "train")
    valid = frame.filter(pl.col("split") == "valid")
    preprocessor = Preprocessor.fit(train)
    months = {"train": split.train, "valid": split.valid, "test": split.test}
    key = _cache_key(policy, months, "search", params)
    path = CACHE / f"{key}.json"
    valid_m = Matrix.from_features(valid, preprocessor)
    if path.exists():
        stored = json.loads(path.read_text())
        booster = lgb.Booster(model_str=stored["model"])
        params, rounds, valid_auc = stored["params"], stored["rounds"], stored["valid_auc"]
        seconds, cached = stored["seconds"], True
    else:
        settings = SearchSettings(
            n_trials=policy.n_trials, seed=policy.seed, num_threads=policy.num_threads,
            early_stopping_rounds=policy.early_stopping_rounds,
        )  # fmt: skip
        train_m = Matrix.from_features(train, preprocessor)
        with _Weighted(_weights(train, split.valid[0], policy.half_life)):
            result = (
                search(train_m, valid_m, settings)
                if params is None
                else fit_with_params(params, train_m, valid_m, settings)
            )
        booster, params, rounds = result.booster, result.params, result.best_iteration
        valid_auc, seconds, cached = result.best_valid_auc, result.seconds, False
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = {"model": booster.model_to_string(), "params": params, "rounds": rounds,
                  "valid_auc": valid_auc, "seconds": seconds}  # fmt: skip
        path.write_text(json.dumps(stored))
    threshold = best_f1_threshold(valid_m.y, booster.predict(valid_m.x))
    return Candidate(name, booster, preprocessor, months, params, rounds, valid_auc, threshold,
                     seconds, cached)  # fmt: skip


def refit_candidate(
    candidate: Candidate, features: pl.DataFrame, policy: Policy, *, with_test: bool = True
) -> Candidate:
    """The challenger's params and round count refit on train + valid (+ test)."""
    splits = ("train", "valid", "test") if with_test else ("train", "valid")
    refit_months = sorted({m for s in splits for m in candidate.months[s]})
    frame = features.filter(pl.col("month_key").is_in(refit_months))
    preprocessor = Preprocessor.fit(frame)
    rounds = max(1, round(candidate.rounds * policy.refit_rounds_scale))
    key = _cache_key(policy, {**candidate.months, "refit": refit_months}, "refit")
    path = CACHE / f"{key}.json"
    started = time.perf_counter()
    if path.exists():
        booster, cached = lgb.Booster(model_str=json.loads(path.read_text())["model"]), True
    else:
        matrix = Matrix.from_features(frame, preprocessor)
        next_month = [*MONTHS, "2014-01"][MONTHS.index(refit_months[-1]) + 1]
        with _Weighted(_weights(frame, next_month, policy.half_life)):
            booster = fit(candidate.params, matrix, rounds, seed=policy.seed,
                          num_threads=policy.num_threads)  # fmt: skip
        cached = False
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": booster.model_to_string()}))
    suffix = "r" if with_test else "h"
    return Candidate(
        f"{candidate.name}{suffix}", booster, preprocessor, candidate.months, candidate.params,
        rounds, candidate.valid_auc, candidate.threshold, time.perf_counter() - started, cached,
        refit_months=refit_months,
    )  # fmt: skip


def leaf_refit_candidate(
    name: str, base: Candidate, features: pl.DataFrame, landed: list[str], policy: Policy
) -> Candidate:
    """``base``'s trees, leaf values refit on the landed months it did not train on (not m)."""
    started = time.perf_counter()
    split = split_months(landed, valid_months=policy.valid_months, test_months=1)
    refit_months = sorted(set(split.train + split.valid) - set(base.months["train"]))
    matrix = Matrix.from_features(
        features.filter(pl.col("month_key").is_in(refit_months)), base.preprocessor
    )
    booster = base.booster.refit(matrix.x, matrix.y, decay_rate=policy.leaf_refit_decay)
    months = {"train": split.train, "valid": split.valid, "test": split.test}
    return Candidate(name, booster, base.preprocessor, months, base.params, base.rounds,
                     base.valid_auc, base.threshold, time.perf_counter() - started, False,
                     refit_months=refit_months)  # fmt: skip


def _metrics(candidate: Candidate, frame: pl.DataFrame) -> dict[str, float]:
    y = frame.get_column(LABEL).cast(pl.Float64).to_numpy()
    return binary_metrics(y, candidate.predict(frame), candidate.threshold)


def _baselines(candidate: Candidate, features: pl.DataFrame, frozen: pl.DataFrame):
    from sklearn.linear_model import LogisticRegression

    train = features.filter(pl.col("month_key").is_in(candidate.months["train"]))
    y = frozen.get_column(LABEL).cast(pl.Float64).to_numpy()
    base_rate = float(train.get_column(LABEL).mean())
    linear = LogisticRegression(C=1.0, max_iter=500, random_state=0)
    linear.fit(candidate.preprocessor.transform_linear(train), train.get_column(LABEL).to_numpy())
    p_linear = linear.predict_proba(candidate.preprocessor.transform_linear(frozen))[:, 1]
    return {
        "base_rate": binary_metrics(y, np.full(len(y), base_rate), candidate.threshold),
        "logistic": binary_metrics(y, p_linear, candidate.threshold),
    }


def _blank(features: pl.DataFrame, drop: tuple[str, ...]) -> pl.DataFrame:
    unknown = set(drop) - set(FEATURE_NAMES)
    if unknown:
        raise SystemExit(f"--drop: not features: {sorted(unknown)}")
    return features.with_columns(pl.lit(None, dtype=features.schema[c]).alias(c) for c in drop)


def replay(policy: Policy, features: pl.DataFrame, log: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    features = _blank(features, policy.drop)
    by_month = {m: features.filter(pl.col("month_key") == m) for m in MONTHS}
    rules = GateRules(
        min_auc_gain=policy.min_auc_gain,
        min_auc_gain_newer_data=policy.min_auc_gain,
        max_calibration_error=policy.max_calibration_error,
    )
    landed = MONTHS[:FIRST_LANDED]

    def gated(candidate: Candidate) -> Candidate:
        if policy.gate == "holdout-refit":
            return refit_candidate(candidate, features, policy, with_test=False)
        return candidate

    first = train_candidate("v1", features, landed, policy)
    frozen = by_month[first.months["test"][0]]
    first_metrics = _metrics(gated(first), frozen)
    decision = decide(first_metrics, None, _baselines(first, features, frozen), rules)
    if not decision.passed:
        raise SystemExit(f"the first model was rejected: {decision.reason}")

    def served(candidate: Candidate) -> Candidate:
        if policy.refit == "none":
            return candidate
        with_test = policy.refit == "all"
        return refit_candidate(candidate, features, policy, with_test=with_test)

    first = served(first)
    if log:
        print(f"first champion {first.name}: {decision.reason}", flush=True)
    static = champion = first
    # The pipeline's first champion as it is made today (no refit, all months, one valid month),
    # shown next to the policy's own static model for reference.
    today = Policy(drop=policy.drop, n_trials=policy.n_trials, seed=policy.seed,
                   num_threads=policy.num_threads)  # fmt: skip
    reference = (
        train_candidate("ref", features, MONTHS[:FIRST_LANDED], today)
        if policy.refit != "none"
        or policy.window
        or policy.valid_months != 1
        or policy.half_life
        or policy.early_stopping_rounds != today.early_stopping_rounds
        else static
    )
    rows = []
    for index, month in enumerate(MONTHS[FIRST_LANDED:], start=FIRST_LANDED):
        rows.append(
            {
                "month": month,
                "static_auc": _metrics(static, by_month[month])["auc"],
                "pipeline_v1_auc": _metrics(reference, by_month[month])["auc"],
                "serving_auc": _metrics(champion, by_month[month])["auc"],
                "serving": champion.name,
                "serving_train_months": sorted(champion.trained_on()),
                # The pipeline's decay signal (retrain_decision): the serving model's validation
                # AUC minus its AUC on m. The replay retrains after every month regardless.
                "auc_drop": champion.valid_auc - _metrics(champion, by_month[month])["auc"],
            }
        )
        landed = MONTHS[: index + 1]
        if month == MONTHS[-1]:
            rows[-1]["gate"] = "-"
            break
        if policy.trigger == "decay" and rows[-1]["auc_drop"] <= MAX_AUC_DROP:
            rows[-1]["gate"] = f"no retrain (drop {rows[-1]['auc_drop']:+.4f})"
            if log:
                print(f"  {month}: {rows[-1]['gate']}", flush=True)
            continue
        params = champion.params if policy.retrain_params == "champion" else None
        name = f"v{index - FIRST_LANDED + 2}"
        challenger = (
            leaf_refit_candidate(name, static, features, landed, policy)
            if policy.leaf_refit_decay > 0
            else train_candidate(name, features, landed, policy, params)
        )
        # The frozen set is month m: the gate refuses it if either model trained on it.
        scored = gated(challenger)
        overlap = [month] if month in scored.trained_on() | champion.trained_on() else []
        c_metrics = _metrics(scored, by_month[month])
        p_metrics = _metrics(champion, by_month[month])
        # What would serve next learns from (the refit on all landed months learns m too).
        learns = scored.trained_on() | ({month} if policy.refit == "all" else set())
        decision = decide(c_metrics, p_metrics, {}, rules, overlap_months=overlap,
                          newer_months=sorted(learns - champion.trained_on()))  # fmt: skip
        rows[-1] |= {
            "gate": f"{challenger.name} {'PROMOTE' if decision.passed else 'reject'} "
            f"({decision.details.get('auc_gain', math.nan):+.4f}"
            f"{', calibration' if 'calibration error' in decision.reason else ''})",
            "challenger": challenger.name,
            "challenger_months": challenger.months,
            "gate_passed": decision.passed,
            "gate_reason": decision.reason,
            "challenger_frozen_auc": c_metrics["auc"],
            "champion_frozen_auc": p_metrics["auc"],
            "search_seconds": round(challenger.seconds, 1),
            "cached": challenger.cached,
        }
        if log:
            print(f"  {month}: {rows[-1]['gate']}  search {challenger.seconds:.0f}s"
                  f"{' (cached)' if challenger.cached else ''}", flush=True)  # fmt: skip
        if decision.passed:
            champion = served(challenger)
    diffs = [r["serving_auc"] - r["static_auc"] for r in rows]
    worst = min(range(len(rows)), key=lambda i: diffs[i])
    mean_gain = float(np.mean(diffs))
    return {
        "policy": asdict(policy),
        "rows": rows,
        "mean_static_auc": float(np.mean([r["static_auc"] for r in rows])),
        "mean_serving_auc": float(np.mean([r["serving_auc"] for r in rows])),
        "mean_diff": mean_gain,
        "worst_month": rows[worst]["month"],
        "worst_diff": diffs[worst],
        "target_met": mean_gain >= TARGET_MEAN_GAIN and diffs[worst] >= TARGET_WORST_MONTH,
        "seconds": round(time.perf_counter() - started, 1),
    }


def print_report(result: dict[str, Any]) -> None:
    print("\npolicy:", json.dumps(result["policy"]))
    print(f"{'month':<8} | {'static AUC':>10} | {'serving AUC':>11} | {'diff':>7} | serving "
          "| gate after landing m (vs champion, on m) | today's v1 AUC")  # fmt: skip
    print("-" * 118)
    for r in result["rows"]:
        diff = r["serving_auc"] - r["static_auc"]
        print(f"{r['month']:<8} | {r['static_auc']:>10.4f} | {r['serving_auc']:>11.4f} | "
              f"{diff:>+7.4f} | {r['serving']:<7} | {r['gate']:<32} | "
              f"{r['pipeline_v1_auc']:.4f}")  # fmt: skip
    print("-" * 118)
    print(f"{'mean':<8} | {result['mean_static_auc']:>10.4f} | {result['mean_serving_auc']:>11.4f}"
          f" | {result['mean_diff']:>+7.4f} |")  # fmt: skip
    decayed = [r["month"] for r in result["rows"] if r["auc_drop"] > MAX_AUC_DROP]
    retrains = ("after every month" if result["policy"]["trigger"] == "always"
                else "only after those months")  # fmt: skip
    print(f"AUC drop > {MAX_AUC_DROP} (the pipeline's decay trigger; drift can trigger too): "
          f"{', '.join(decayed) or 'no month'}; the replay retrains {retrains}")  # fmt: skip
    print(
        f"worst month {result['worst_month']} {result['worst_diff']:+.4f}; target (mean ≥ "
        f"+{TARGET_MEAN_GAIN}, no month < {TARGET_WORST_MONTH}): "
        f"{'MET' if result['target_met'] else 'NOT met'}; replay {result['seconds']}s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=0, help="training months (0 = all)")
    parser.add_argument("--valid-months", type=int, default=1)
    parser.add_argument("--refit", choices=["none", "train+valid", "all"], default="all")
    parser.add_argument("--refit-rounds-scale", type=float, default=1.0)
    parser.add_argument("--half-life", type=float, default=0.0, help="recency weights (months)")
    parser.add_argument("--min-auc-gain", type=float, default=GateRules.min_auc_gain_newer_data)
    parser.add_argument(
        "--max-calibration-error", type=float, default=GateRules.max_calibration_error
    )
    parser.add_argument("--gate", choices=["challenger", "holdout-refit"], default="holdout-refit")
    parser.add_argument("--drop", default="", help="comma-separated features to blank")
    parser.add_argument("--retrain-params", choices=["search", "champion"], default="champion")
    parser.add_argument(
        "--early-stopping-rounds", type=int, default=SearchSettings.early_stopping_rounds
    )
    parser.add_argument("--leaf-refit-decay", type=float, default=0.0)
    parser.add_argument("--trigger", choices=["always", "decay"], default="always")
    parser.add_argument("--n-trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--no-cache", action="store_true", help="train everything afresh")
    args = parser.parse_args(argv)
    policy = Policy(
        window=args.window,
        valid_months=args.valid_months,
        refit=args.refit,
        refit_rounds_scale=args.refit_rounds_scale,
        half_life=args.half_life,
        min_auc_gain=args.min_auc_gain,
        max_calibration_error=args.max_calibration_error,
        gate=args.gate,
        drop=tuple(d for d in args.drop.split(",") if d),
        retrain_params=args.retrain_params,
        early_stopping_rounds=args.early_stopping_rounds,
        leaf_refit_decay=args.leaf_refit_decay,
        trigger=args.trigger,
        n_trials=args.n_trials,
        seed=args.seed,
        num_threads=args.num_threads,
    )
    if args.no_cache:
        import tempfile

        global CACHE
        CACHE = Path(tempfile.mkdtemp(prefix="replay-"))
    started = time.perf_counter()
    result = replay(policy, load_features())
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    if args.no_cache:
        import shutil

        shutil.rmtree(CACHE, ignore_errors=True)
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
