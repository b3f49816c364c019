"""Ordinary retrieval on SciFact (BEIR layout): the SAE index against dense, sentence, hybrid and BM25.

One MLflow parent run, one child per representation with nDCG@10 and Recall@100 (bootstrap 95% intervals
over queries). `sae` scores documents by the idf-weighted cosine of their pooled latents; `dense` by the
cosine of the same layer's mean-pooled activations; `sentence` by the full sentence-transformers model;
`hybrid` fuses `sae` with the index's dense side; `bm25` is the lexical anchor. The `sae` run also reports
the latents that contributed most to the scores of the relevant documents it ranked in its top 10.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from saefeat.evaluation.comparison import TaskRun
from saefeat.retrieval.dense import DenseSide, encode_dense_side
from saefeat.retrieval.evaluation import BM25, load_beir, per_query_scores, retrieval_report, subset, to_run
from saefeat.retrieval.index import SAEIndex

logger = logging.getLogger(__name__)

REPRESENTATIONS = ("sae", "dense", "sentence", "hybrid", "bm25")


def build_index(texts: list[str], ids: list[str], cfg: DictConfig) -> SAEIndex:
    """The SAE index of the corpus with the configured host, SAE, pooling and dense side for `hybrid`."""
    e = cfg.embed
    return SAEIndex.build(texts, ids=ids, model=cfg.model.path, sae=cfg.sae.path, pooling=e.pooling, k=e.k,
                          dense=cfg.retrieval.hybrid_dense, sentence_model=e.sentence_model,
                          batch_size=e.batch_size, show_progress_bar=e.show_progress_bar, layer=cfg.model.layer,
                          sae_k=cfg.sae.k, window=cfg.model.window, overlap=e.overlap, max_tokens=e.max_tokens,
                          device=e.device, cache_dir=e.cache_dir, precision=e.get("precision", "auto"),
                          backend=e.get("backend", "auto"))


def rank_all(rep: str, index: SAEIndex, queries: list[str], cfg: DictConfig,
             cache: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-query (rows, scores) of the top `depth` documents for one representation."""
    depth, alpha = int(cfg.retrieval.depth), float(cfg.retrieval.alpha)
    e = cfg.embed
    if rep in ("sae", "hybrid") and "Q" not in cache:
        cache["Q"] = index.encode(queries, show_progress_bar=False)
    if rep == "sae":
        out = [index.rank(cache["Q"][i], None, depth, "sae") for i in range(len(queries))]
    elif rep == "hybrid":
        QD = index.encode_dense(queries, show_progress_bar=False)
        out = [index.rank(cache["Q"][i], QD[i], depth, "hybrid", alpha) for i in range(len(queries))]
    elif rep in ("dense", "sentence"):
        docs = encode_dense_side(rep, index.texts, index.embedder, e.sentence_model, e.batch_size,
                                 e.show_progress_bar)
        Q = encode_dense_side(rep, queries, index.embedder, e.sentence_model, e.batch_size, False)
        scores, rows = DenseSide.from_vectors(docs).search(Q, depth)
        out = list(zip(rows, scores))
    elif rep == "bm25":
        rows, scores = BM25().fit(index.texts).search(queries, depth)
        out = list(zip(rows, scores))
    else:
        raise ValueError(f"unknown representation {rep!r} for task retrieval; valid: {', '.join(REPRESENTATIONS)}")
    return [r for r, _ in out], [s for _, s in out]


def latent_contributions(index: SAEIndex, Q, rows: list[np.ndarray], qids: list[str],
                         qrels: dict[str, dict[str, int]], top: int = 10) -> pd.Series:
    """Summed contribution of each latent to the SAE scores of relevant documents ranked in the top `top`."""
    total: dict[int, float] = defaultdict(float)
    for i, q in enumerate(qids):
        for r in rows[i][:top]:
            if index.ids[int(r)] in qrels[q]:
                for j, c in index._matched(int(r), Q[i], (), n=10**6):
                    total[j] += c
    return pd.Series(total, dtype=float).sort_values(ascending=False)


def log_latent_report(index: SAEIndex, importance: pd.Series, n: int) -> None:
    """The latents that drove the SAE ranking: a table always, and the explanation report when available."""
    if importance.empty:
        return
    top = importance.head(n)
    mlflow.log_table(pd.DataFrame({"latent": top.index.astype(int), "contribution": top.to_numpy(),
                                   "docs_firing": index.df[top.index.to_numpy(int)]}), "top_latents.json")
    try:
        from saefeat.explain.report import log_latent_report as report
    except ImportError:
        logger.info("saefeat.explain.report is not available; logged the latent table only")
        return
    report(index.embedder, top.index.to_numpy(int).tolist(), top.to_numpy(), texts=index.texts,
           title="latents behind the SAE ranking of relevant SciFact abstracts")


def plot_per_query(per_query: dict[str, np.ndarray]):
    """Sorted per-query nDCG@10 curve of every representation."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for rep, ndcg in per_query.items():
        ax.plot(np.sort(ndcg)[::-1], label=f"{rep} ({ndcg.mean():.3f})", color="#d62728" if rep == "sae" else None)
    ax.set_xlabel("queries, sorted")
    ax.set_ylabel("nDCG@10")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(cfg: DictConfig) -> dict:
    """Evaluate every configured representation on the BEIR collection at `data.path`."""
    reps = list(cfg.representations)
    unknown = [r for r in reps if r not in REPRESENTATIONS]
    if unknown:
        raise ValueError(f"representations {unknown} are not valid for task retrieval; valid: {REPRESENTATIONS}")
    d = cfg.data
    data = subset(load_beir(d.path, d.split), d.max_queries, d.max_docs, int(cfg.seed))
    qids, queries = list(data.queries), list(data.queries.values())
    logger.info("%d documents, %d %s queries", len(data.doc_ids), len(qids), d.split)
    index = build_index(data.texts, data.doc_ids, cfg)
    results, per_query, cache = {}, {}, {}
    with TaskRun(cfg) as tr:
        mlflow.log_params({"n_docs": len(data.doc_ids), "n_queries": len(qids),
                           "sae_latents_per_doc": round(index.vectors.nnz / len(index), 1)})
        for rep in reps:
            rows, scores = rank_all(rep, index, queries, cfg, cache)
            pq = per_query_scores(data.qrels, to_run(qids, index.ids, rows, scores))
            per_query[rep] = pq["ndcg_at_10"]
            with tr.representation(rep, {"pooling": cfg.embed.pooling} if rep in ("sae", "hybrid") else None) as m:
                m.update(retrieval_report(pq, int(cfg.bootstrap), int(cfg.seed)))
                if rep == "sae":
                    imp = latent_contributions(index, cache["Q"], rows, qids, data.qrels)
                    log_latent_report(index, imp, int(cfg.explain_top))
                results[rep] = dict(m)
        mlflow.log_figure(plot_per_query(per_query), "ndcg_per_query.png")
    return results
