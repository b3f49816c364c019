"""Earnings-surprise prediction from call transcripts with SAE features (SAE-FiRE, arXiv 2505.14420).

Each transcript is encoded whole (windowed) and pooled over tokens; features are selected inside the
training folds (ANOVA SelectKBest or tree-based SelectFromModel) and classified with class-weighted
logistic regression or LightGBM, tuned by grouped time-series CV on training calls only. A LightGBM
regression of the surprise itself is reported with Spearman correlation and MAE.
"""

from __future__ import annotations

import logging
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.metrics import roc_curve

from saefeat import earnings
from saefeat.config import baseline_config, embed_config
from saefeat.data import check_texts
from saefeat.evaluation.comparison import TaskRun
from saefeat.evaluation.metrics import classification_report, regression_report
from saefeat.evaluation.model_selection import feature_importance, fit_search, regressor
from saefeat.explain.report import log_latent_report
from saefeat.representations import make_representation

logger = logging.getLogger(__name__)


def load_calls(cfg: DictConfig) -> pd.DataFrame:
    """Read and validate the calls of `data.path` (`saefeat.earnings.load_calls`)."""
    d = cfg.data
    return earnings.load_calls(str(d.path), d.text_field, d.label_field, d.date_field, d.group_field,
                               d.target_field)


def split_calls(df: pd.DataFrame, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
    """The train/test rows of the configured `split` (`saefeat.earnings.split_calls`)."""
    d, s = cfg.data, cfg.split
    return earnings.split_calls(df, d.label_field, d.date_field, d.group_field, str(s.kind), s.test_per_group,
                                float(s.test_fraction), int(cfg.seed), str(d.path), str(s.cut), int(s.purge_days))


def fit_and_score(X_train, y_train, dates_train, X_test, y_test, cfg: DictConfig, log_transform: bool):
    """Tune selection + classifier by grouped time-series CV on the training calls, score the test calls."""
    search = fit_search(X_train, y_train, dates_train, classifiers=list(cfg.classifiers),
                        selection=list(cfg.selection.methods), k_grid=list(cfg.selection.k_grid),
                        n_splits=int(cfg.cv.n_splits), seed=int(cfg.seed), log_transform=log_transform,
                        n_jobs=cfg.n_jobs)
    scores = search.predict_proba(X_test)[:, 1]
    report = classification_report(y_test, scores, search.predict(X_test), n_boot=int(cfg.bootstrap),
                                   seed=int(cfg.seed))
    report["cv_roc_auc"] = float(search.best_score_)
    return search, scores, report


def _roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]):
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})", lw=2 if name == "sae" else 1.2)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Earnings surprise: test ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def run(cfg: DictConfig) -> dict:
    """`saefeat run task=earnings`: one parent run, a child run per representation."""
    df = load_calls(cfg)
    d = cfg.data
    texts = check_texts(df[d.text_field].tolist(), source=str(d.path), field=d.text_field, allow_empty=False)
    train, test = split_calls(df, cfg)
    y = df[d.label_field].to_numpy()
    dates = df[d.date_field].to_numpy()
    target = df[d.target_field].to_numpy(float) if d.target_field else None
    train_texts, test_texts = [texts[i] for i in train], [texts[i] for i in test]
    logger.info("earnings: %d training calls, %d test calls (%s split)", len(train), len(test), cfg.split.kind)
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    results: dict[str, dict[str, float]] = {}
    with TaskRun(cfg) as task:
        mlflow.log_params({"n_train": len(train), "n_test": len(test),
                           "test_beat_rate": float(y[test].mean()), "train_beat_rate": float(y[train].mean())})
        for name in cfg.representations:
            rep = make_representation(name, embed_config(cfg), baseline_config(cfg))
            with task.child(name) as metrics:
                t_rep = time.time()
                X_train = rep.fit_transform(train_texts)
                X_test = rep.transform(test_texts)
                t_fit = time.time()
                log_counts = name == "sae" and cfg.embed.pooling in ("sum", "count")
                search, scores, report = fit_and_score(X_train, y[train], dates[train], X_test, y[test], cfg,
                                                       log_counts)
                metrics.update(report)
                if target is not None:
                    reg = regressor(int(cfg.seed), log_counts, int(cfg.n_jobs)).fit(X_train, target[train])
                    metrics.update(regression_report(target[test], reg.predict(X_test), n_boot=int(cfg.bootstrap),
                                                     seed=int(cfg.seed)))
                metrics |= {"embed_seconds": t_fit - t_rep, "fit_seconds": time.time() - t_fit}
                mlflow.log_param("best_model", str(search.best_params_)[:500])
                fpr, tpr, _ = roc_curve(y[test], scores)
                curves[name] = (fpr, tpr, report["roc_auc"])
                if name == "sae":
                    _explain(rep, search, X_train.shape[1], train_texts, int(cfg.explain_top))
                results[name] = dict(metrics)
        mlflow.log_figure(_roc_figure(curves), "roc.png")
    return results


def _explain(rep, search, n_features: int, texts: list[str], top: int) -> None:
    """Log the latents that drove the fitted SAE model, with labels and contexts."""
    idx, imp = feature_importance(search.best_estimator_, n_features)
    order = np.argsort(-imp)[:top]
    latents, importance = idx[order], imp[order]
    mlflow.log_dict({"selected_latents": idx.tolist()}, "selected_latents.json")
    log_latent_report(rep.embedder, latents.tolist(), importance.tolist(), texts=texts, title="earnings: top latents")
