"""Time-based train/validation/test splits: whole months, never shuffled across time."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class MonthSplit:
    train: list[str]
    valid: list[str]
    test: list[str]

    def of(self, month: str) -> str:
        for name in SPLITS:
            if month in getattr(self, name):
                return name
        raise KeyError(month)


def split_months(
    months: list[str], *, valid_months: int, test_months: int, train_window: int | None = None
) -> MonthSplit:
    """The latest ``test_months`` are test, the ``valid_months`` before them validation, and
    the rest (at most ``train_window`` months, the most recent ones) training."""
    ordered = sorted(set(months))
    if valid_months < 1 or test_months < 1:
        raise ValueError("valid_months and test_months must be at least 1")
    if len(ordered) < valid_months + test_months + 1:
        raise ValueError(
            f"{len(ordered)} month(s) available ({ordered}); a time split needs at least "
            f"{valid_months + test_months + 1} (training + {valid_months} validation + "
            f"{test_months} test)"
        )
    test = ordered[-test_months:]
    valid = ordered[-test_months - valid_months : -test_months]
    train = ordered[: -test_months - valid_months]
    if train_window is not None:
        train = train[-train_window:]
    return MonthSplit(train=train, valid=valid, test=test)


def assign_splits(
    frame: pl.DataFrame, split: MonthSplit, month_col: str = "month_key"
) -> pl.DataFrame:
    """Add a ``split`` column; rows of months outside every split are dropped."""
    lookup = {m: name for name in SPLITS for m in getattr(split, name)}
    return frame.filter(pl.col(month_col).is_in(list(lookup))).with_columns(
        pl.col(month_col).replace_strict(lookup, return_dtype=pl.String).alias("split")
    )
