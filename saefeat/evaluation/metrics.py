"""Classification and regression metrics, each with a bootstrap 95% interval.

The binary classification metrics are computed with numpy rather than through `sklearn.metrics`: a bootstrap
calls them thousands of times, and scikit-learn's input validation then costs far more than the arithmetic
(35 s of a 2-minute earnings run). `tests/test_metrics.py` checks them against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import mean_absolute_error

from saefeat.errors import SaefeatError

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


def minority_label(y: np.ndarray) -> int:
    values, counts = np.unique(y, return_counts=True)
    return int(values[np.argmin(counts)])


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of binary labels (1 = positive) as the Mann-Whitney statistic; ties count one half."""
    pos = np.asarray(y) == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((rankdata(scores)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(target: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the step precision-recall curve) of boolean `target` ranked by `scores`."""
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, t = np.asarray(scores)[order], np.asarray(target, dtype=bool)[order]
    tp, fp = np.cumsum(t), np.cumsum(~t)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # one point per distinct threshold
    tp, fp = tp[last], fp[last]
    if not len(tp) or tp[-1] == 0:
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, tp / tp[-1]]) * tp / (tp + fp)))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in `y`."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def f1(y: np.ndarray, pred: np.ndarray, positive: int) -> float:
    """F1 of class `positive` (0 when it is never predicted nor present)."""
    tp = int(np.sum((pred == positive) & (y == positive)))
    wrong = int(np.sum((pred == positive) != (y == positive)))
    return 2 * tp / (2 * tp + wrong) if tp or wrong else 0.0


def _classification_metrics(minority: int) -> dict[str, Metric]:
    return {
        "roc_auc": lambda y, s, p: roc_auc(y, s),
        "pr_auc": lambda y, s, p: average_precision(y == minority, s if minority == 1 else -s),
        "balanced_accuracy": lambda y, s, p: balanced_accuracy(y, p),
        "minority_f1": lambda y, s, p: f1(y, p, minority),
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
        raise SaefeatError("the evaluation labels hold one class only; ROC-AUC is undefined")
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
