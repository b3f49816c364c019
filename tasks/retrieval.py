"""Ordinary retrieval on SciFact (BEIR layout): the SAE index against dense, sentence, hybrid and BM25.

One MLflow parent run, one child per representation with nDCG@10 and Recall@100 (bootstrap 95% intervals
over queries). `sae` scores documents by the idf-weighted cosine of their pooled latents; `dense` by the
cosine of the same layer's mean-pooled activations; `sentence` by the full sentence-transformers model;
`hybrid` fuses `sae` with the index's dense side; `bm25` is the lexical anchor. The `sae` run also reports
the latents that contributed most to the scores of the relevant documents it ranked in its top 10.
"""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from saefeat.config import baseline_config, embed_config
from saefeat.errors import SaefeatError
from saefeat.evaluation.comparison import TaskRun
from saefeat.explain.report import LatentReport, latent_report
from saefeat.retrieval.evaluation import load_beir, per_query_scores, retrieval_report, subset, to_run
from saefeat.retrieval.index import SAEIndex
from saefeat.retrieval.retrievers import RETRIEVERS, latent_contributions, make_retriever

logger = logging.getLogger(__name__)

REPRESENTATIONS = RETRIEVERS


def build_index(texts: list[str], ids: list[str], cfg: DictConfig) -> SAEIndex:
    """The SAE index of the corpus with the configured host, SAE, pooling and dense side for `hybrid`."""
    return SAEIndex.build(texts, embed_config(cfg), ids=ids, dense=cfg.retrieval.hybrid_dense,
                          sentence_model=baseline_config(cfg).sentence_model,
                          show_progress_bar=cfg.embed.show_progress_bar)


def log_latents(index: SAEIndex, importance: pd.Series, n: int) -> LatentReport | None:
    """The latents that drove the SAE ranking: a table and the explanation report (returned for other runs)."""
    if importance.empty:
        return None
    top = importance.head(n)
    mlflow.log_table(pd.DataFrame({"latent": top.index.astype(int), "contribution": top.to_numpy(),
                                   "docs_firing": index.df[top.index.to_numpy(int)]}), "top_latents.json")
    report = latent_report(index.embedder, top.index.to_numpy(int).tolist(), top.to_numpy(), texts=index.texts,
                           title="latents behind the SAE ranking of relevant SciFact abstracts")
    report.log()
    return report


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
        raise SaefeatError(f"representations {unknown} are not valid for task retrieval; valid: {REPRESENTATIONS}")
    d = cfg.data
    data = subset(load_beir(d.path, d.split), d.max_queries, d.max_docs, int(cfg.seed))
    qids, queries = list(data.queries), list(data.queries.values())
    logger.info("%d documents, %d %s queries", len(data.doc_ids), len(qids), d.split)
    index = build_index(data.texts, data.doc_ids, cfg)
    results, per_query = {}, {}
    e = cfg.embed
    with TaskRun(cfg) as tr:
        mlflow.log_params({"n_docs": len(data.doc_ids), "n_queries": len(qids),
                           "sae_latents_per_doc": round(index.vectors.nnz / len(index), 1)})
        report = None
        for rep in sorted(reps, key=lambda r: r != "sae"):  # sae first: hybrid carries its latent report too
            retriever = make_retriever(rep, index, float(cfg.retrieval.alpha), baseline_config(cfg),
                                       e.batch_size, e.show_progress_bar)
            rows, scores = retriever.search(queries, int(cfg.retrieval.depth))
            pq = per_query_scores(data.qrels, to_run(qids, index.ids, rows, scores))
            per_query[rep] = pq["ndcg_at_10"]
            with tr.child(rep, {"alpha": float(cfg.retrieval.alpha)} if rep == "hybrid" else None) as m:
                m.update(retrieval_report(pq, int(cfg.bootstrap), int(cfg.seed)))
                if rep == "sae":
                    imp = latent_contributions(retriever, queries, rows, qids, data.qrels)
                    report = log_latents(index, imp, int(cfg.explain_top))
                elif rep == "hybrid" and report is not None:
                    report.log()
                results[rep] = dict(m)
        mlflow.log_figure(plot_per_query(per_query), "ndcg_per_query.png")
    return results
