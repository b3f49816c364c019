"""Choosing ERM's L2 and DBR's λ on in-domain data only, and the accuracy report of a fitted model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from saefeat.errors import SaefeatError
from saefeat.evaluation.metrics import bootstrap

SELECT_ON = ("dev", "train_slice", "both")


def stratified_slice(y: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a stratified random `fraction` of rows (at least one per class)."""
    if not 0 < fraction < 1:
        raise SaefeatError(f"select.train_slice must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        out += rng.choice(idx, max(1, round(fraction * len(idx))), replace=False).tolist()
    return np.sort(np.array(out, dtype=np.int64))


def accuracy_report(y_true: np.ndarray, y_pred: np.ndarray, prefix: str, n_boot: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """`<prefix>_accuracy` with its bootstrap 95% interval (`_lo`, `_hi`)."""
    acc = {f"{prefix}_accuracy": lambda y, a, b: float(np.mean(y == b))}
    y = np.asarray(y_true)
    return bootstrap(acc, y, np.asarray(y_pred), np.asarray(y_pred), n_boot=n_boot, seed=seed)


@dataclass
class Selection:
    """What was tried on the selection data and what was chosen."""

    value: float | None
    scores: dict[float, float] = field(default_factory=dict)
    reference: float = float("nan")


def choose_best(scores: dict[float, float]) -> Selection:
    """The value with the highest selection accuracy (the first of ties, in the given order)."""
    best = max(scores, key=lambda k: scores[k])
    return Selection(best, dict(scores), scores[best])


def choose_largest_within(scores: dict[float, float], reference: float, tolerance: float) -> Selection:
    """The largest value whose accuracy is within `tolerance` of `reference` (else the most accurate one).

    Used for λ: the strongest regularization that costs at most `tolerance` in-domain accuracy.
    """
    ok = [v for v, s in scores.items() if s >= reference - tolerance - 1e-12]
    value = max(ok) if ok else max(scores, key=lambda k: scores[k])
    return Selection(value, dict(scores), reference)


def selection_accuracy(predict: Callable[[str], np.ndarray], targets: dict[str, np.ndarray],
                       parts: Sequence[str]) -> float:
    """Accuracy pooled over the selection parts (e.g. the held-out training slice and the original dev set)."""
    hits = np.concatenate([predict(p) == targets[p] for p in parts])
    return float(hits.mean())
