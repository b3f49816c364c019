"""Classifier pipelines with feature selection fitted inside the training folds only."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from lightgbm import LGBMClassifier, LGBMRegressor
from sklearn.feature_selection import SelectFromModel, SelectKBest, VarianceThreshold, f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, MaxAbsScaler, StandardScaler

from saefeat.errors import SaefeatError

Regularization = float | Sequence[float]


def check_regularization(C: Any, what: str = "C") -> float | tuple[float, ...]:
    """`C` as a float, or a grid of candidate values as a tuple of floats (every value positive)."""
    values = [C] if isinstance(C, (int, float)) else list(C)
    try:
        values = [float(c) for c in values]
    except (TypeError, ValueError):
        raise SaefeatError(f"{what} must be a positive number or a list of them, got {C!r}") from None
    if not values or any(not c > 0 for c in values):
        raise SaefeatError(f"{what} must be a positive number or a non-empty list of them, got {C!r}")
    return values[0] if isinstance(C, (int, float)) else tuple(values)


PENALTIES = ("l1", "l2")


def check_penalty(penalty: Any, what: str = "penalty") -> tuple[str, ...]:
    """`penalty` ("l1", "l2", or a list of them to choose from) as a tuple of names."""
    values = [penalty] if isinstance(penalty, str) else list(penalty)
    if not values or any(p not in PENALTIES for p in values):
        raise SaefeatError(f"{what} must be l1, l2 or a list of them, got {penalty!r}")
    return tuple(dict.fromkeys(values))


def fit_logistic(X, y, C: Regularization = 1.0, *, penalty: str | Sequence[str] = "l2", cv: int = 5,
                 scoring: str = "roc_auc", seed: int = 0, max_iter: int = 2000) -> LogisticRegression:
    """A class-balanced logistic regression fitted on (X, y).

    `C` is a value or a grid; `penalty` is "l2", "l1" (a sparse model: most weights exactly zero, a sparse probe
    of SAE latents) or a list of both. Where there is more than one candidate, the one that scores best
    (`scoring`) in stratified `cv`-fold cross-validation on these rows is refitted on all of them, so each
    representation takes the regularization that suits it; `.C` and `penalty_of` give the values used."""
    C, penalties = check_regularization(C), check_penalty(penalty)
    # scikit-learn >= 1.8 names the penalty by l1_ratio: 1 is L1 (liblinear's exact solver), 0 is L2
    grid = [{"C": [C] if isinstance(C, float) else list(C), "l1_ratio": [1.0 if p == "l1" else 0.0],
             "solver": ["liblinear" if p == "l1" else "lbfgs"]} for p in penalties]
    model = LogisticRegression(max_iter=max_iter, class_weight="balanced")
    if len(penalties) == 1 and isinstance(C, float):
        return model.set_params(**{k: v[0] for k, v in grid[0].items()}).fit(X, y)
    search = GridSearchCV(model, grid, scoring=scoring, refit=True,
                          cv=StratifiedKFold(cv, shuffle=True, random_state=seed))
    return search.fit(X, y).best_estimator_


def penalty_of(model: LogisticRegression) -> str:
    """The penalty ("l1" or "l2") of a `fit_logistic` model."""
    return "l1" if model.l1_ratio == 1 else "l2"


def _lgbm(cls, seed: int, n_jobs: int = 1, **kw):
    return cls(n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=10, subsample=0.8,
               subsample_freq=1, colsample_bytree=0.5, random_state=seed, n_jobs=n_jobs, verbose=-1, **kw)


def _log1p(X):
    if sp.issparse(X):
        X = X.copy()
        X.data = np.log1p(np.maximum(X.data, 0))
        return X
    return np.sign(X) * np.log1p(np.abs(X))


def _half(X) -> int:
    return max(1, X.shape[1] // 2)


def selection_grid(n_features: int, methods: list[str], k_grid: list[int], seed: int) -> list[Any]:
    """Selectors to try: ANOVA SelectKBest(f_classif, k) per k, and tree-based SelectFromModel keeping the half
    of the features above the median importance."""
    out: list[Any] = []
    if "anova" in methods:
        ks = sorted({min(int(k), n_features) for k in k_grid})
        out += [SelectKBest(f_classif, k=k) for k in ks]
    if "tree" in methods:
        # "median" as the top half by importance: with threshold="median" the many zero-importance features of a
        # wide sparse matrix tie at a median of 0 and every feature would pass
        out.append(SelectFromModel(_lgbm(LGBMClassifier, seed, class_weight="balanced"), threshold=-np.inf,
                                   max_features=_half))
    if "none" in methods or not out:
        out.append("passthrough")
    return out


def classifier_search(n_features: int, sparse: bool, classifiers: list[str], selection: list[str],
                      k_grid: list[int], cv, seed: int = 0, log_transform: bool = False,
                      memory: str | None = None, n_jobs: int | None = None) -> GridSearchCV:
    """A grid search (ROC-AUC) over selector x classifier; selection is a pipeline step, so it is refitted
    inside every training fold and never sees validation or test rows. With `memory` (a folder), fitted
    selectors are cached and shared by the classifiers tried on the same fold. `n_jobs` fits candidates in
    parallel processes (-1: all cores); each LightGBM fit itself stays single-threaded."""
    scale = MaxAbsScaler() if sparse else StandardScaler()
    steps = [("log", FunctionTransformer(_log1p, accept_sparse=True) if log_transform else "passthrough"),
             ("scale", scale), ("nonconstant", VarianceThreshold()), ("select", "passthrough"),
             ("clf", "passthrough")]
    selectors = selection_grid(n_features, selection, k_grid, seed)
    grid: list[dict[str, list[Any]]] = []
    if "logreg" in classifiers:
        grid.append({"select": selectors, "clf": [LogisticRegression(class_weight="balanced", max_iter=2000, C=c)
                                                  for c in (0.01, 0.1, 1.0)]})
    if "lightgbm" in classifiers:
        grid.append({"select": selectors, "clf": [_lgbm(LGBMClassifier, seed, class_weight="balanced")]})
    if not grid:
        raise ValueError(f"no known classifier in {classifiers}; valid: logreg, lightgbm")
    # nan, not raise: a validation fold of a small, imbalanced set can hold one class (no ROC-AUC)
    return GridSearchCV(Pipeline(steps, memory=memory), grid, scoring="roc_auc", cv=cv, n_jobs=n_jobs, refit=True,
                        error_score=np.nan)


def fit_search(X, y, dates, *, classifiers: list[str], selection: list[str], k_grid: list[int], n_splits: int = 4,
               seed: int = 0, log_transform: bool = False, n_jobs: int | None = None) -> GridSearchCV:
    """`classifier_search` tuned by grouped time-series CV (`GroupedTimeSeriesSplit` over `dates`) on (X, y), with
    the fitted selectors cached in a temporary folder while it runs; `best_score_` is the mean CV ROC-AUC."""
    from saefeat.evaluation.splits import GroupedTimeSeriesSplit

    with tempfile.TemporaryDirectory(prefix="saefeat-fits-") as memory:
        search = classifier_search(X.shape[1], sp.issparse(X), classifiers, selection, k_grid,
                                   cv=GroupedTimeSeriesSplit(n_splits), seed=seed, log_transform=log_transform,
                                   memory=memory, n_jobs=n_jobs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="k=.*is greater than n_features")
            search.fit(X, y, groups=dates)
        search.best_estimator_.set_params(memory=None)
    return search


def regressor(seed: int = 0, log_transform: bool = False, n_jobs: int = -1) -> Pipeline:
    """LightGBM regression of a continuous target (e.g. the EPS surprise); `n_jobs` LightGBM threads."""
    return Pipeline([("log", FunctionTransformer(_log1p, accept_sparse=True) if log_transform else "passthrough"),
                     ("reg", _lgbm(LGBMRegressor, seed, n_jobs=n_jobs))])


def selected_features(pipeline: Pipeline, n_features: int) -> np.ndarray:
    """Indices of the input features the fitted pipeline kept (non-constant, then selected)."""
    idx = np.arange(n_features)
    for step in ("nonconstant", "select"):
        sel = pipeline.named_steps.get(step, "passthrough")
        if sel != "passthrough":
            idx = idx[sel.get_support()]
    return idx


def feature_importance(pipeline: Pipeline, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(feature indices, importance) of the fitted classifier over the selected input features."""
    idx = selected_features(pipeline, n_features)
    clf = pipeline.named_steps["clf"]
    imp = np.abs(clf.coef_).ravel() if hasattr(clf, "coef_") else np.asarray(clf.feature_importances_, float)
    return idx, imp
