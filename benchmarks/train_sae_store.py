"""Write an activation store and train one SAE variant from it, as a recipe of configs/train/store/ says.

    python benchmarks/train_sae_store.py minilm-topk-16k [key=value ...] [--store-only] [--device cpu]

The variant recipe (e.g. `minilm-topk-16k`) names its store recipe (`store: minilm-store`); the store is written
first where it is missing or unfinished (an interrupted write resumes after its last finished shard), then the
SAE trains from it (an interrupted run resumes from its last checkpoint: run the same command again). Overrides
are dotted keys of the combined recipe: `train.lr=3e-4`, `output=/tmp/run`, `store.train_tokens=200000`,
`store.output=/tmp/store`, `data_dir=...`. Prints the CPU flags, and tokens/s of both phases.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from saefeat.config import apply_overrides, parse_overrides, read_config, to_dict  # noqa: E402
from saefeat.hosts import load_host  # noqa: E402
from saefeat.sae.store import ActivationStore, store_config, write_store  # noqa: E402
from saefeat.sae.train import StoreTrainConfig, train_from_store  # noqa: E402

TARGETS = {"explained_variance": 0.85, "dead_fraction": 0.01}  # issue 17, for the shipped minilm SAE


def cpu_flags() -> str:
    """The bf16-relevant flags of /proc/cpuinfo (what `grep -o 'avx512_bf16\\|amx_bf16\\|avx2'` shows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return " ".join(sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", text)))) or "none of avx2/avx512_bf16"


def load_recipe(name: str, overrides: list[str]) -> DictConfig:
    """The variant recipe with its store recipe under `store`, `data_dir` from base.yaml, overrides applied."""
    variant = read_config("train", "store", f"{name}.yaml")
    store_name = str(variant.store)
    base = read_config("base.yaml")
    store = read_config("train", "store", f"{store_name}.yaml")
    cfg = OmegaConf.merge({"data_dir": base.data_dir}, variant, {"store": store}, {"store_recipe": store_name})
    cfg = apply_overrides(cfg, parse_overrides(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="variant recipe in configs/train/store/, e.g. minilm-topk-16k")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the combined recipe")
    ap.add_argument("--store-only", action="store_true", help="write the store, do not train")
    ap.add_argument("--device", default="cpu", help="device of the host pass and of training (cpu, cuda)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    args = ap.parse_args()
    cfg = load_recipe(args.recipe, args.overrides)
    s = cfg.store
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"nice {os.nice(0)}, device {args.device}", flush=True)

    host = load_host(str(s.model), device=args.device)
    store_doc = {k: v for k, v in to_dict(s).items() if k not in ("model", "output", "runs_dir")}
    t0 = time.perf_counter()
    store = write_store(host, store_config(store_doc), s.output, show_progress_bar=not args.no_progress)
    wall = time.perf_counter() - t0
    last = store.manifest.get("last_write", {"tokens": 0, "seconds": wall})
    total = store.manifest["written"]
    print(f"store {store.folder}: {store.train_tokens:,} training + {store.manifest['eval']['tokens']:,} held-out "
          f"tokens, layers {store.layers}, fingerprint {store.fingerprint}", flush=True)
    if last["tokens"]:
        print(f"  store write, this run: {last['tokens']:,} tokens in {last['seconds']:.0f} s = "
              f"{last['tokens'] / last['seconds']:,.0f} tok/s (host forward to layer {max(store.layers)}, "
              f"{s.precision})", flush=True)
    if total["seconds"]:
        print(f"  store write, all runs: {total['tokens']:,} tokens in {total['seconds']:.0f} s of shard writing = "
              f"{total['tokens'] / total['seconds']:,.0f} tok/s", flush=True)
    del host
    if args.store_only:
        return

    tc = StoreTrainConfig(**to_dict(cfg.train))
    t0 = time.perf_counter()
    sae, metrics, out = train_from_store(ActivationStore(store.folder), tc, cfg.output, half=bool(cfg.half),
                                         meta={"recipe": to_dict(cfg)}, device=args.device,
                                         show_progress_bar=not args.no_progress)
    wall = time.perf_counter() - t0
    print(f"saved {sae.describe()} to {out}")
    print(f"  training: {metrics['train_tokens']:,.0f} tokens in {metrics['train_seconds']:.0f} s of training = "
          f"{metrics['train_tokens'] / metrics['train_seconds']:,.0f} tok/s (all sessions; this one {wall:.0f} s "
          "with the final evaluation)")
    for k, v in metrics.items():
        print(f"  {k}: {v:.4f}")
    for k, bar in TARGETS.items():
        ok = metrics[k] >= bar if k == "explained_variance" else metrics[k] <= bar
        print(f"  target {k} {'>=' if k == 'explained_variance' else '<='} {bar}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    sys.exit(main())
