"""Probes of one SAE: small evaluations on the package's own train/validation data, each scoring the SAE's features
beside three dense baselines, `dense` (the host's activations where the SAE reads them), `dense_last` (the host's
last block) and `sentence` (the sentence-transformers model).

Every probe returns a `ProbeResult`: per side its metrics (with bootstrap 95% intervals where they have one), and the
SAE's gap to each baseline with a paired bootstrap interval (the same resampled rows, queries or draws for both
sides). No held-back test split is read: toxicity is scored on a validation split of the balanced Jigsaw comments
subsampled to the natural toxic rate, sentiment by cross-fitting over CAD's train and dev pairs, SciFact on its train
queries, and earnings by grouped time-series CV on the training calls of the task's temporal split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import TransformerMixin
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

from saefeat.detox.data import split_comments
from saefeat.detox.experiment import filter_report
from saefeat.detox.filter import ToxicityFilter, representation_settings
from saefeat.embed.config import BaselineConfig, EmbedConfig
from saefeat.embed.embedder import SAEEmbedder
from saefeat.embed.vectorizers import get_embedder
from saefeat.errors import SaefeatError
from saefeat.evaluation.metrics import average_precision, bootstrap, roc_auc
from saefeat.evaluation.model_selection import Regularization, fit_logistic, fit_search, penalty_of
from saefeat.representations import make_representation
from saefeat.retrieval.dense import DenseRetriever, normalize
from saefeat.retrieval.evaluation import BM25, BeirData, per_query_scores, retrieval_report, to_run
from saefeat.retrieval.index import SAEIndex
from saefeat.retrieval.properties import fit_property_classifier
from saefeat.retrieval.retrievers import make_retriever
from saefeat.sae.metrics import activation_metrics, ce_recovered
from saefeat.shortcut.selection import accuracy_report

logger = logging.getLogger(__name__)

BASELINES = ("dense", "dense_last", "sentence")
LEXICAL = "bm25"  # SciFact's lexical anchor: a column of the retrieval rows only
SIDES = ("sae", *BASELINES, LEXICAL)


@dataclass(frozen=True)
class Side:
    """One row of a probe: a representation (a `make_representation` name) with its settings, and the penalty of
    its linear probes ("l2", "l1" for a sparse probe, or both for cross-validation to choose)."""

    name: str
    representation: str
    embed: EmbedConfig
    baselines: BaselineConfig
    penalty: str | tuple[str, ...] = "l2"

    def transformer(self) -> TransformerMixin:
        return make_representation(self.representation, self.embed, self.baselines)


def probe_sides(embed: EmbedConfig, baselines: BaselineConfig | None = None, representation: str = "sae",
                sae_penalty: str | tuple[str, ...] = "l2",
                baseline_penalty: str | tuple[str, ...] = "l2") -> list[Side]:
    """The side under test (`representation`: `sae` as `embed` says, or `sae_sentence` with
    `baselines.sentence_sae`), `dense` at the SAE's read point, `dense_last` at the host's last block (no SAE) and
    `sentence`, in that order; the first probed with `sae_penalty`, the others with `baseline_penalty`."""
    if representation not in ("sae", "sae_sentence"):
        raise SaefeatError(f"the suite scores representation sae or sae_sentence, got {representation!r}")
    baselines = baselines or BaselineConfig()
    last = embed.replace(sae=None, layer=None, sae_k=None)
    b = baseline_penalty
    return [Side("sae", representation, embed, baselines, sae_penalty), Side("dense", "dense", embed, baselines, b),
            Side("dense_last", "dense", last, baselines, b), Side("sentence", "sentence", embed, baselines, b)]


@dataclass
class ProbeResult:
    """What a probe measured.

    Attributes:
        metrics: side -> metric -> value; `<metric>_lo`/`_hi` hold its 95% interval where it has one.
        gaps: baseline -> metric -> the SAE's value minus the baseline's, `_lo`/`_hi` a paired bootstrap interval.
        headline: the metrics of the suite's table, in order.
        compare_to: an SAE metric compared with another metric of the baselines (SciFact's `hybrid_ndcg_at_10`
            stands beside their `ndcg_at_10`).
        extra: logged only (sizes, per-property values).
    """

    metrics: dict[str, dict[str, float]]
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)
    headline: tuple[str, ...] = ()
    compare_to: dict[str, str] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """Every number as one MLflow metric: `<side>/<metric>`, `gap_<baseline>/<metric>` and the extras."""
        out = {f"{side}/{k}": float(v) for side, m in self.metrics.items() for k, v in m.items()}
        out |= {f"gap_{base}/{k}": float(v) for base, m in self.gaps.items() for k, v in m.items()}
        return out | {k: float(v) for k, v in self.extra.items()}

    def rows(self, probe: str) -> dict[str, dict[str, float]]:
        """Table rows `<probe>: <metric>` with a column per side and per gap (`sae-<baseline>`), intervals as
        `<column>_lo`/`_hi`."""
        out: dict[str, dict[str, float]] = {}
        for metric in self.headline:
            row: dict[str, float] = {}
            for side, m in self.metrics.items():
                key = metric if side == "sae" else self.compare_to.get(metric, metric)
                for suffix in ("", "_lo", "_hi"):
                    if key + suffix in m:
                        row[side + suffix] = m[key + suffix]
            for base, m in self.gaps.items():
                for suffix in ("", "_lo", "_hi"):
                    if metric + suffix in m:
                        row[f"sae-{base}{suffix}"] = m[metric + suffix]
            out[f"{probe}: {metric}"] = row
        return out


def paired_gaps(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, values: Mapping[str, np.ndarray],
                name: str, n_boot: int = 1000, seed: int = 0,
                baselines: Iterable[str] = BASELINES) -> dict[str, dict[str, float]]:
    """baseline -> {name: metric(y, sae) - metric(y, baseline), name_lo, name_hi}: a paired bootstrap over the rows
    of `y` (each resample scores both sides on the same rows). `values` holds each side's per-row values."""
    fn = {name: lambda yy, a, b: metric(yy, a) - metric(yy, b)}
    return {base: bootstrap(fn, y, values["sae"], values[base], n_boot, seed) for base in baselines if base in values}


def _merge(into: dict[str, dict[str, float]], more: dict[str, dict[str, float]]) -> None:
    for key, m in more.items():
        into.setdefault(key, {}).update(m)


# ---- toxicity ---------------------------------------------------------------------------------------------
def toxicity_probe(texts: Sequence[str], y: np.ndarray, sides: Sequence[Side], *, calib_fraction: float = 0.15,
                   val_fraction: float = 0.35, toxic_rate: float = 0.08, C: Regularization = 1.0,
                   max_iter: int = 2000, n_boot: int = 1000, seed: int = 0,
                   source: str = "the comments") -> ProbeResult:
    """A `ToxicityFilter` per side, its threshold chosen on a calibration split for precision 0.8 at `toxic_rate`;
    ROC-AUC and AP (`pr_auc`) on a validation split subsampled to that natural rate (`split_comments`), each
    filter with its side's penalty. With `C` a grid (or a side's penalty a list), each side takes its own by
    cross-validation on the training split (`<side>/C`, and `<side>/l1` = 1 for an L1 filter, in `extra`)."""
    y = np.asarray(y).astype(int)
    train, calib, val = split_comments(y, calib_fraction, val_fraction, toxic_rate, seed, source)
    pick = lambda rows: [texts[i] for i in rows]  # noqa: E731
    metrics, scores, chosen = {}, {}, {}
    for side in sides:
        filt = ToxicityFilter(side.representation, representation_settings(side.embed, side.baselines), C=C,
                              penalty=side.penalty, max_iter=max_iter, target="precision", target_value=0.8,
                              prior=toxic_rate)
        filt.fit(pick(train), y[train], pick(calib), y[calib])
        chosen |= {f"{side.name}/C": filt.C_, f"{side.name}/l1": float(filt.penalty_ == "l1")}
        scores[side.name] = filt.predict_proba(pick(val))[:, 1]
        metrics[side.name] = filter_report(y[val], scores[side.name], filt.threshold_, n_boot, seed)
    yv = y[val]
    gaps = paired_gaps(roc_auc, yv, scores, "roc_auc", n_boot, seed)
    _merge(gaps, paired_gaps(lambda t, s: average_precision(t == 1, s), yv, scores, "pr_auc", n_boot, seed))
    return ProbeResult(metrics, gaps, ("roc_auc", "pr_auc"),
                       extra={"n_train": len(train), "n_calib": len(calib), "n_val": len(val),
                              "val_toxic": int(yv.sum())} | chosen)


# ---- sentiment (CAD) --------------------------------------------------------------------------------------
def linear_probe(X: sp.spmatrix | np.ndarray, y: np.ndarray, C: Regularization = 1.0,
                 penalty: str | Sequence[str] = "l2", max_iter: int = 2000, seed: int = 0) -> Pipeline:
    """A class-balanced logistic regression (`fit_logistic`: fixed C and penalty, or chosen by cross-validation
    from a grid) on max-abs scaled (sparse) or standardised (dense) features, as a fitted pipeline."""
    scaler = MaxAbsScaler() if sp.issparse(X) else StandardScaler()
    model = fit_logistic(scaler.fit_transform(X), y, C, penalty=penalty, max_iter=max_iter, seed=seed)
    return Pipeline([("scale", scaler), ("clf", model)])


def sentiment_probe(originals: Sequence[str], y_original: np.ndarray, counterfactuals: Sequence[str],
                    y_counterfactual: np.ndarray, sides: Sequence[Side], *, n_folds: int = 5,
                    C: Regularization = 1.0, n_boot: int = 1000, seed: int = 0) -> ProbeResult:
    """Cross-fitted accuracy on counterfactual pairs (CAD: an original review and its human edit that flips the
    label). The pairs are split into `n_folds` folds, stratified by label; for each fold, a `linear_probe` per side
    (with its side's penalty) is fitted on the originals of the other folds and predicts the fold's originals
    (`in_domain_accuracy`) and their counterfactual edits (`counterfactual_accuracy`), which no probe trains on.
    Every pair is scored once, out of fold, so the accuracies rest on all the pairs rather than a small dev file.
    With `C` a grid (or a side's penalty a list), each side takes its own by cross-validation inside each training
    fold (in `extra`: the median C, `<side>/C`, and the share of folds that chose L1, `<side>/l1`)."""
    y_in, y_cf = np.asarray(y_original), np.asarray(y_counterfactual)
    if len(originals) != len(counterfactuals) or len(y_in) != len(originals) or len(y_cf) != len(originals):
        raise SaefeatError(f"the sentiment probe needs aligned pairs: {len(originals)} originals, "
                           f"{len(counterfactuals)} counterfactuals, {len(y_in)} and {len(y_cf)} labels")
    folds = list(StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y_in)), y_in))
    preds: dict[str, dict[str, np.ndarray]] = {"in_domain": {}, "counterfactual": {}}
    metrics: dict[str, dict[str, float]] = {}
    chosen: dict[str, float] = {}
    for side in sides:
        rep = side.transformer()  # fixed representations: fitting learns nothing from the rows it sees
        X_in, X_cf = rep.fit_transform(list(originals)), rep.transform(list(counterfactuals))
        p_in, p_cf = np.empty_like(y_in), np.empty_like(y_cf)
        cs, l1 = [], []
        for train, test in folds:
            clf = linear_probe(X_in[train], y_in[train], C, side.penalty, seed=seed)
            p_in[test], p_cf[test] = clf.predict(X_in[test]), clf.predict(X_cf[test])
            cs.append(clf[-1].C)
            l1.append(penalty_of(clf[-1]) == "l1")
        chosen |= {f"{side.name}/C": float(np.median(cs)), f"{side.name}/l1": float(np.mean(l1))}
        preds["in_domain"][side.name], preds["counterfactual"][side.name] = p_in, p_cf
        metrics[side.name] = accuracy_report(y_in, p_in, "in_domain", n_boot, seed) | \
            accuracy_report(y_cf, p_cf, "counterfactual", n_boot, seed)
    gaps: dict[str, dict[str, float]] = {}
    for name, y in (("in_domain", y_in), ("counterfactual", y_cf)):
        _merge(gaps, paired_gaps(lambda t, p: float(np.mean(t == p)), y, preds[name], f"{name}_accuracy", n_boot,
                                 seed))
    return ProbeResult(metrics, gaps, ("in_domain_accuracy", "counterfactual_accuracy"),
                       extra={"n_pairs": len(y_in), "n_folds": n_folds} | chosen)


# ---- SciFact retrieval ------------------------------------------------------------------------------------
def retrieval_probe(data: BeirData, sides: Sequence[Side], *, alpha: float = 0.5, hybrid_dense: str = "sentence",
                    depth: int = 100, n_boot: int = 1000, seed: int = 0,
                    show_progress_bar: bool | None = None) -> ProbeResult:
    """nDCG@10 and Recall@100 of each side over the judged queries of `data`: `sae` is the SAE index (idf-weighted
    cosine), `hybrid_*` the index fused with its `hybrid_dense` side (weight `alpha` on the SAE), the baselines the
    cosine of their vectors, and BM25 (`bm25`) the lexical anchor."""
    by_name = {s.name: s for s in sides}
    sae = by_name["sae"]
    if sae.representation != "sae":
        return _vector_retrieval_probe(data, sides, alpha, depth, n_boot, seed)
    index = SAEIndex.build(data.texts, sae.embed, ids=data.doc_ids, dense=hybrid_dense,
                           sentence_model=sae.baselines.sentence_model, show_progress_bar=show_progress_bar)
    qids, queries = list(data.queries), list(data.queries.values())
    e = sae.embed
    retrievers = {"sae": make_retriever("sae", index), "hybrid": make_retriever("hybrid", index, alpha),
                  LEXICAL: make_retriever(LEXICAL, index)}
    for side in sides[1:]:
        if side.representation == "sentence":
            retrievers[side.name] = make_retriever("sentence", index, alpha, side.baselines,
                                                   e.batch_size, show_progress_bar)
        else:  # the mean-pooled activations of that side's own read point
            retrievers[side.name] = DenseRetriever.build("dense", data.texts, get_embedder(side.embed),
                                                         side.baselines.sentence_model, e.batch_size,
                                                         show_progress_bar)
    per_query = {}
    for name, retriever in retrievers.items():
        rows, scores = retriever.search(queries, depth)
        per_query[name] = per_query_scores(data.qrels, to_run(qids, index.ids, rows, scores))
    return _retrieval_result(per_query, n_boot, seed, {"n_docs": len(index), "n_queries": len(qids),
                                                       "sae_latents_per_doc": index.vectors.nnz / max(len(index), 1)})


def _retrieval_result(per_query: dict[str, dict[str, np.ndarray]], n_boot: int, seed: int,
                      extra: dict[str, float]) -> ProbeResult:
    """The SciFact result from per-query scores of every side and `hybrid`: reports and paired nDCG@10 gaps."""
    n_queries = len(next(iter(per_query.values()))["ndcg_at_10"])
    metrics = {name: retrieval_report(pq, n_boot, seed) for name, pq in per_query.items() if name != "hybrid"}
    metrics["sae"] |= {f"hybrid_{k}": v for k, v in retrieval_report(per_query["hybrid"], n_boot, seed).items()}
    zeros = np.zeros(n_queries)
    mean = lambda _, a: float(np.mean(a))  # noqa: E731
    gaps: dict[str, dict[str, float]] = {}
    for key, sae_side in (("ndcg_at_10", "sae"), ("hybrid_ndcg_at_10", "hybrid")):
        values = {"sae": per_query[sae_side]["ndcg_at_10"]} | {b: per_query[b]["ndcg_at_10"] for b in SIDES[1:]
                                                                if b in per_query}
        _merge(gaps, paired_gaps(mean, zeros, values, key, n_boot, seed, SIDES[1:]))
    return ProbeResult(metrics, gaps, ("ndcg_at_10", "hybrid_ndcg_at_10"), {"hybrid_ndcg_at_10": "ndcg_at_10"},
                       extra=extra)


def _vector_retrieval_probe(data: BeirData, sides: Sequence[Side], alpha: float, depth: int, n_boot: int,
                            seed: int) -> ProbeResult:
    """SciFact for a side under test that is not an SAE index (`sae_sentence`): every side ranks by the cosine of
    its vectors; `hybrid` fuses the tested side with `sentence` (weight `alpha` on the tested side)."""
    qids, queries = list(data.queries), list(data.queries.values())
    scores = {}
    for side in sides:
        rep = side.transformer()
        D = _unit(rep.fit_transform(list(data.texts)))
        Q = _unit(rep.transform(queries))
        scores[side.name] = np.asarray((Q @ D.T).todense() if sp.issparse(Q) else Q @ D.T)
    scores["hybrid"] = alpha * scores["sae"] + (1 - alpha) * scores["sentence"]
    per_query = {}
    ids = np.asarray(data.doc_ids)
    for name, S in scores.items():
        rows = np.argsort(-S, axis=1)[:, :depth]
        per_query[name] = per_query_scores(data.qrels, to_run(qids, list(ids), list(rows),
                                                              [S[i, r] for i, r in enumerate(rows)]))
    rows, bm25_scores = BM25().fit(list(data.texts)).search(queries, depth)
    per_query[LEXICAL] = per_query_scores(data.qrels, to_run(qids, list(ids), list(rows), list(bm25_scores)))
    return _retrieval_result(per_query, n_boot, seed, {"n_queries": len(qids), "n_docs": len(ids)})


def _unit(x):
    """Rows scaled to unit L2 norm (sparse stays sparse)."""
    if sp.issparse(x):
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        return sp.diags(1.0 / np.maximum(norms, 1e-12)) @ x
    return normalize(np.asarray(x))


# ---- property retrieval -----------------------------------------------------------------------------------


def _dense_unit(x) -> np.ndarray:
    return normalize(np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float32))


def property_probe(corpora: Mapping[str, tuple[Sequence[str], Mapping[str, np.ndarray]]], sides: Sequence[Side], *,
                   n_examples: int = 10, draws: int = 3, n_latents: int = 16, method: str = "classifier",
                   C: float = 0.1, n_boot: int = 1000, seed: int = 0,
                   show_progress_bar: bool | None = None) -> ProbeResult:
    """Retrieval of a property from `n_examples` positive examples: the SAE side ranks a corpus by the property
    its index builds from the examples (`SAEIndex.property` with `method`), a baseline by the cosine to the
    examples' centroid (`mean_ap`) and, in the `mean_ap_matched` row, by the same class-balanced logistic
    regression of the examples against the corpus on its unit vectors (`mean_ap_classifier`), so the SAE's
    method is also compared like for like. Average precision over the corpus without the examples, means over
    every (property, draw).

    corpora: name -> (texts, property -> 0/1 labels of the texts); a property with too few positives is skipped.
    """
    aps: dict[str, list[float]] = {s.name: [] for s in sides}
    matched: dict[str, list[float]] = {s.name: [] for s in sides if s.name != "sae"}
    extra: dict[str, float] = {}
    for c, (corpus, (texts, labels)) in enumerate(corpora.items()):
        texts = list(texts)
        sae = next(s for s in sides if s.name == "sae")
        # an SAE index ranks by the examples' shared latents; any other side by the cosine to their centroid
        index = SAEIndex.build(texts, sae.embed, dense=None, show_progress_bar=show_progress_bar) \
            if sae.representation == "sae" else None
        vectors = {s.name: _dense_unit(s.transformer().fit_transform(texts)) for s in sides
                   if s.name != "sae" or index is None}
        for p, (prop, y) in enumerate(labels.items()):
            y = np.asarray(y).astype(bool)
            positives = np.flatnonzero(y)
            if len(positives) <= n_examples:
                logger.warning("property %s:%s has %d positives (<= %d examples); skipped", corpus, prop,
                               len(positives), n_examples)
                continue
            per_prop: dict[str, list[float]] = {s.name: [] for s in sides}
            for draw in range(draws):
                rng = np.random.default_rng([seed, c, p, draw])
                ex = rng.choice(positives, n_examples, replace=False)
                rest = np.setdiff1d(np.arange(len(texts)), ex)
                scores = {} if index is None else {"sae": index.property_scores(
                    index.property(index.vectors[ex], n_latents=n_latents, method=method, C=C))}
                for name, V in vectors.items():
                    scores[name] = V @ normalize(V[ex].mean(0, keepdims=True))[0]
                for name, s in scores.items():
                    per_prop[name].append(average_precision(y[rest], s[rest]))
                for name in matched:
                    s = _classifier_scores(vectors[name], ex, C)
                    matched[name].append(average_precision(y[rest], s[rest]))
            for name, values in per_prop.items():
                aps[name] += values
                extra[f"{name}/ap:{corpus}:{prop}"] = float(np.mean(values))
    if not aps["sae"]:
        raise ValueError(f"no property has more than {n_examples} positive examples")
    values = {name: np.asarray(v) for name, v in aps.items()}
    zeros = np.zeros(len(values["sae"]))
    mean = {"mean_ap": lambda _, a, b: float(np.mean(a))}
    metrics = {name: bootstrap(mean, zeros, v, v, n_boot, seed) for name, v in values.items()}
    gaps = paired_gaps(lambda _, a: float(np.mean(a)), zeros, values, "mean_ap", n_boot, seed)
    if matched and index is not None:
        like = {"sae": values["sae"]} | {name: np.asarray(v) for name, v in matched.items()}
        metrics["sae"] |= {k.replace("mean_ap", "mean_ap_matched"): v for k, v in metrics["sae"].items()}
        for name, v in matched.items():
            metrics[name] |= {k.replace("mean_ap", "mean_ap_classifier"): x
                              for k, x in bootstrap(mean, zeros, np.asarray(v), np.asarray(v), n_boot, seed).items()}
        _merge(gaps, paired_gaps(lambda _, a: float(np.mean(a)), zeros, like, "mean_ap_matched", n_boot, seed))
        return ProbeResult(metrics, gaps, ("mean_ap", "mean_ap_matched"), {"mean_ap_matched": "mean_ap_classifier"},
                           extra=extra | {"n_property_draws": len(zeros)})
    return ProbeResult(metrics, gaps, ("mean_ap",), extra=extra | {"n_property_draws": len(zeros)})


def _classifier_scores(V: np.ndarray, examples: np.ndarray, C: float) -> np.ndarray:
    """Every row's score by the SAE index's classifier property (`fit_property_classifier`) fitted on dense unit
    vectors: the example rows of V against the others, with unit weights in place of the index's idf."""
    X = sp.csr_matrix(V)
    prop = fit_property_classifier(X[examples], X, np.ones(V.shape[1]), C=C)
    return prop.score(X)


# ---- earnings ---------------------------------------------------------------------------------------------
def earnings_probe(texts: Sequence[str], y: np.ndarray, dates: np.ndarray, sides: Sequence[Side], *,
                   classifiers: Sequence[str] = ("logreg",), selection: Sequence[str] = ("anova",),
                   k_grid: Sequence[int] = (32, 128), n_splits: int = 4, seed: int = 0,
                   n_jobs: int | None = None) -> ProbeResult:
    """Grouped time-series CV ROC-AUC of the earnings-surprise classifier (`fit_search`) per side: the mean over
    the folds of the best candidate (`cv_roc_auc`; chosen on the same folds, so optimistic alike for every side)."""
    metrics: dict[str, dict[str, float]] = {}
    folds: dict[str, np.ndarray] = {}
    for side in sides:
        X = side.transformer().fit_transform(list(texts))
        log = side.representation == "sae" and side.embed.pooling in ("sum", "count")
        search = fit_search(X, np.asarray(y), dates, classifiers=list(classifiers), selection=list(selection),
                            k_grid=list(k_grid), n_splits=n_splits, seed=seed, log_transform=log, n_jobs=n_jobs)
        res, best = search.cv_results_, search.best_index_
        folds[side.name] = np.array([res[f"split{i}_test_score"][best] for i in range(n_splits)
                                     if f"split{i}_test_score" in res])
        metrics[side.name] = {"cv_roc_auc": float(search.best_score_),
                              "cv_roc_auc_fold_sd": float(np.nanstd(folds[side.name]))}
    gaps = {b: {"cv_roc_auc": metrics["sae"]["cv_roc_auc"] - metrics[b]["cv_roc_auc"]} for b in BASELINES
            if b in metrics}
    return ProbeResult(metrics, gaps, ("cv_roc_auc",), extra={"n_calls": len(texts), "beat_rate": float(np.mean(y))})


# ---- the SAE's own quality --------------------------------------------------------------------------------
def core_probe(embedder: SAEEmbedder, windows: Sequence[list[int]], *, dense_density: float = 0.1,
               ce_windows: int = 16, batch_size: int = 32) -> ProbeResult:
    """Explained variance, L0, dead and dense latent fractions over the tokens of `windows` as the embedder reads
    them (its read point, precision and backend); CE and KL recovered on the first `ce_windows` for causal hosts
    read at a block's output."""
    sae = embedder.sae
    if sae is None:
        raise ValueError("the core probe needs an SAE")
    windows = [list(w) for w in windows]
    acts = (x for _, _, x in embedder.reader.batches(windows, batch_size))
    m = activation_metrics(sae, acts, dense_density)
    headline = ["explained_variance", "l0", "dead_fraction", "dense_fraction"]
    if embedder.host.is_causal and embedder.reader.site == "output" and ce_windows > 0:
        m |= ce_recovered(sae, embedder.host, embedder.layer, windows[:ce_windows])
        headline += ["ce_loss_recovered", "kl_div_recovered"]
    return ProbeResult({"sae": m}, headline=tuple(headline), extra={"n_windows": len(windows)})


def sentence_core_probe(vectorizer: Any, texts: Sequence[str]) -> ProbeResult:
    """Explained variance, L0 and never-firing share of a sentence-embedding SAE (`sae_sentence`) over the model's
    embeddings of the chunks of `texts` (held-out documents)."""
    from saefeat.sae.sentence import vector_metrics

    emb, _ = vectorizer.encode_chunks(list(texts))
    m = vector_metrics(vectorizer.sae_model, emb)
    return ProbeResult({"sae": m}, headline=("explained_variance", "l0", "dead_fraction"),
                       extra={"n_chunks": len(emb)})
