"""Classification and regression metrics, each with a bootstrap 95% interval."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    mean_absolute_error,
    roc_auc_score,
)

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def minority_label(y: np.ndarray) -> int:
    values, counts = np.unique(y, return_counts=True)
    return int(values[np.argmin(counts)])


def _classification_metrics(minority: int) -> dict[str, Metric]:
    return {
        "roc_auc": lambda y, s, p: roc_auc_score(y, s),
        "pr_auc": lambda y, s, p: average_precision_score(y == minority, s if minority == 1 else -s),
        "balanced_accuracy": lambda y, s, p: balanced_accuracy_score(y, p),
        "minority_f1": lambda y, s, p: f1_score(y, p, pos_label=minority, zero_division=0),
    }


def bootstrap(metrics: dict[str, Metric], y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 1000,
              seed: int = 0) -> dict[str, float]:
    """Point estimates and percentile 95% intervals (`<name>_lo`, `<name>_hi`) over resampled rows."""
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    samples: dict[str, list[float]] = {name: [] for name in metrics}
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2 and y.dtype.kind in "biu":
            continue  # a resample with one class has no AUC
        for name, fn in metrics.items():
            samples[name].append(fn(y[idx], a[idx], b[idx]))
    for name, fn in metrics.items():
        out[name] = float(fn(y, a, b))
        vals = np.asarray(samples[name])
        out[f"{name}_lo"], out[f"{name}_hi"] = (float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))) \
            if len(vals) else (float("nan"), float("nan"))
    return out


def classification_report(y_true, scores, y_pred=None, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """ROC-AUC, PR-AUC (minority class), balanced accuracy and minority-class F1, with 95% intervals.

    `scores` are scores of class 1; `y_pred` defaults to scores > 0.5.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    p = (s > 0.5).astype(int) if y_pred is None else np.asarray(y_pred).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("the evaluation labels hold one class only; ROC-AUC is undefined")
    return bootstrap(_classification_metrics(minority_label(y)), y, s, p, n_boot, seed)


def regression_report(y_true, y_pred, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Spearman correlation and mean absolute error, with 95% intervals."""
    metrics: dict[str, Metric] = {
        "spearman": lambda y, a, b: float(spearmanr(y, a).statistic),
        "mae": lambda y, a, b: mean_absolute_error(y, a),
    }
    y = np.asarray(y_true, dtype=float)
    pred = np.asarray(y_pred, dtype=float)
    return bootstrap(metrics, y, pred, pred, n_boot, seed)
