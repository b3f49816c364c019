"""Embedding throughput, memory and storage: `sae` vs `dense` vs sentence-transformers, same documents.

    python benchmarks/embed_bench.py [--n-docs 2000] [--repeats 3] [--precision fp32|bf16] [--device cpu|cuda]

Throughput is measured in one process with the cache off, after a warm-up batch: the documents are cut into
slices, and each slice goes through the three representations back to back (in rotating order), for
`--repeats` rounds. Each round gives paired ratios, and the medians over rounds are reported. On a shared
machine a slow stretch of a minute or more then slows all three alike, instead of landing on one of them and
skewing the ratios. Peak RSS comes from one subprocess per representation, so each is its own. Tokens/s counts
the content tokens each one actually reads: saefeat reads every token (long documents are windowed),
sentence-transformers truncates at its max_seq_length.
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
KINDS = ("sentence", "dense", "sae")


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


class Runners:
    """The representations over the same documents: loaded once, cache off."""

    def __init__(self, device: str | None, precision: str, batch_size: int, kinds: tuple[str, ...] = KINDS):
        from saefeat.device import resolve_device

        self.device, self.precision, self.batch_size = resolve_device(device), precision, batch_size
        if "dense" in kinds or "sae" in kinds:
            from saefeat.embed.embedder import SAEEmbedder

            self.emb = SAEEmbedder("minilm", sae="default", device=self.device, cache_dir=False, precision=precision)
        if "sentence" in kinds:
            from sentence_transformers import SentenceTransformer

            from saefeat.hosts import resolve_host_path

            self.st = SentenceTransformer(resolve_host_path("minilm")[0], device=str(self.device))

    def tokens(self, kind: str, docs: list[str]) -> int:
        """Content tokens the representation reads: all of them, or up to max_seq_length for the full model."""
        lengths = [len(t) for t in self.emb.host.tokenize(docs)]
        limit = self.st.max_seq_length - 2 if kind == "sentence" else None
        return sum(min(n, limit) if limit else n for n in lengths)

    def run(self, kind: str, docs: list[str]) -> float:
        """Seconds to encode docs with one representation."""
        import torch

        from saefeat.device import autocast

        t0 = time.perf_counter()
        if kind == "sentence":  # under the same autocast as saefeat's host, so precision is not what differs
            with autocast(self.device, self.precision):
                self.st.encode(docs, batch_size=self.batch_size)
        elif kind == "dense":
            self.emb.encode_dense(docs, batch_size=self.batch_size, show_progress_bar=False)
        else:
            self.emb.encode(docs, batch_size=self.batch_size, show_progress_bar=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def throughput(a: argparse.Namespace) -> dict:
    """Tokens/s per representation per round: each slice of documents goes through all three back to back."""
    import torch

    docs = load_docs(a.n_docs)
    r = Runners(a.device, a.precision, a.batch_size)
    for kind in KINDS:
        r.run(kind, docs[: a.batch_size])  # warm-up
    slices = [docs[i:i + a.slice_docs] for i in range(0, len(docs), a.slice_docs)]
    seconds = {kind: [0.0] * a.repeats for kind in KINDS}
    for round_ in range(a.repeats):
        print(f"round {round_ + 1}/{a.repeats} ...", file=sys.stderr, flush=True)
        for i, part in enumerate(slices):
            for j in range(len(KINDS)):  # the order rotates, so no representation always runs first
                kind = KINDS[(i + round_ + j) % len(KINDS)]
                seconds[kind][round_] += r.run(kind, part)
    return {"seconds": seconds, "tokens": {kind: r.tokens(kind, docs) for kind in KINDS},
            "device": str(r.device), "threads": torch.get_num_threads(), "topk": topk_kernel(r.device)}


def peak_rss(kind: str, a: argparse.Namespace) -> dict:
    """Peak resident memory of a process that loads one representation and encodes all the documents."""
    docs = load_docs(a.n_docs)
    Runners(a.device, a.precision, a.batch_size, kinds=(kind,)).run(kind, docs)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def topk_kernel(device) -> str:
    """Which top-k the SAE step ran: the compiled CPU kernel (and its instruction set) or torch.topk."""
    from saefeat.sae import topk

    if device.type != "cpu" or not topk.kernel_enabled():
        return "torch.topk"
    return "compiled kernel, " + ("AVX-512" if topk._topk.vectorised() else "portable C")


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


def _in_subprocess(what: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--only", what, "--n-docs", str(a.n_docs), "--batch-size", str(a.batch_size),
           "--precision", a.precision] + (["--device", a.device] if a.device else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-docs", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="rounds over all documents; medians are reported")
    p.add_argument("--slice-docs", type=int, default=250, help="documents each representation encodes in turn")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--only", choices=[*KINDS, "storage"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        print(json.dumps(storage(a.n_docs) if a.only == "storage" else peak_rss(a.only, a)))
        return
    print("measuring peak memory and storage (one subprocess each) ...", file=sys.stderr, flush=True)
    rss = {kind: _in_subprocess(kind, a)["peak_rss_mb"] for kind in KINDS}
    store = _in_subprocess("storage", a)
    t = throughput(a)
    tps = {kind: [t["tokens"][kind] / s_ for s_ in t["seconds"][kind]] for kind in KINDS}
    ratio = [s_ / st for s_, st in zip(tps["sae"], tps["sentence"])]
    overhead = [100 * (d / s_ - 1) for d, s_ in zip(tps["dense"], tps["sae"])]
    print(f"\nembed_bench: {a.n_docs} SciFact abstracts, minilm + default SAE (layer 3, d_sae 4096), "
          f"device={t['device']}, threads={t['threads']}, precision={a.precision}, batch={a.batch_size}, "
          f"top-k: {t['topk']}; {a.repeats} rounds, each slice of {a.slice_docs} documents through all three in turn")
    print(f"{'representation':<28}{'tokens':>10}{'seconds':>10}{'tokens/s':>11}{'range':>15}{'docs/s':>9}"
          f"{'peak RSS MB':>13}")
    for kind, name in zip(KINDS, ("sentence-transformers", "dense (layer 3, mean)", "sae (layer 3, max)")):
        med = _median(tps[kind])
        print(f"{name:<28}{t['tokens'][kind]:>10}{t['tokens'][kind] / med:>10.1f}{med:>11.0f}"
              f"{f'{min(tps[kind]):.0f}-{max(tps[kind]):.0f}':>15}{a.n_docs * med / t['tokens'][kind]:>9.1f}"
              f"{rss[kind]:>13.0f}")
    print(f"sae / sentence-transformers throughput: {_median(ratio):.2f}x  (target >= 1.2x; median of the rounds' "
          f"paired ratios)")
    print(f"sae overhead over dense: {_median(overhead):.1f}%  (target <= 10%)")
    print("per round (sae/ST, overhead): " + ", ".join(f"{x:.2f}x {y:.1f}%" for x, y in zip(ratio, overhead)))
    print("stored bytes per document:")
    for key in ("dense_float32", "sae_max_float16", "sae_topk64_float32", "sae_topk64_float16"):
        print(f"  {key:<22}{store[key]:>9.0f} B  ({100 * store[key] / store['dense_float32']:.0f}% of dense float32)")
    print(f"  (max pooling keeps {store['sae_max_nnz_per_doc']:.0f} latents per document on average; "
          f"target: topk-64 <= 25% of dense)")


if __name__ == "__main__":
    main()
