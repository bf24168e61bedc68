"""LightGBM training with an Optuna search: plain functions on model-ready matrices."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightgbm as lgb
import numpy as np
import optuna
import polars as pl
from optuna_integration import LightGBMPruningCallback

from mlops_assets.features.preprocess import Preprocessor
from mlops_assets.features.transform import CATEGORICAL_FEATURES, FEATURE_NAMES, LABEL

BASE_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": ["auc", "binary_logloss"],
    "deterministic": True,
    "force_row_wise": True,
    "verbosity": -1,
    "bagging_freq": 1,
}


@dataclass(frozen=True)
class SearchSettings:
    n_trials: int = 8
    timeout_seconds: float | None = None
    seed: int = 13
    num_threads: int = 2
    max_rounds: int = 300
    early_stopping_rounds: int = 20


@dataclass(frozen=True)
class Matrix:
    """Model inputs in feature order (categoricals as codes, nulls as NaN) and the label."""

    x: np.ndarray
    y: np.ndarray

    @classmethod
    def from_features(cls, frame: pl.DataFrame, preprocessor: Preprocessor) -> Matrix:
        x = preprocessor.transform(frame).to_numpy(order="c").astype(np.float64, copy=False)
        y = frame.get_column(LABEL).cast(pl.Float64).to_numpy() if LABEL in frame.columns else None
        return cls(x=x, y=y)


@dataclass
class SearchResult:
    params: dict[str, Any]
    best_iteration: int
    best_valid_auc: float
    trials: pl.DataFrame
    booster: lgb.Booster
    seconds: float
    pruned: int = field(default=0)


def dataset(m: Matrix, reference: lgb.Dataset | None = None) -> lgb.Dataset:
    return lgb.Dataset(
        m.x,
        label=m.y,
        feature_name=list(FEATURE_NAMES),
        categorical_feature=list(CATEGORICAL_FEATURES),
        reference=reference,
        free_raw_data=False,
        # Trials change min_child_samples; pre-filtering features would pin the first value.
        params={"verbosity": -1, "feature_pre_filter": False, "max_bin": 63},
    )


def _suggest(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.05, 0.3, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 15, 127, log=True),
        "min_child_samples": trial.suggest_int("min_child_samples", 20, 400, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 30.0, log=True),
        "cat_smooth": trial.suggest_float("cat_smooth", 1.0, 50.0, log=True),
    }


def fit(
    params: dict[str, Any], train: Matrix, rounds: int, *, seed: int, num_threads: int
) -> lgb.Booster:
    """Train with fixed rounds: the same inputs and params give the same model bytes."""
    full = {**BASE_PARAMS, **params, "seed": seed, "num_threads": num_threads}
    return lgb.train(full, dataset(train), num_boost_round=rounds)


def train_early_stopped(
    params: dict[str, Any],
    train_set: lgb.Dataset,
    valid_set: lgb.Dataset,
    settings: SearchSettings,
    callbacks: Sequence[Callable[..., Any]] = (),
) -> lgb.Booster:
    """Train with ``params`` until the validation AUC stops improving (one search trial)."""
    full = {**BASE_PARAMS, **params, "seed": settings.seed, "num_threads": settings.num_threads}
    return lgb.train(
        full,
        train_set,
        num_boost_round=settings.max_rounds,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[
            lgb.early_stopping(settings.early_stopping_rounds, first_metric_only=True,
                               verbose=False),
            *callbacks,
        ],
    )  # fmt: skip


def search(train: Matrix, valid: Matrix, settings: SearchSettings) -> SearchResult:
    """Optuna TPE search with pruning and early stopping on the validation split; the result's
    booster is the best trial's, cut at its best round (the trees a fixed-round fit of the same
    parameters grows: training is deterministic and the validation split never changes it)."""
    started = time.perf_counter()
    train_set = dataset(train)
    valid_set = dataset(valid, reference=train_set)
    best_so_far: dict[int, lgb.Booster] = {}  # trial number -> its booster, while it leads

    def objective(trial: optuna.Trial) -> float:
        pruning = LightGBMPruningCallback(trial, "auc", valid_name="valid")
        booster = train_early_stopped(_suggest(trial), train_set, valid_set, settings, [pruning])
        trial.set_user_attr("best_iteration", booster.best_iteration)
        auc = float(booster.best_score["valid"]["auc"])
        if not best_so_far or auc > trial.study.best_value:
            best_so_far.clear()
            best_so_far[trial.number] = booster
        return auc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=20),
    )
    study.optimize(objective, n_trials=settings.n_trials, timeout=settings.timeout_seconds)
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise RuntimeError("the search finished no trial; raise the trial or time budget")
    best = study.best_trial
    rounds = max(1, int(best.user_attrs["best_iteration"]))
    booster = best_so_far.get(best.number) or fit(
        best.params, train, rounds, seed=settings.seed, num_threads=settings.num_threads
    )
    trials = pl.DataFrame(
        [
            {
                "trial": t.number,
                "state": t.state.name,
                "valid_auc": t.value,
                "rounds": t.user_attrs.get("best_iteration"),
                **{k: round(v, 5) if isinstance(v, float) else v for k, v in t.params.items()},
            }
            for t in study.trials
        ]
    )
    return SearchResult(
        params=dict(best.params),
        best_iteration=rounds,
        best_valid_auc=float(best.value),
        trials=trials,
        booster=booster,
        seconds=time.perf_counter() - started,
        pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
    )


TUNED_PARAMS = ("learning_rate", "num_leaves", "min_child_samples", "feature_fraction",
                "bagging_fraction", "lambda_l2", "cat_smooth")  # fmt: skip
"""The parameters the search tunes (``_suggest``): what a retrain can reuse from a champion."""


def fit_with_params(
    params: dict[str, Any], train: Matrix, valid: Matrix, settings: SearchSettings
) -> SearchResult:
    """No search: ``params``' tuned values (a champion's), early stopping on the validation
    split for the round count; the booster cut at that round, as :func:`search`'s."""
    started = time.perf_counter()
    params = {k: v for k, v in params.items() if k in TUNED_PARAMS}
    train_set = dataset(train)
    valid_set = dataset(valid, reference=train_set)
    booster = train_early_stopped(params, train_set, valid_set, settings)
    rounds = max(1, int(booster.best_iteration))
    valid_auc = float(booster.best_score["valid"]["auc"])
    return SearchResult(
        params=dict(params), best_iteration=rounds, best_valid_auc=valid_auc,
        trials=pl.DataFrame({"trial": [0], "state": ["REUSED"], "valid_auc": [valid_auc],
                             "rounds": [rounds]}),
        booster=booster, seconds=time.perf_counter() - started,
    )  # fmt: skip


def predict(model_text: str, x: np.ndarray) -> np.ndarray:
    return lgb.Booster(model_str=model_text).predict(x)
