"""Temporal splits and grouped time-series cross-validation (no call's future leaks into its past)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from saefeat.errors import SaefeatError

CUTS = ("global", "per_group")


def temporal_split(dates: pd.Series, groups: pd.Series | None = None, test_per_group: int | None = None,
                   test_fraction: float = 0.2, cut: str = "global",
                   purge_days: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test) in time.

    `cut="global"`: one date cut for every row; the test set is every row on or after it, sized like
    `test_per_group` rows per group (or the latest `test_fraction` of rows), and training rows within `purge_days`
    before the cut are dropped, so no training row is later than a test row. `cut="per_group"`: the last
    `test_per_group` rows of each group by its own dates (a training row of one group can be later than a test row
    of another).
    """
    if cut not in CUTS:
        raise SaefeatError(f"split.cut must be one of {', '.join(CUTS)}, got {cut!r}")
    if purge_days < 0:
        raise SaefeatError(f"split.purge_days must be >= 0, got {purge_days}")
    d = pd.to_datetime(dates).reset_index(drop=True)
    idx = np.arange(len(d))
    if test_per_group is not None and groups is None:
        raise SaefeatError("test_per_group needs a group field (e.g. ticker)")
    if cut == "per_group" and test_per_group is not None:
        rank = d.groupby(groups.reset_index(drop=True)).rank(method="first", ascending=False)
        test = (rank <= test_per_group).to_numpy()
        return idx[~test], idx[test]
    n_test = test_per_group * groups.nunique() if test_per_group is not None else round(test_fraction * len(d))
    if not 0 < n_test < len(d):
        raise SaefeatError(f"a temporal split of {len(d)} rows cannot hold {n_test} test rows; change split.*")
    cutoff = d.sort_values(ascending=False).iloc[n_test - 1]  # the test set: every row on or after this date
    test = (d >= cutoff).to_numpy()
    train = (d < cutoff - pd.Timedelta(days=purge_days)).to_numpy()
    if not train.any():
        raise SaefeatError(f"the temporal cut at {cutoff.date()} leaves no training rows; change split.*")
    return idx[train], idx[test]


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
        if len(unique) < self.n_splits + 1:
            raise SaefeatError(f"time-series CV with {self.n_splits} folds needs at least {self.n_splits + 1} distinct "
                               f"dates in the training rows, got {len(unique)}; lower cv.n_splits")
        blocks = np.array_split(unique, self.n_splits + 1)
        for i in range(1, self.n_splits + 1):
            val_dates = blocks[i]
            train = np.flatnonzero(dates < val_dates[0])
            val = np.flatnonzero(dates.isin(val_dates))
            if len(train) and len(val):
                yield train, val

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return self.n_splits
