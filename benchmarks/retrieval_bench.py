"""Retrieval benchmarks of the SAE index, each side by side with dense baselines in one run.

    python benchmarks/retrieval_bench.py [--sections scifact,property,speed] [--draws 5] [--sizes 10000,100000]

- scifact:  nDCG@10 and Recall@100 on SciFact's train queries (BEIR layout) for sae, dense, sentence, hybrid
            and BM25, with bootstrap 95% intervals over queries.
- property: property retrieval from 10 positive examples (Jigsaw subtypes, CAD sentiment): average precision
            and precision@50 of SAE property scoring against the dense and sentence centroids of the same
            examples, averaged over random draws; the examples themselves are left out of the ranking.
- speed:    the task's default index (and other poolings) at several sizes, over real text: SciFact's abstracts
            plus MAEC call and Gutenberg passages cut to abstract length as distractors. Per index: nDCG@10 of
            the train queries (sae, hybrid), p50/p99 query latency (scoring alone, and with query encoding) and
            bytes per document.

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


def pooling_override(args) -> list[str]:
    """`embed.pooling=...` when --pooling is given; else the task config's pooling applies."""
    return [f"embed.pooling={args.pooling}"] if args.pooling else []


def task_config(overrides: list[str]):
    from saefeat.config import load_config

    return load_config("tasks", ["task=retrieval", f"data_dir={DATA}", "embed.show_progress_bar=true", *overrides,
                                 *EXTRA_OVERRIDES])


# ---- SciFact ----------------------------------------------------------------------------------
def bench_scifact(args) -> None:
    from saefeat.config import baseline_config
    from saefeat.retrieval.evaluation import load_beir, per_query_scores, retrieval_report, to_run
    from saefeat.retrieval.retrievers import make_retriever
    from saefeat.tasks.retrieval import build_index

    cfg = task_config(pooling_override(args))
    data = load_beir(DATA / "retrieval" / "scifact", "train")
    qids, queries = list(data.queries), list(data.queries.values())
    console.print(f"SciFact: {len(data.doc_ids)} abstracts, {len(qids)} train queries, "
                  f"{sum(len(v) for v in data.qrels.values())} judgements")
    t0 = time.perf_counter()
    index = build_index(data.texts, data.doc_ids, cfg)
    console.print(f"index built in {time.perf_counter() - t0:.0f} s ({index.vectors.nnz / len(index):.0f} "
                  f"latents per document, {cfg.embed.pooling} pooling)")
    rows, per_query = {}, {}
    depth, e = int(cfg.retrieval.depth), cfg.embed

    def rank_all(rep: str, alpha: float = float(cfg.retrieval.alpha)):
        retriever = make_retriever(rep, index, alpha, baseline_config(cfg), e.batch_size, False)
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

    cfg = task_config([*pooling_override(args), "retrieval.hybrid_dense=dense"])
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
                prop = index.property(index.vectors[ex], n_latents=args.n_latents, method=args.property_method)
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
                f"({cfg.embed.pooling} pooling, {args.property_method} property"
                + (f", up to {args.n_latents} latents)" if args.property_method == "latents" else ")"))
    gap = (table.loc["mean", "AP sae"] - table.loc["mean", "AP dense"]) * 100
    gap_s = (table.loc["mean", "AP sae"] - table.loc["mean", "AP sentence"]) * 100
    console.print(f"SAE - dense centroid AP: {gap:+.1f} points; SAE - sentence centroid AP: {gap_s:+.1f} points "
                  f"(target: >= +5 against the dense centroid)")


# ---- speed ------------------------------------------------------------------------------------
REAL_SOURCES = (("maec", "earnings/maec_transcripts_unlabeled.jsonl.gz", "\n"),
                ("gutenberg", "corpus/gutenberg_one_book_per_author.jsonl.gz", "\n\n"))


def real_passages(n: int, lengths: np.ndarray, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` passages of real text at abstract length: MAEC call transcripts (one sentence per line) and Gutenberg
    paragraphs, cut at those boundaries to lengths drawn from `lengths` (SciFact's abstract lengths in characters).

    Pass 0 cuts every text end to end, without overlap. The shared text holds about 39k such passages, so when `n`
    is larger, pass 1 cuts the same texts again starting half a passage in (passages that overlap pass 0's by about
    half, never equal to one), and so on. Each pass is shuffled (seeded) and the passes are concatenated.
    Returns (texts, sources like "maec:<call id>:p0").
    """
    import gzip
    import json

    rng = np.random.default_rng(seed)
    docs = []
    for name, rel, sep in REAL_SOURCES:
        with gzip.open(DATA / rel, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                units = [" ".join(u.split()) for u in row["text"].split(sep)]
                docs.append((f"{name}:{row['id']}", [u for u in units if u]))
    out: list[tuple[str, str]] = []
    for p in range(64):
        chunks = []
        for source, units in docs:
            skip, i = (0 if p == 0 else int(rng.choice(lengths)) * p // (p + 1)), 0
            while skip > 0 and i < len(units):  # later passes start part of a passage in
                skip -= len(units[i]) + 1
                i += 1
            while i < len(units):
                target, parts, size = int(rng.choice(lengths)), [], 0
                while i < len(units) and size < target:
                    parts.append(units[i])
                    size += len(units[i]) + 1
                    i += 1
                if size >= min(target, 400):
                    chunks.append((" ".join(parts)[: 2 * target], f"{source}:p{p}"))
        out += [chunks[j] for j in rng.permutation(len(chunks))]
        if len(out) >= n:
            break
    texts, sources = zip(*out[:n])
    return list(texts), list(sources)


def speed_corpus(n: int) -> tuple[list[str], list[str], int]:
    """SciFact's abstracts (title + text), then `real_passages` up to `n` documents: (texts, ids, n_abstracts)."""
    from saefeat.retrieval.evaluation import load_beir

    data = load_beir(DATA / "retrieval" / "scifact", "train")
    lengths = np.array([len(t) for t in data.texts])
    texts, ids = list(data.texts), list(data.doc_ids)
    if n > len(texts):
        extra, sources = real_passages(n - len(texts), lengths)
        texts += extra
        ids += [f"{s}:{i}" for i, s in enumerate(sources)]
    return texts[:n], ids[:n], min(n, len(data.doc_ids))


def bench_speed(args) -> None:
    """Quality and latency of the task's index at each size and pooling, over real text (see `real_passages`)."""
    from saefeat.config import embed_config
    from saefeat.embed.pooling import pool
    from saefeat.embed.vectorizers import get_embedder
    from saefeat.retrieval.dense import encode_dense_side
    from saefeat.retrieval.evaluation import load_beir, per_query_scores, to_run
    from saefeat.retrieval.index import SAEIndex

    cfg = task_config([f"retrieval.hybrid_dense={args.speed_dense}"])
    poolings = list(dict.fromkeys([cfg.embed.pooling, *args.speed_poolings.split(",")]))  # the default row first
    n_max = max(args.sizes)
    texts, ids, n_abs = speed_corpus(n_max)
    console.print(f"speed: {n_abs:,} SciFact abstracts + {n_max - n_abs:,} real passages (MAEC calls, Gutenberg; "
                  f"{sum(':p0:' not in i for i in ids[n_abs:]):,} of them from the overlapping later passes), "
                  f"dense side {args.speed_dense}, poolings {', '.join(poolings)}")
    embedder = get_embedder(embed_config(cfg))
    bs = int(cfg.embed.batch_size)
    t0 = time.perf_counter()
    X: dict[str, list[sp.csr_matrix]] = {p: [] for p in poolings}
    for start in range(0, n_max, 5000):  # slices keep memory flat; the embedder's cache makes a rerun cheap
        stats = embedder.encode_stats(texts[start:start + 5000], "sae", bs, True)
        for p in poolings:
            X[p].append(pool(stats, p, int(cfg.embed.pool_k)))
        console.print(f"  sae: {min(start + 5000, n_max):,} of {n_max:,} documents ({time.perf_counter() - t0:.0f} s)")
    X = {p: sp.vstack(v, format="csr") for p, v in X.items()}
    # the dense side's own cache (the embedder's for `dense`, the sentence model's for `sentence`) makes a rerun cheap
    D = encode_dense_side(args.speed_dense, texts, embedder, cfg.baselines.sentence_model, bs, True)
    console.print(f"encoded in {time.perf_counter() - t0:.0f} s")
    data = load_beir(DATA / "retrieval" / "scifact", "train")
    qids, queries = list(data.queries), list(data.queries.values())
    # queries are encoded for real in the 'sae+encode' timing, never read from the cache
    fresh = get_embedder(embed_config(cfg, cache=False))
    query_stats = embedder.encode_stats(queries, "sae", bs, False)
    QD = encode_dense_side(args.speed_dense, queries, embedder, cfg.baselines.sentence_model, bs, False)
    rows = {}
    for pooling in poolings:
        Q = pool(query_stats, pooling, int(cfg.embed.pool_k))
        for n in args.sizes:
            index = SAEIndex(fresh, sp.csc_matrix((0, embedder.d_sae)), [], [], pooling=pooling,
                             k=int(cfg.embed.pool_k), dense_kind=args.speed_dense,
                             sentence_model=cfg.baselines.sentence_model)
            index.add_vectors(X[pooling][:n], ids[:n], texts[:n], D[:n])
            row: dict[str, float] = {"latents/doc": X[pooling][:n].nnz / n}
            lat: dict[str, list[float]] = {"sae": [], "hybrid": [], "dense": [], "sae+encode": []}
            for mode in ("sae", "hybrid"):
                got = []
                for i in range(len(queries)):
                    t1 = time.perf_counter()
                    got.append(index.rank(Q[i], QD[i], int(cfg.retrieval.depth), mode, float(cfg.retrieval.alpha)))
                    lat[mode].append(time.perf_counter() - t1)
                run = to_run(qids, index.ids, [r for r, _ in got], [s for _, s in got])
                row[f"{mode} nDCG@10"] = float(per_query_scores(data.qrels, run)["ndcg_at_10"].mean())
            for i in range(len(queries)):
                t1 = time.perf_counter()
                index.rank(Q[i], QD[i], int(cfg.retrieval.depth), "dense")
                lat["dense"].append(time.perf_counter() - t1)
            for q in queries[: args.n_encode]:
                t1 = time.perf_counter()
                index.search(q, k=10, explain=0)
                lat["sae+encode"].append(time.perf_counter() - t1)
            with tempfile.TemporaryDirectory() as tmp:
                index.save(Path(tmp) / "idx")
                size = {f.name: f.stat().st_size for f in (Path(tmp) / "idx").iterdir()}
            row |= {"postings B/doc": size["postings.npz"] / n, "dense B/doc": size.get("dense.faiss", 0) / n,
                    "texts B/doc": size["docs.parquet"] / n}
            for mode, v in lat.items():
                ms = np.array(v) * 1000
                row[f"{mode} p50 ms"], row[f"{mode} p99 ms"] = np.percentile(ms, 50), np.percentile(ms, 99)
            rows[(pooling, n)] = row
            console.print(f"  {pooling} n={n:,}: sae p50 {row['sae p50 ms']:.1f} ms, p99 {row['sae p99 ms']:.1f} ms")
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index = [f"{p} n={n}" for p, n in df.index]
    df.index.name = "pooling, docs"
    show(df[["latents/doc", "postings B/doc", "dense B/doc", "texts B/doc"]], "Index size per document", "{:.0f}")
    show(df[["sae nDCG@10", "hybrid nDCG@10"]], f"SciFact train queries (n={len(qids)}) on the same indexes "
                                                 f"(the passages are distractors)")
    lat_cols = [c for c in df.columns if "ms" in c]
    show(df[lat_cols], f"Query latency over {len(queries)} SciFact train queries (top {cfg.retrieval.depth}; "
                       f"'sae+encode' includes encoding the query with the host and SAE, {args.n_encode} queries, "
                       f"cache off)", "{:.2f}")
    default = df.loc[f"{cfg.embed.pooling} n={n_max}"]
    console.print(f"default ({cfg.embed.pooling} pooling) at {n_max:,} documents: sae p50 {default['sae p50 ms']:.1f} "
                  f"ms, p99 {default['sae p99 ms']:.1f} ms (target p50 <= 20, p99 <= 60); hybrid p50 "
                  f"{default['hybrid p50 ms']:.1f}, p99 {default['hybrid p99 ms']:.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="scifact,property,speed")
    p.add_argument("--pooling", default=None,
                   help="pooling of the indexed SAE vectors (scifact and property); default: the task's")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--n-examples", type=int, default=10)
    p.add_argument("--n-latents", type=int, default=16, help="latents of a `latents` property")
    p.add_argument("--property-method", default="classifier", choices=["classifier", "latents"])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--n-encode", type=int, default=50)
    p.add_argument("--speed-poolings", default="max,topk,log1p_topk",
                   help="speed: poolings timed besides the task's own (which is always timed and summarised)")
    p.add_argument("--speed-dense", default="sentence", help="speed: dense side of the timed index")
    p.add_argument("--override", action="append", default=[], help="config override for every section, key=value")
    args = p.parse_args()
    EXTRA_OVERRIDES.extend(args.override)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    logging.basicConfig(level=logging.WARNING)
    sections = args.sections.split(",")
    t0 = time.perf_counter()
    if "scifact" in sections:
        bench_scifact(args)
    if "property" in sections:
        bench_property(args)
    if "speed" in sections:
        bench_speed(args)
    console.print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
