"""Retrieval benchmarks of the SAE index, each side by side with dense baselines in one run.

    python benchmarks/retrieval_bench.py [--sections scifact,property,speed] [--draws 5] [--sizes 10000,100000]

- scifact:  nDCG@10 and Recall@100 on SciFact's train queries (BEIR layout) for sae, dense, sentence, hybrid
            and BM25, with bootstrap 95% intervals over queries.
- property: property retrieval from 10 positive examples (Jigsaw subtypes, CAD sentiment): average precision
            and precision@50 of SAE property scoring against the dense and sentence centroids of the same
            examples, averaged over random draws; the examples themselves are left out of the ranking.
- speed:    query latency (scoring alone, and with query encoding) and index bytes per document at several
            index sizes. Sizes beyond the real documents are filled with perturbed copies of real documents'
            vectors (activations scaled by a random factor, 10% of entries dropped), not with new texts.

Embeddings are cached on disk (`$SAEFEAT_CACHE`), so a second run skips encoding.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from _offline import DATA  # noqa: E402  (sets the offline environment first)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(width=150)


def show(df: pd.DataFrame, title: str, fmt: str = "{:.3f}") -> None:
    t = Table(title=title)
    t.add_column(df.index.name or "")
    for c in df.columns:
        t.add_column(str(c), justify="right")
    for idx, row in df.iterrows():
        t.add_row(str(idx), *[fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row])
    console.print(t)


EXTRA_OVERRIDES: list[str] = []


def task_config(overrides: list[str]):
    from saefeat.config import load_config

    return load_config("tasks", ["task=retrieval", f"data_dir={DATA}", "embed.show_progress_bar=true", *overrides,
                                 *EXTRA_OVERRIDES])


# ---- SciFact ----------------------------------------------------------------------------------
def bench_scifact(args) -> dict:
    from saefeat.retrieval.evaluation import load_beir, per_query_scores, retrieval_report, to_run
    from saefeat.retrieval.retrievers import make_retriever
    from saefeat.tasks.retrieval import build_index

    cfg = task_config([f"embed.pooling={args.pooling}"])
    data = load_beir(DATA / "retrieval" / "scifact", "train")
    qids, queries = list(data.queries), list(data.queries.values())
    console.print(f"SciFact: {len(data.doc_ids)} abstracts, {len(qids)} train queries, "
                  f"{sum(len(v) for v in data.qrels.values())} judgements")
    t0 = time.perf_counter()
    index = build_index(data.texts, data.doc_ids, cfg)
    console.print(f"index built in {time.perf_counter() - t0:.0f} s ({index.vectors.nnz / len(index):.0f} "
                  f"latents per document, {args.pooling} pooling)")
    rows, per_query = {}, {}
    depth, e = int(cfg.retrieval.depth), cfg.embed

    def rank_all(rep: str, alpha: float = float(cfg.retrieval.alpha)):
        retriever = make_retriever(rep, index, alpha, cfg.baselines.sentence_model, e.batch_size, False)
        return retriever.search(queries, depth)

    for rep in ("sae", "dense", "sentence", "hybrid", "bm25"):
        r, s = rank_all(rep)
        pq = per_query_scores(data.qrels, to_run(qids, index.ids, r, s))
        per_query[rep] = pq
        m = retrieval_report(pq, 1000, 0)
        rows[rep] = {"nDCG@10": f"{m['ndcg_at_10']:.3f} [{m['ndcg_at_10_lo']:.3f}, {m['ndcg_at_10_hi']:.3f}]",
                     "Recall@100": f"{m['recall_at_100']:.3f} [{m['recall_at_100_lo']:.3f}, "
                                   f"{m['recall_at_100_hi']:.3f}]"}
    for alpha in (0.3, 0.7):  # sensitivity of the fusion weight (train queries; the test split is held out)
        r, s = rank_all("hybrid", alpha)
        m = retrieval_report(per_query_scores(data.qrels, to_run(qids, index.ids, r, s)), 1000, 0)
        rows[f"hybrid a={alpha}"] = {"nDCG@10": f"{m['ndcg_at_10']:.3f}", "Recall@100": f"{m['recall_at_100']:.3f}"}
    show(pd.DataFrame.from_dict(rows, orient="index").rename_axis("representation"),
         f"SciFact train queries (n={len(qids)}), hybrid alpha={cfg.retrieval.alpha} on the SAE side")
    diff = per_query["hybrid"]["ndcg_at_10"] - per_query["sentence"]["ndcg_at_10"]
    boot = np.random.default_rng(0).choice(diff, (1000, len(diff))).mean(1)
    console.print(f"hybrid - sentence nDCG@10: {diff.mean():+.3f} [{np.percentile(boot, 2.5):+.3f}, "
                  f"{np.percentile(boot, 97.5):+.3f}] (paired bootstrap over queries)")
    return {"index": index, "queries": queries}


# ---- property retrieval -----------------------------------------------------------------------
def property_corpora() -> dict[str, tuple[list[str], dict[str, np.ndarray]]]:
    from saefeat.data import read_table

    jig = read_table(DATA / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz",
                     ["comment_text", "obscene", "threat", "insult", "identity_hate"])
    jig_labels = {f"jigsaw:{c}": jig[c].to_numpy(int) for c in ("obscene", "threat", "insult", "identity_hate")}
    cad_dir = DATA / "shortcut" / "cad" / "sentiment" / "orig"
    cad = pd.concat([read_table(cad_dir / f"{s}.tsv", ["Sentiment", "Text"]) for s in ("train", "dev")],
                    ignore_index=True)
    cad_labels = {"cad:positive": (cad.Sentiment == "Positive").to_numpy(int),
                  "cad:negative": (cad.Sentiment == "Negative").to_numpy(int)}
    return {"jigsaw": (jig.comment_text.astype(str).tolist(), jig_labels),
            "cad": (cad.Text.astype(str).tolist(), cad_labels)}


def bench_property(args) -> None:
    from saefeat.retrieval.dense import encode_dense_side, normalize
    from saefeat.retrieval.evaluation import average_precision, precision_at
    from saefeat.retrieval.index import SAEIndex
    from saefeat.tasks.retrieval import build_index

    cfg = task_config([f"embed.pooling={args.pooling}", "retrieval.hybrid_dense=dense"])
    results = []
    for name, (texts, labels) in property_corpora().items():
        console.print(f"{name}: {len(texts)} documents")
        index: SAEIndex = build_index(texts, [str(i) for i in range(len(texts))], cfg)
        vectors = {"dense": normalize(index.dense.vectors()),
                   "sentence": normalize(encode_dense_side("sentence", texts, index.embedder,
                                                           show_progress_bar=True))}
        for prop_name, y in labels.items():
            pos_rows = np.flatnonzero(y)
            for draw in range(args.draws):
                rng = np.random.default_rng(1000 * draw + len(prop_name))
                ex = rng.choice(pos_rows, args.n_examples, replace=False)
                keep = np.setdiff1d(np.arange(len(texts)), ex)
                prop = index.property(index.vectors[ex], n_latents=args.n_latents)
                scores = {"sae": index.property_scores(prop)}
                for rep, V in vectors.items():
                    scores[rep] = V @ normalize(V[ex].mean(0, keepdims=True))[0]
                for rep, s in scores.items():
                    results.append({"property": prop_name, "draw": draw, "rep": rep, "n_latents": len(prop),
                                    "AP": average_precision(y[keep], s[keep]),
                                    "P@50": precision_at(y[keep], s[keep], 50), "base_rate": y[keep].mean()})
    df = pd.DataFrame(results)
    table = df.pivot_table(index="property", columns="rep", values=["AP", "P@50"], aggfunc="mean")
    table.columns = [f"{m} {r}" for m, r in table.columns]
    table["base rate"] = df.groupby("property").base_rate.mean()
    table["SAE latents"] = df[df.rep == "sae"].groupby("property").n_latents.mean()
    table = table[["base rate", "AP sae", "AP dense", "AP sentence", "P@50 sae", "P@50 dense", "P@50 sentence",
                   "SAE latents"]]
    table.loc["mean"] = table.mean()
    show(table, f"Property retrieval from {args.n_examples} positive examples, mean over {args.draws} draws "
                f"({args.pooling} pooling, up to {args.n_latents} latents)")
    gap = (table.loc["mean", "AP sae"] - table.loc["mean", "AP dense"]) * 100
    gap_s = (table.loc["mean", "AP sae"] - table.loc["mean", "AP sentence"]) * 100
    console.print(f"SAE - dense centroid AP: {gap:+.1f} points; SAE - sentence centroid AP: {gap_s:+.1f} points "
                  f"(target: >= +5 against the dense centroid)")


# ---- speed ------------------------------------------------------------------------------------
def perturbed_copies(X: sp.csr_matrix, D: np.ndarray, n: int, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """n rows: the real rows first, then copies with activations scaled by exp(N(0, 0.2)) and 10% dropped."""
    rng = np.random.default_rng(seed)
    parts, dparts, have = [X], [D], X.shape[0]
    while have < n:
        take = min(X.shape[0], n - have)
        C = X[rng.permutation(X.shape[0])[:take]].tocoo()
        keep = rng.random(C.nnz) > 0.1
        vals = C.data[keep] * np.exp(rng.normal(0, 0.2, keep.sum())).astype(np.float32)
        parts.append(sp.csr_matrix((vals, (C.row[keep], C.col[keep])), shape=(take, X.shape[1])))
        dparts.append(D[rng.permutation(D.shape[0])[:take]] + rng.normal(0, 0.01, (take, D.shape[1])))
        have += take
    return sp.vstack(parts, format="csr")[:n], np.vstack(dparts)[:n].astype(np.float32)


def bench_speed(args, scifact: dict | None) -> None:
    from saefeat.config import embed_config
    from saefeat.embed.vectorizers import get_embedder
    from saefeat.retrieval.evaluation import load_beir
    from saefeat.retrieval.index import SAEIndex
    from saefeat.tasks.retrieval import build_index

    cfg = task_config([f"embed.pooling={args.pooling}", f"retrieval.hybrid_dense={args.speed_dense}"])
    if scifact is None or args.seed_docs:
        data = load_beir(DATA / "retrieval" / "scifact", "train")
        rows = np.argsort([-len(t) for t in data.texts], kind="stable")[: args.seed_docs or None]
        console.print(f"speed: seeded with {len(rows)} real SciFact abstracts (the longest first), "
                      f"dense side: {args.speed_dense}")
        scifact = {"index": build_index([data.texts[i] for i in rows], [data.doc_ids[i] for i in rows], cfg),
                   "queries": list(data.queries.values())}
    base, queries = scifact["index"], scifact["queries"][: args.n_queries]
    texts = base.texts
    if max(args.sizes) > len(base):
        console.print(f"sizes above {len(base)} use perturbed copies of the {len(base)} real SciFact vectors")
    # queries are encoded for real in the 'sae+encode' timing, never read from the cache
    fresh = get_embedder(embed_config(cfg, cache=False))
    rows = {}
    for pooling in ("max", "topk"):
        X_real = base.encode(texts, show_progress_bar=False) if pooling == base.pooling else \
            SAEIndex(base.embedder, sp.csc_matrix((0, base.d_sae)), [], [], pooling=pooling).encode(texts)
        D_real = base.dense.vectors().copy()
        for n in args.sizes:
            X, D = perturbed_copies(X_real, D_real, n)
            ids = [str(i) for i in range(n)]
            docs = [texts[i % len(texts)] for i in range(n)]
            index = SAEIndex(fresh, sp.csc_matrix((0, base.d_sae)), [], [], pooling=pooling, k=base.k,
                             dense_kind=base.dense_kind, sentence_model=base.sentence_model)
            index.add_vectors(X, ids, docs, D)
            Q = index.encode(queries, show_progress_bar=False)
            QD = index.encode_dense(queries, show_progress_bar=False)
            lat: dict[str, list[float]] = {"sae": [], "hybrid": [], "dense": [], "sae+encode": []}
            for i in range(len(queries)):
                for mode in ("sae", "hybrid", "dense"):
                    t0 = time.perf_counter()
                    index.rank(Q[i], QD[i], 10, mode)
                    lat[mode].append(time.perf_counter() - t0)
            for q in queries[: args.n_encode]:
                t0 = time.perf_counter()
                index.search(q, k=10, explain=0)
                lat["sae+encode"].append(time.perf_counter() - t0)
            with tempfile.TemporaryDirectory() as tmp:
                index.save(Path(tmp) / "idx")
                size = {f.name: f.stat().st_size for f in (Path(tmp) / "idx").iterdir()}
            row = {"latents/doc": X.nnz / n,
                   "postings B/doc": size["postings.npz"] / n,
                   "dense B/doc": size.get("dense.faiss", 0) / n,
                   "texts B/doc": size["docs.parquet"] / n if n <= len(texts) else float("nan")}
            for mode, v in lat.items():
                ms = np.array(v) * 1000
                row[f"{mode} p50 ms"], row[f"{mode} p99 ms"] = np.percentile(ms, 50), np.percentile(ms, 99)
            rows[(pooling, n)] = row
            console.print(f"  {pooling} n={n}: done")
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index = [f"{p} n={n}" for p, n in df.index]
    df.index.name = "pooling, docs"
    lat_cols = [c for c in df.columns if "ms" in c]
    show(df[["latents/doc", "postings B/doc", "dense B/doc", "texts B/doc"]],
         "Index size per document (texts: real documents only)", "{:.0f}")
    show(df[lat_cols], f"Query latency over {len(queries)} SciFact queries (scoring; 'sae+encode' includes "
                       f"encoding the query with the host and SAE, {args.n_encode} queries, cache off)", "{:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="scifact,property,speed")
    p.add_argument("--pooling", default="max", help="pooling of the indexed SAE vectors (scifact and property)")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--n-examples", type=int, default=10)
    p.add_argument("--n-latents", type=int, default=16)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--n-queries", type=int, default=300)
    p.add_argument("--n-encode", type=int, default=50)
    p.add_argument("--seed-docs", type=int, default=0, help="speed: real abstracts used as the seed set (0 = all)")
    p.add_argument("--speed-dense", default="sentence", help="speed: dense side of the timed index")
    p.add_argument("--override", action="append", default=[], help="config override for every section, key=value")
    args = p.parse_args()
    EXTRA_OVERRIDES.extend(args.override)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    logging.basicConfig(level=logging.WARNING)
    sections = args.sections.split(",")
    t0 = time.perf_counter()
    scifact = bench_scifact(args) if "scifact" in sections else None
    if "property" in sections:
        bench_property(args)
    if "speed" in sections:
        bench_speed(args, scifact)
    console.print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
