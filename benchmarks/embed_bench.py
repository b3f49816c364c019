"""Embedding throughput, memory, storage and numeric drift: `sae` vs `dense` vs sentence-transformers.

    python benchmarks/embed_bench.py [--n-docs 2000] [--repeats 3] [--precision auto|fp32|bf16|int8]
                                     [--backend auto|torch|onnx] [--device cpu|cuda] [--drift-docs 2000]
                                     [--layer 3]

Throughput is measured in one process with the cache off, after a warm-up batch: the documents are cut into
slices, and each slice goes through every representation back to back (in rotating order), for `--repeats`
rounds. Each round gives paired ratios, and the medians over rounds are reported. On a shared machine a slow
stretch of a minute or more then slows all of them alike, instead of landing on one and skewing the ratios.
Peak RSS comes from one subprocess per representation. Tokens/s counts the content tokens each one actually
reads: saefeat reads every token (long documents are windowed), sentence-transformers truncates at its
max_seq_length.

Two sentence-transformers baselines: its default `encode` (torch, fp32, no autocast), and the same full model
(6 blocks, mean pooling, normalised) on ONNX Runtime int8, its best CPU backend. sentence-transformers' own
`backend="onnx"` goes through optimum, which needs transformers<5, so the export here is saefeat's own
(`saefeat.embed.onnx_sentence`, which the `sentence` representation itself runs under `auto` on such CPUs: the
fused graph of `saefeat.onnx_host`, then the same per-channel dynamic quantization optimum applies). A faster
export speeds this baseline and saefeat's rows alike.

The drift section encodes Jigsaw comments with each runtime (the int8 one twice: with the SAE step in torch fp32,
and with its int8 encoder, `saefeat.onnx_sae`, as it runs by default) and reports, against exact torch fp32: the
cosine of max-pooled SAE vectors, the share of each document's top-32 latents that are the same, and the ROC-AUC of
a logistic-regression toxicity probe on a seeded validation split, with a paired bootstrap interval of its change.
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
from saefeat.provenance import cpu_description  # noqa: E402

DATA = Path(os.environ.get("SAEFEAT_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
KINDS = ("sentence", "sentence-onnx-int8", "dense", "sae")
NAMES = {"sentence": "sentence-transformers", "sentence-onnx-int8": "sentence-transformers, ORT int8",
         "dense": "dense (layer {layer}, mean)", "sae": "sae (layer {layer}, max)"}


def default_sae_shape(layer: int | None = None) -> tuple[int, int]:
    """(layer, width) of the SAE shipped for minilm at `layer` (None: its default), the one every section
    measures."""
    from saefeat.sae.formats import resolve_sae

    sae = resolve_sae("default", "minilm", layer=layer)
    return int(sae.cfg.layer), int(sae.d_sae)


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

    def __init__(self, device: str | None, precision: str, backend: str, batch_size: int,
                 kinds: tuple[str, ...] = KINDS, layer: int | None = None):
        from saefeat.device import resolve_device
        from saefeat.embed.embedder import SAEEmbedder
        from saefeat.hosts import get_host

        self.device, self.batch_size = resolve_device(device), batch_size
        self.host = get_host("minilm", self.device)
        if "dense" in kinds or "sae" in kinds:
            self.emb = SAEEmbedder("minilm", sae="default", layer=layer, device=self.device, cache_dir=False,
                                   precision=precision, backend=backend)
        if "sentence" in kinds or "sentence-onnx-int8" in kinds:
            from sentence_transformers import SentenceTransformer

            from saefeat.hosts import resolve_host_path

            self.st = SentenceTransformer(resolve_host_path("minilm")[0], device=str(self.device))
        if "sentence-onnx-int8" in kinds and self.device.type == "cpu":
            from saefeat.embed.cache import default_cache_dir
            from saefeat.embed.onnx_sentence import OnnxSentenceEncoder

            self.st_onnx = OnnxSentenceEncoder(self.st, self.host, "int8", default_cache_dir())

    def tokens(self, kind: str, docs: list[str]) -> int:
        """Content tokens the representation reads: all of them, or up to max_seq_length for the full model."""
        lengths = [len(t) for t in self.host.tokenize(docs)]
        limit = self.host.default_window if kind.startswith("sentence") else None
        return sum(min(n, limit) if limit else n for n in lengths)

    def run(self, kind: str, docs: list[str]) -> float:
        """Seconds to encode docs with one representation."""
        import torch

        t0 = time.perf_counter()
        if kind == "sentence":  # its default encode: fp32 on CPU, as a user gets it
            self.st.encode(docs, batch_size=self.batch_size)
        elif kind == "sentence-onnx-int8":
            self.st_onnx.encode(docs, self.batch_size)
        elif kind == "dense":
            self.emb.encode_dense(docs, batch_size=self.batch_size, show_progress_bar=False)
        else:
            self.emb.encode(docs, batch_size=self.batch_size, show_progress_bar=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def throughput(a: argparse.Namespace) -> dict:
    """Tokens/s per representation per round: each slice of documents goes through all of them back to back."""
    import torch

    docs = load_docs(a.n_docs)
    r = Runners(a.device, a.precision, a.backend, a.batch_size, layer=a.layer)
    kinds = [k for k in KINDS if k != "sentence-onnx-int8" or r.device.type == "cpu"]
    for kind in kinds:
        r.run(kind, docs[: a.batch_size])  # warm-up (and the one-time ONNX export)
    slices = [docs[i:i + a.slice_docs] for i in range(0, len(docs), a.slice_docs)]
    seconds = {kind: [0.0] * a.repeats for kind in kinds}
    for round_ in range(a.repeats):
        print(f"round {round_ + 1}/{a.repeats} ...", file=sys.stderr, flush=True)
        for i, part in enumerate(slices):
            for j in range(len(kinds)):  # the order rotates, so no representation always runs first
                kind = kinds[(i + round_ + j) % len(kinds)]
                seconds[kind][round_] += r.run(kind, part)
    return {"seconds": seconds, "tokens": {kind: r.tokens(kind, docs) for kind in kinds},
            "device": str(r.device), "threads": torch.get_num_threads(), "topk": topk_kernel(r.device),
            "runtime": f"{r.emb.runtime.backend}/{r.emb.runtime.precision}, SAE step {r.emb.sae_step}"}


def peak_rss(kind: str, a: argparse.Namespace) -> dict:
    """Peak resident memory of a process that loads one representation and encodes all the documents."""
    docs = load_docs(a.n_docs)
    Runners(a.device, a.precision, a.backend, a.batch_size, kinds=(kind,), layer=a.layer).run(kind, docs)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def drift(a: argparse.Namespace) -> list[dict]:
    """Each CPU runtime against exact torch fp32 on Jigsaw comments: pooled cosine, top-latent overlap, probe AUC."""
    import numpy as np
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MaxAbsScaler

    from saefeat.device import cpu_has_native_bf16
    from saefeat.embed.embedder import SAEEmbedder

    df = pd.read_csv(DATA / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz").sample(a.drift_docs, random_state=0)
    texts, y = df["comment_text"].astype(str).tolist(), df["toxic"].to_numpy()
    tr, va = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
    runtimes = [("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32"), ("onnx", "int8 host"), ("onnx", "int8")]
    if not cpu_has_native_bf16():
        runtimes.remove(("torch", "bf16"))  # emulated bf16 runs at ~1% of fp32's speed there
    rng = np.random.default_rng(0)
    boot = [rng.integers(0, len(va), len(va)) for _ in range(1000)]
    out, ref, ref_scores = [], None, None
    for backend, precision in runtimes:
        print(f"drift: {backend}/{precision} ...", file=sys.stderr, flush=True)
        # "int8 host": the int8 host with the SAE step left in torch fp32, to show what each int8 part costs
        cls = SAEEmbedder if precision != "int8 host" else _torch_sae_step()
        emb = cls("minilm", layer=a.layer, cache_dir=False, precision=precision.split()[0], backend=backend)
        t0 = time.perf_counter()
        X = emb.encode(texts, show_progress_bar=False).tocsr()
        secs = time.perf_counter() - t0
        probe = make_pipeline(MaxAbsScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(X[tr], y[tr])
        scores = probe.decision_function(X[va])
        row = {"runtime": f"{backend}/{precision}" + (", int8 SAE" if emb.sae_step != "torch" else ""),
               "seconds": secs, "auc": roc_auc_score(y[va], scores)}
        if ref is None:
            ref, ref_scores = X, scores
        else:
            a_, b_ = ref.toarray(), X.toarray()
            row["cosine"] = float(np.mean((a_ * b_).sum(1) / np.maximum(
                np.linalg.norm(a_, axis=1) * np.linalg.norm(b_, axis=1), 1e-12)))
            top_a, top_b = np.argsort(-a_, axis=1)[:, :32], np.argsort(-b_, axis=1)[:, :32]
            row["top32_same"] = float(np.mean([len(set(p) & set(q)) / 32 for p, q in zip(top_a, top_b)]))
            diffs = [roc_auc_score(y[va][i], scores[i]) - roc_auc_score(y[va][i], ref_scores[i]) for i in boot]
            row["auc_delta_ci"] = (float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)))
        out.append(row)
    return out


def _torch_sae_step():
    from saefeat.embed.embedder import SAEEmbedder

    class TorchSAEStep(SAEEmbedder):
        sae_step = "torch"

    return TorchSAEStep


def topk_kernel(device) -> str:
    """Which top-k the SAE step ran: the compiled CPU kernel (and its instruction set) or torch.topk."""
    from saefeat.sae import topk

    if device.type != "cpu" or not topk.kernel_enabled():
        return "torch.topk"
    return "compiled kernel, " + ("AVX-512" if topk._topk.vectorised() else "portable C")


def storage(n: int, layer: int | None = None) -> dict:
    """Stored bytes per document: sparse SAE embeddings (max, topk k=64) vs the dense float32 embedding."""
    from saefeat.embed.embedder import SAEEmbedder
    from saefeat.embed.storage import stored_bytes

    docs = load_docs(n)
    emb = SAEEmbedder("minilm", sae="default", layer=layer, pool_k=64)
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
           "--precision", a.precision, "--backend", a.backend] + (["--device", a.device] if a.device else []) \
        + (["--layer", str(a.layer)] if a.layer is not None else [])
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
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"])
    p.add_argument("--drift-docs", type=int, default=2000, help="Jigsaw comments for the drift section; 0 skips it")
    p.add_argument("--layer", type=int, default=None,
                   help="the shipped minilm SAE at this layer (3: the one detox and shortcut read); default: layer 5")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-RSS and storage subprocesses")
    p.add_argument("--only", choices=[*KINDS, "storage"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        print(json.dumps(storage(a.n_docs, a.layer) if a.only == "storage" else peak_rss(a.only, a)))
        return
    from saefeat.errors import SaefeatError

    try:  # a layer nothing ships for is refused here, in one line, before any timing
        layer, width = default_sae_shape(a.layer)
    except SaefeatError as e:
        raise SystemExit(f"embed_bench: {e}") from None
    print(f"CPU: {cpu_description()}", file=sys.stderr, flush=True)
    rss, store = {}, None
    if not a.skip_memory:
        print("measuring peak memory and storage (one subprocess each) ...", file=sys.stderr, flush=True)
        rss = {kind: _in_subprocess(kind, a)["peak_rss_mb"] for kind in KINDS}
        store = _in_subprocess("storage", a)
    t = throughput(a)
    kinds = list(t["seconds"])
    tps = {kind: [t["tokens"][kind] / s_ for s_ in t["seconds"][kind]] for kind in kinds}
    print(f"\nembed_bench: {a.n_docs} SciFact abstracts, minilm + shipped SAE (layer {layer}, d_sae {width}), "
          f"device={t['device']}, threads={t['threads']}, precision={a.precision}, backend={a.backend} "
          f"(ran: {t['runtime']}), batch={a.batch_size}, top-k: {t['topk']}; {a.repeats} rounds, each slice of "
          f"{a.slice_docs} documents through all in turn")
    print(f"CPU: {cpu_description()}")
    print(f"{'representation':<34}{'tokens':>10}{'seconds':>10}{'tokens/s':>11}{'range':>15}{'docs/s':>9}"
          f"{'peak RSS MB':>13}")
    for kind in kinds:
        med = _median(tps[kind])
        mem = f"{rss[kind]:>13.0f}" if kind in rss else f"{'-':>13}"
        name = NAMES[kind].format(layer=layer)
        print(f"{name:<34}{t['tokens'][kind]:>10}{t['tokens'][kind] / med:>10.1f}{med:>11.0f}"
              f"{f'{min(tps[kind]):.0f}-{max(tps[kind]):.0f}':>15}{a.n_docs * med / t['tokens'][kind]:>9.1f}{mem}")
    ratio = [s_ / st for s_, st in zip(tps["sae"], tps["sentence"])]
    print(f"sae / sentence-transformers default encode: {_median(ratio):.2f}x  (target >= 2.0x on CPUs without "
          f"native bf16; median of the rounds' paired ratios)")
    if "sentence-onnx-int8" in tps:
        best = [s_ / st for s_, st in zip(tps["sae"], tps["sentence-onnx-int8"])]
        print(f"sae / sentence-transformers on ONNX Runtime int8: {_median(best):.2f}x  (target >= 1.2x)")
    share = [100 * (1 - d_ / s_) for d_, s_ in zip(t["seconds"]["dense"], t["seconds"]["sae"])]
    print(f"SAE step share of the sae time (sae - dense) / sae: {_median(share):.1f}%")
    print("per round (sae/ST, SAE share): " + ", ".join(f"{x:.2f}x {y:.1f}%" for x, y in zip(ratio, share)))
    if store is not None:
        print("stored bytes per document:")
        for key in ("dense_float32", "sae_max_float16", "sae_topk64_float32", "sae_topk64_float16"):
            print(f"  {key:<22}{store[key]:>9.0f} B  ({100 * store[key] / store['dense_float32']:.0f}% of dense "
                  f"float32)")
        print(f"  (max pooling keeps {store['sae_max_nnz_per_doc']:.0f} latents per document on average; "
              f"target: topk-64 <= 25% of dense)")
    if a.drift_docs:
        rows = drift(a)
        print(f"\ndrift against exact torch fp32: {a.drift_docs} Jigsaw comments (balanced set, seeded 70/30 split), "
              f"max pooling; probe = MaxAbsScaler + logistic regression (C=0.1) on the training part")
        print(f"{'runtime':<28}{'seconds':>9}{'cosine':>9}{'top-32 same':>13}{'val ROC-AUC':>13}{'change, 95% CI':>26}")
        for r in rows:
            ci = r.get("auc_delta_ci")
            ci_s = f"{r['auc'] - rows[0]['auc']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "reference"
            print(f"{r['runtime']:<28}{r['seconds']:>9.1f}{r.get('cosine', 1.0):>9.4f}{r.get('top32_same', 1.0):>13.3f}"
                  f"{r['auc']:>13.4f}{ci_s:>26}")


if __name__ == "__main__":
    main()
