"""The numpy metrics used by the bootstraps agree with scikit-learn's, ties included."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from saefeat.evaluation.metrics import average_precision, balanced_accuracy, classification_report, f1, roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    scores = np.round(rng.random(n) + 0.3 * y, 1)  # rounded: many tied scores
    pred = (scores > 0.6).astype(int)
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores))
    for positive in (0, 1):
        target = y == positive
        assert average_precision(target, scores) == pytest.approx(average_precision_score(target, scores))
        assert f1(y, pred, positive) == pytest.approx(f1_score(y, pred, pos_label=positive))
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert f1(y, np.full(n, 1 - y[0]), y[0]) == pytest.approx(f1_score(y, np.full(n, 1 - y[0]), pos_label=y[0],
                                                                         zero_division=0))


def test_report_intervals_hold_the_point_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    scores = rng.random(300) * 0.5 + 0.4 * y
    report = classification_report(y, scores, n_boot=200)
    for name in ("roc_auc", "pr_auc", "balanced_accuracy", "minority_f1"):
        assert report[f"{name}_lo"] <= report[name] <= report[f"{name}_hi"]
    assert report["roc_auc"] == pytest.approx(roc_auc_score(y, scores))
