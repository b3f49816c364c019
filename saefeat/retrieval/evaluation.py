"""Retrieval evaluation: BEIR-layout data, per-query nDCG/recall (pytrec_eval), BM25 (bm25s), property metrics."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from saefeat.data import DataError, iter_jsonl
from saefeat.evaluation.metrics import bootstrap

Run = dict[str, dict[str, float]]


@dataclass
class BeirData:
    """A BEIR-layout collection: documents (title + text), the queries of one split and their judgements."""

    doc_ids: list[str]
    texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def _first(folder: Path, *names: str) -> Path:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise DataError(f"{folder}: none of {list(names)} found (expected the BEIR layout)")


def load_beir(folder: str | Path, split: str = "train") -> BeirData:
    """Read corpus.jsonl(.gz), queries.jsonl(.gz) and qrels/<split>.tsv; only judged queries are kept."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: retrieval data folder not found")
    corpus_path = _first(folder, "corpus.jsonl.gz", "corpus.jsonl")
    doc_ids, texts = [], []
    for i, row in enumerate(iter_jsonl(corpus_path)):
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{corpus_path}, row {i}: needs fields '_id' and 'text' (a string)")
        doc_ids.append(str(row["_id"]))
        texts.append(f"{row.get('title') or ''} {row['text']}".strip())
    queries_path = _first(folder, "queries.jsonl.gz", "queries.jsonl")
    all_queries = {}
    for i, row in enumerate(iter_jsonl(queries_path)):
        if "_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{queries_path}, row {i}: needs fields '_id' and 'text' (a string)")
        all_queries[str(row["_id"])] = row["text"]
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise DataError(f"{qrels_path}: no judgements for split {split!r}; available splits: {have}")
    known = set(doc_ids)
    qrels: dict[str, dict[str, int]] = {}
    with open(qrels_path, encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise DataError(f"{qrels_path}: expected the header 'query-id corpus-id score', got {header}")
        for line, row in enumerate(reader, 2):
            if len(row) < 3:
                raise DataError(f"{qrels_path}, line {line}: expected 3 tab-separated fields, got {row}")
            qid, did = row[0].strip(), row[1].strip()
            if qid not in all_queries:
                raise DataError(f"{qrels_path}, line {line}: query-id {qid!r} is not in {queries_path.name}")
            if did not in known:
                raise DataError(f"{qrels_path}, line {line}: corpus-id {did!r} is not in {corpus_path.name}")
            qrels.setdefault(qid, {})[did] = int(row[2])
    return BeirData(doc_ids, texts, {q: all_queries[q] for q in qrels}, qrels)


def subset(data: BeirData, max_queries: int | None = None, max_docs: int | None = None, seed: int = 0) -> BeirData:
    """The first `max_queries` queries, and their judged documents plus a random sample up to `max_docs`."""
    qids = list(data.queries)[: max_queries or None]
    qrels = {q: data.qrels[q] for q in qids}
    keep = np.arange(len(data.doc_ids))
    if max_docs:
        judged = {d for q in qids for d in qrels[q]}
        rows = [i for i, d in enumerate(data.doc_ids) if d in judged]
        rest = np.setdiff1d(np.arange(len(data.doc_ids)), rows)
        extra = np.random.default_rng(seed).permutation(rest)[: max(0, max_docs - len(rows))]
        keep = np.sort(np.concatenate([rows, extra]).astype(int))
    return BeirData([data.doc_ids[i] for i in keep], [data.texts[i] for i in keep],
                    {q: data.queries[q] for q in qids}, qrels)


def per_query_scores(qrels: dict[str, dict[str, int]], run: Run) -> dict[str, np.ndarray]:
    """nDCG@10 and Recall@100 for every judged query (0 for a query with no results), in qrels order."""
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    res = evaluator.evaluate({q: run.get(q, {}) for q in qrels})
    ndcg = np.array([res.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels])
    recall = np.array([res.get(q, {}).get("recall_100", 0.0) for q in qrels])
    return {"ndcg_at_10": ndcg, "recall_at_100": recall}


def retrieval_report(per_query: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Means of the per-query scores with bootstrap 95% intervals over queries."""
    ndcg, recall = per_query["ndcg_at_10"], per_query["recall_at_100"]
    metrics = {"ndcg_at_10": lambda y, a, b: float(np.mean(a)), "recall_at_100": lambda y, a, b: float(np.mean(b))}
    return bootstrap(metrics, np.zeros(len(ndcg)), ndcg, recall, n_boot=n_boot, seed=seed)


def to_run(qids: Sequence[str], doc_ids: Sequence[str], rows: Sequence[np.ndarray],
           scores: Sequence[np.ndarray]) -> Run:
    """A pytrec_eval run from per-query result rows and scores."""
    return {q: {doc_ids[int(r)]: float(s) for r, s in zip(rr, ss)} for q, rr, ss in zip(qids, rows, scores)}


class BM25:
    """BM25 (bm25s, Lucene variant) with English stop words and Snowball stemming: the lexical anchor.

    Once fitted it is a `Retriever` (`saefeat.retrieval.retrievers`): `search(queries, k) -> (rows, scores)`.
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b

    def _tokenize(self, texts: Sequence[str]):
        import bm25s
        import Stemmer

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=Stemmer.Stemmer("english"), show_progress=False)

    def fit(self, texts: Sequence[str]) -> BM25:
        import bm25s

        self.n_docs = len(texts)
        self.model = bm25s.BM25(k1=self.k1, b=self.b)
        self.model.index(self._tokenize(texts), show_progress=False)
        return self

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores), each (n_queries, k), best first."""
        rows, scores = self.model.retrieve(self._tokenize(queries), k=min(k, self.n_docs), show_progress=False)
        return np.asarray(rows), np.asarray(scores)


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(average_precision_score(np.asarray(labels).astype(bool), scores))


def precision_at(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of relevant documents among the k best scored (ties broken by row order)."""
    order = np.argsort(-np.asarray(scores), kind="stable")[:k]
    return float(np.mean(np.asarray(labels)[order]))
