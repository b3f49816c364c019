"""Embedding throughput, memory and storage: `sae` vs `dense` vs sentence-transformers, same documents.

    python benchmarks/embed_bench.py [--n-docs 2000] [--repeats 3] [--precision fp32|bf16] [--device cpu|cuda]

Each measurement runs in its own subprocess (so peak RSS is its own), with the cache off and one warm-up
batch. The representations take turns, `--repeats` rounds of them, and the median of each is reported with
its range (on a shared machine one slow stretch would otherwise land on a single representation and skew
the ratios). Tokens/s counts the content tokens each one actually reads: saefeat reads every token (long
documents are windowed), sentence-transformers truncates at its max_seq_length.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(os.environ.get("SAEFEAT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def load_docs(n: int) -> list[str]:
    """The first n SciFact abstracts (title + abstract), real scientific text of a few hundred tokens."""
    docs = []
    with gzip.open(DATA / "retrieval" / "scifact" / "corpus.jsonl.gz", "rt") as fh:
        for line in fh:
            d = json.loads(line)
            docs.append(f"{d['title']}. {d['text']}")
            if len(docs) == n:
                break
    if len(docs) < n:
        raise SystemExit(f"only {len(docs)} documents available")
    return docs


def measure(kind: str, n: int, batch_size: int, device: str, precision: str) -> dict:
    import torch

    from saefeat.device import autocast
    from saefeat.embed.embedder import SAEEmbedder

    docs = load_docs(n)
    emb = SAEEmbedder("minilm", sae="default", device=device, cache_dir=False, precision=precision)
    n_tokens = sum(len(t) for t in emb.host.tokenize(docs))
    if kind == "sentence":
        from sentence_transformers import SentenceTransformer

        from saefeat.hosts import resolve_host_path

        st = SentenceTransformer(resolve_host_path("minilm")[0], device=str(emb.device))
        limit = st.max_seq_length - 2
        n_tokens = sum(min(len(t), limit) for t in emb.host.tokenize(docs))
        with autocast(emb.device, precision):
            st.encode(docs[:batch_size], batch_size=batch_size)
            t0 = time.perf_counter()
            st.encode(docs, batch_size=batch_size)
    else:
        run = (lambda d: emb.encode(d, batch_size=batch_size, show_progress_bar=False)) if kind == "sae" else \
            (lambda d: emb.encode_dense(d, batch_size=batch_size, show_progress_bar=False))
        run(docs[:batch_size])
        t0 = time.perf_counter()
        run(docs)
    if emb.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"kind": kind, "seconds": seconds, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds,
            "docs_per_s": n / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "device": str(emb.device), "threads": torch.get_num_threads()}


def storage(n: int) -> dict:
    """Stored bytes per document: sparse SAE embeddings (max, topk k=64) vs the dense float32 embedding."""
    from saefeat.embed.embedder import SAEEmbedder
    from saefeat.embed.storage import stored_bytes

    docs = load_docs(n)
    emb = SAEEmbedder("minilm", sae="default", k=64)
    X_max = emb.encode(docs, pooling="max", show_progress_bar=False)
    X_top = emb.encode(docs, pooling="topk", show_progress_bar=False)
    dense = emb.encode_dense(docs, show_progress_bar=False)
    return {
        "dense_float32": stored_bytes(dense) / n,
        "sae_max_float16": stored_bytes(X_max) / n,
        "sae_topk64_float32": stored_bytes(X_top, "float32") / n,
        "sae_topk64_float16": stored_bytes(X_top, "float16") / n,
        "sae_max_nnz_per_doc": X_max.nnz / n,
    }


def _measure_in_subprocess(kind: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--only", kind, "--n-docs", str(a.n_docs), "--batch-size",
           str(a.batch_size), "--precision", a.precision] + (["--device", a.device] if a.device else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput, with the range over all runs."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    med = dict(ordered[len(ordered) // 2])
    med["range"] = f"{ordered[0]['tokens_per_s']:.0f}-{ordered[-1]['tokens_per_s']:.0f}"
    med["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-docs", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--only", choices=["sae", "dense", "sentence", "storage"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        out = storage(a.n_docs) if a.only == "storage" else measure(a.only, a.n_docs, a.batch_size, a.device,
                                                                     a.precision)
        print(json.dumps(out))
        return
    runs: dict[str, list[dict]] = {"sentence": [], "dense": [], "sae": []}
    for round_ in range(a.repeats):
        for kind in (*runs, "storage") if round_ == 0 else runs:
            print(f"measuring {kind} (round {round_ + 1}/{a.repeats}) ...", file=sys.stderr, flush=True)
            out = _measure_in_subprocess(kind, a)
            if kind == "storage":
                store = out
            else:
                runs[kind].append(out)
    st, dense, sae = (_median_run(runs[k]) for k in runs)
    print(f"\nembed_bench: {a.n_docs} SciFact abstracts, minilm + default SAE (layer 3, d_sae 4096), "
          f"device={sae['device']}, threads={sae['threads']}, precision={a.precision}, batch={a.batch_size}, "
          f"median of {a.repeats} interleaved rounds")
    print(f"{'representation':<28}{'tokens':>10}{'seconds':>10}{'tokens/s':>11}{'range':>15}{'docs/s':>9}"
          f"{'peak RSS MB':>13}")
    for name, r in (("sentence-transformers", st), ("dense (layer 3, mean)", dense), ("sae (layer 3, max)", sae)):
        print(f"{name:<28}{r['tokens']:>10}{r['seconds']:>10.1f}{r['tokens_per_s']:>11.0f}{r['range']:>15}"
              f"{r['docs_per_s']:>9.1f}{r['peak_rss_mb']:>13.0f}")
    print(f"sae / sentence-transformers throughput: {sae['tokens_per_s'] / st['tokens_per_s']:.2f}x  (target >= 1.2x)")
    print(f"sae overhead over dense: {100 * (dense['tokens_per_s'] / sae['tokens_per_s'] - 1):.1f}%  (target <= 10%)")
    if a.repeats > 1:
        per_round = [(s_["tokens_per_s"] / t["tokens_per_s"], 100 * (d["tokens_per_s"] / s_["tokens_per_s"] - 1))
                     for t, d, s_ in zip(runs["sentence"], runs["dense"], runs["sae"])]
        print("per round (sae/ST, overhead): " + ", ".join(f"{x:.2f}x {y:.0f}%" for x, y in per_round))
    print("stored bytes per document:")
    for key in ("dense_float32", "sae_max_float16", "sae_topk64_float32", "sae_topk64_float16"):
        print(f"  {key:<22}{store[key]:>9.0f} B  ({100 * store[key] / store['dense_float32']:.0f}% of dense float32)")
    print(f"  (max pooling keeps {store['sae_max_nnz_per_doc']:.0f} latents per document on average; "
          f"target: topk-64 <= 25% of dense)")


if __name__ == "__main__":
    main()
