"""The training functions on real January flights: what the search and the parameter reuse
return is the model a fixed-round fit of their choice grows, with no second fit."""

from __future__ import annotations

import numpy as np
import pytest

from mlops_assets.train.model import Matrix, SearchSettings, fit, fit_with_params, search
from tests.realdata import January, valid_table

SETTINGS = SearchSettings(n_trials=3, seed=13, num_threads=1, max_rounds=120)


@pytest.fixture(scope="module")
def january() -> January:
    return January(valid_table("flights", 1), valid_table("weather", 1), valid_table("planes"))


@pytest.fixture(scope="module")
def split(january: January) -> tuple[Matrix, Matrix]:
    return january.matrix((1, 20)), january.matrix((21, 31))


def _trees(model_text: str) -> str:
    return model_text[model_text.index("Tree=0") : model_text.index("end of trees")]


def _is_the_fixed_round_fit(result, train: Matrix, valid: Matrix) -> None:
    assert result.booster.num_trees() == result.best_iteration
    again = fit(result.params, train, result.best_iteration, seed=SETTINGS.seed, num_threads=1)
    assert _trees(result.booster.model_to_string()) == _trees(again.model_to_string())
    np.testing.assert_array_equal(result.booster.predict(valid.x), again.predict(valid.x))


def test_the_search_returns_its_best_trial_s_model_cut_at_its_best_round(split) -> None:
    train, valid = split
    result = search(train, valid, SETTINGS)
    assert result.trials.height == 3
    completed = result.trials.filter(result.trials["state"] == "COMPLETE")
    best = completed.sort("valid_auc", descending=True, maintain_order=True).row(0, named=True)
    assert result.best_iteration == best["rounds"] and result.best_valid_auc == best["valid_auc"]
    _is_the_fixed_round_fit(result, train, valid)
    # Seeded: the same inputs choose the same model.
    assert search(train, valid, SETTINGS).booster.model_to_string() == (
        result.booster.model_to_string()
    )


def test_reused_parameters_early_stop_and_return_that_model(split) -> None:
    train, valid = split
    champion = {"learning_rate": 0.2, "num_leaves": 31, "min_child_samples": 50,
                "feature_fraction": 0.8, "bagging_fraction": 0.8, "lambda_l2": 1.0,
                "cat_smooth": 10.0, "objective": "binary", "num_boost_round": 999}  # fmt: skip
    result = fit_with_params(champion, train, valid, SETTINGS)
    assert "objective" not in result.params and "num_boost_round" not in result.params
    assert 1 <= result.best_iteration < SETTINGS.max_rounds
    _is_the_fixed_round_fit(result, train, valid)
