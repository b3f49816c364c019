"""Earnings-call tables: validated loading and the temporal train/test split (the earnings task and the SAE probes
read the calls through these)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from saefeat.data import DataError, read_table
from saefeat.evaluation.splits import random_split, temporal_split

SPLITS = ("temporal", "random")


def load_calls(path: str | Path, text_field: str = "text", label_field: str = "surprise_label",
               date_field: str = "report_date", group_field: str | None = "ticker",
               target_field: str | None = None) -> pd.DataFrame:
    """Read and validate the calls: 0/1 labels, parseable dates, non-empty texts and a numeric target (when named).

    Every problem is reported at once with its rows (a DataError), before any embedding work; the returned frame
    has the label as int, the date as datetime and the target as float.
    """
    cols = [text_field, label_field, date_field] + [c for c in (group_field, target_field) if c]
    df = read_table(path, cols).reset_index(drop=True)
    problems = []

    def rows(mask) -> str:
        bad = np.flatnonzero(np.asarray(mask))
        return ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")

    label = pd.to_numeric(df[label_field], errors="coerce")
    if label.isna().any():
        problems.append(f"field {label_field!r} is missing or not numeric in rows {rows(label.isna())}")
    elif not label.isin([0, 1]).all():
        problems.append(f"field {label_field!r} must be 0/1; rows {rows(~label.isin([0, 1]))} are not")
    dates = pd.to_datetime(df[date_field], errors="coerce")
    if dates.isna().any():
        problems.append(f"field {date_field!r} is missing or not a date in rows {rows(dates.isna())}")
    empty = df[text_field].map(lambda t: not isinstance(t, str) or not t.strip())
    if empty.any():
        problems.append(f"field {text_field!r} is empty, whitespace or not text in rows {rows(empty)}")
    if target_field:
        target = pd.to_numeric(df[target_field], errors="coerce")
        if target.isna().any():
            problems.append(f"field {target_field!r} is missing or not numeric in rows {rows(target.isna())}")
        df[target_field] = target
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    df[label_field] = label.astype(int)
    df[date_field] = dates
    return df


def split_calls(df: pd.DataFrame, label_field: str = "surprise_label", date_field: str = "report_date",
                group_field: str | None = "ticker", kind: str = "temporal", test_per_group: int | None = 8,
                test_fraction: float = 0.2, seed: int = 0, source: str = "the calls", cut: str = "global",
                purge_days: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, test): temporal = `saefeat.evaluation.splits.temporal_split` (by default one date cut
    for all groups, test sized `test_per_group` calls per group, or the latest `test_fraction` without groups);
    random = a stratified random split. A split holding one class only is a DataError."""
    y = df[label_field].to_numpy()
    if kind == "temporal":
        groups = df[group_field] if group_field else None
        train, test = temporal_split(df[date_field], groups, test_per_group if groups is not None else None,
                                     float(test_fraction), cut, int(purge_days))
    elif kind == "random":
        train, test = random_split(len(df), float(test_fraction), int(seed), y)
    else:
        raise ValueError(f"split.kind must be one of {', '.join(SPLITS)}, got {kind!r}")
    for name, idx in (("training", train), ("test", test)):
        if len(np.unique(y[idx])) < 2:
            raise DataError(f"{source}: the {name} split holds one class only "
                            f"({label_field}={y[idx][0]}, rows {idx[:10].tolist()}...); change split.*")
    return train, test
