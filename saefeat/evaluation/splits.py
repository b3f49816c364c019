"""Temporal splits and grouped time-series cross-validation (no call's future leaks into its past)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from saefeat.errors import SaefeatError


def temporal_split(dates: pd.Series, groups: pd.Series | None = None, test_per_group: int | None = None,
                   test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test): the last `test_per_group` rows of each group by date, else the latest fraction."""
    d = pd.to_datetime(dates).reset_index(drop=True)
    if test_per_group is not None:
        if groups is None:
            raise SaefeatError("test_per_group needs a group field (e.g. ticker)")
        g = groups.reset_index(drop=True)
        rank = d.groupby(g).rank(method="first", ascending=False)
        test = (rank <= test_per_group).to_numpy()
    else:
        cutoff = d.quantile(1 - test_fraction)
        test = (d > cutoff).to_numpy()
    idx = np.arange(len(d))
    return idx[~test], idx[test]


def random_split(n: int, test_fraction: float, seed: int, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random split (only when a user asks for one; earnings data defaults to temporal)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    return np.sort(train), np.sort(test)


class GroupedTimeSeriesSplit:
    """Expanding-window CV over time: folds are consecutive blocks of distinct dates, and every training
    fold lies strictly before its validation fold, so rows sharing a date never straddle the boundary."""

    def __init__(self, n_splits: int = 4):
        self.n_splits = n_splits

    def split(self, X, y=None, groups=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if groups is None:
            raise SaefeatError("GroupedTimeSeriesSplit needs groups= (the dates of the rows)")
        dates = pd.to_datetime(pd.Series(np.asarray(groups)))
        unique = np.sort(dates.unique())
        blocks = np.array_split(unique, self.n_splits + 1)
        for i in range(1, self.n_splits + 1):
            val_dates = blocks[i]
            train = np.flatnonzero(dates < val_dates[0])
            val = np.flatnonzero(dates.isin(val_dates))
            if len(train) and len(val):
                yield train, val

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits
