"""Throughput of the embedding backends on the same documents: local, Ray with 1 actor, Ray with 2 actors.

    python benchmarks/engine_bench.py [--docs 2000] [--device cpu]

The documents are the first N comments of the shared Jigsaw toxicity set, embedded with the shipped minilm SAE
into a shard folder (cache off, so every run computes). Each backend runs in its own process, so the driver's peak
RSS is its own; the local run and the 1-actor Ray run use 2 torch threads, the 2-actor run 1 thread an actor.
Prints the CPU, docs/s and tokens/s (wall time from the call to the finished manifest, model loading included),
the time to the first finished shard and the rate after it (start-up excluded), the driver's peak RSS, and Ray's
overhead over local at 1 actor both ways (target <= 15%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"local": {"backend": "local"},
           "ray, 1 actor x 2 CPUs": {"backend": "ray", "concurrency": 1, "num_cpus": 2},
           "ray, 2 actors x 1 CPU": {"backend": "ray", "concurrency": 2, "num_cpus": 1}}


def one(name: str, corpus: str, out: str, device: str) -> dict:
    """Run one backend in this process; its figures."""
    import torch

    from saefeat.embed.config import EmbedConfig
    from saefeat.engine import RayOptions, embed_corpus

    spec = CONFIGS[name]
    torch.set_num_threads(2)
    ray = RayOptions(concurrency=spec.get("concurrency", 1), num_cpus=spec.get("num_cpus", 1),
                     num_cpus_total=2, num_gpus=1 if device == "cuda" and spec["backend"] == "ray" else 0)
    config = EmbedConfig(cache=False, device=device)
    t0 = time.perf_counter()
    run = embed_corpus(corpus, out, config, backend=spec["backend"], shard_rows=250, ray=ray, show_progress_bar=False)
    wall = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"docs": run.docs, "tokens": run.tokens, "seconds": wall, "docs_per_s": run.docs / wall,
            "tokens_per_s": run.tokens / wall, "steady_docs_per_s": run.steady_docs_per_s,
            "first_shard_seconds": run.first_shard_seconds, "driver_peak_rss_mb": rss_mb,
            "settings_hash": run.manifest["settings_hash"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.corpus, args.out, args.device)))
        return

    from saefeat.detox.data import load_labelled_comments
    from saefeat.provenance import cpu_description

    texts, _ = load_labelled_comments(Path(args.data_dir) / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz")
    print(f"CPU: {cpu_description()}; {os.cpu_count()} cores; device {args.device}; {args.docs} Jigsaw comments",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "docs.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:args.docs]))
        for i, name in enumerate(CONFIGS):
            cmd = [sys.executable, __file__, "--one", name, "--corpus", str(corpus), "--out", f"{tmp}/out{i}",
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"MLFLOW_TRACKING_URI":
                                                                                        f"sqlite:///{tmp}/m.db"})
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[name]
            print(f"{name:24s} {r['docs_per_s']:7.1f} docs/s {r['tokens_per_s']:8,.0f} tokens/s "
                  f"({r['tokens']:,} tokens in {r['seconds']:.1f} s; first shard after "
                  f"{r['first_shard_seconds']:.1f} s, "
                  f"then {r['steady_docs_per_s']:.1f} docs/s)  driver peak RSS {r['driver_peak_rss_mb']:,.0f} MB",
                  flush=True)
    local, ray1 = results["local"], results["ray, 1 actor x 2 CPUs"]
    for label, key in (("end to end", "tokens_per_s"), ("after the first shard", "steady_docs_per_s")):
        overhead = local[key] / ray1[key] - 1
        verdict = "met" if overhead <= 0.15 else "NOT met"
        print(f"Ray overhead over local at 1 actor, {label}: {overhead:+.1%} (target <= 15%: {verdict})")
    same = len({r["settings_hash"] for r in results.values()}) == 1
    print(f"resolved settings identical across backends: {same}")


if __name__ == "__main__":
    main()
