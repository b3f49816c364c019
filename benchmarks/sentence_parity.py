"""saefeat's `sentence` representation against sentence-transformers' own `encode` on SciFact's train queries.

    python benchmarks/sentence_parity.py [--precisions auto,fp32] [--long-docs truncate,mean]

Documents are the 5,183 abstracts as the retrieval task reads them (title + text); every train query is scored by
cosine over all of them, nDCG@10 by pytrec_eval as in the task. Prints the CPU, then one line per saefeat setting
and one for sentence-transformers' `encode` (fp32, its own truncation at max_seq_length, normalized). The target
(issue 20): saefeat's default within 0.005 of `encode`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="auto,fp32")
    ap.add_argument("--long-docs", default="truncate,mean")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()

    from saefeat.embed.vectorizers import SentenceVectorizer
    from saefeat.provenance import cpu_description
    from saefeat.retrieval.evaluation import load_beir, per_query_scores, to_run

    data = load_beir(Path(args.data_dir) / "retrieval" / "scifact", "train")
    qids = list(data.queries)
    queries = [data.queries[q] for q in qids]
    print(f"CPU: {cpu_description()}; {len(data.texts):,} abstracts, {len(qids)} train queries", flush=True)

    def ndcg(D: np.ndarray, Q: np.ndarray) -> float:
        D = D / np.linalg.norm(D, axis=1, keepdims=True)
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        S = Q @ D.T
        top = np.argsort(-S, axis=1)[:, :100]
        run = to_run(qids, data.doc_ids, top, np.take_along_axis(S, top, 1))
        return float(per_query_scores(data.qrels, run)["ndcg_at_10"].mean())

    for long_docs in args.long_docs.split(","):
        for precision in args.precisions.split(","):
            t0 = time.perf_counter()
            vec = SentenceVectorizer("minilm", precision=precision, long_docs=long_docs)
            score = ndcg(vec.transform(data.texts), vec.transform(queries))
            print(f"saefeat sentence, long_docs={long_docs}, precision={precision}: nDCG@10 {score:.4f} "
                  f"({time.perf_counter() - t0:.0f} s, cached rows included)", flush=True)
    st = SentenceVectorizer("minilm").st
    t0 = time.perf_counter()
    D = st.encode(data.texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    Q = st.encode(queries, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    print(f"sentence-transformers encode (fp32, truncated at {st.max_seq_length}): nDCG@10 {ndcg(D, Q):.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
