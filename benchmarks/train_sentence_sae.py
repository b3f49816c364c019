"""Train an SAE over a sentence-transformers model's sentence embeddings, as a recipe of configs/train/store/ says.

    python benchmarks/train_sentence_sae.py minilm-sentence-4k [key=value ...]

Reads the recipe's activation store (write it first with benchmarks/train_sae_store.py), encodes the short chunks
(kept in the output folder, so a rerun skips them), trains, and saves the SAE to `<output>/sae`. Prints the CPU
flags, the vectors' sources and sizes, and the held-out explained variance, L0 and dead share.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from saefeat.atomic import atomic_write  # noqa: E402
from saefeat.config import apply_overrides, parse_overrides, read_config, to_dict  # noqa: E402
from saefeat.embed.vectorizers import SentenceVectorizer  # noqa: E402
from saefeat.provenance import cpu_description  # noqa: E402
from saefeat.sae.formats import save_sae  # noqa: E402
from saefeat.sae.sentence import short_chunks, train_vector_sae, window_embeddings  # noqa: E402
from saefeat.sae.store import ActivationStore  # noqa: E402


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    name, overrides = argv[0], argv[1:]
    base = read_config("base.yaml")
    recipe = OmegaConf.merge({"data_dir": base.data_dir}, read_config("train", "store", f"{name}.yaml"))
    store_recipe = read_config("train", "store", f"{recipe.store}.yaml")
    cfg = apply_overrides(OmegaConf.merge(recipe, {"store_output": store_recipe.output}), parse_overrides(overrides))
    OmegaConf.resolve(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_description()}", flush=True)
    store = ActivationStore(cfg.store_output)
    t0 = time.perf_counter()
    windows = window_embeddings(store, int(cfg.layer))
    print(f"{len(windows):,} window vectors from {store.folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    st = SentenceVectorizer(model=str(cfg.model), batch_size=64, cache_dir=False, show_progress_bar=True)
    chunk_file = out / "short_chunks.npy"
    if chunk_file.is_file() and len(np.load(chunk_file, mmap_mode="r")) == int(cfg.short_chunks):
        chunks = np.load(chunk_file)
    else:
        lo, hi = (int(v) for v in cfg.short_tokens)
        texts = short_chunks(store, lambda ids: st.st.tokenizer.decode(ids), int(cfg.short_chunks), lo, hi,
                             int(cfg.train.seed))
        t1 = time.perf_counter()
        chunks, _ = st.encode_chunks(texts)
        print(f"{len(texts):,} short chunks encoded in {time.perf_counter() - t1:.0f} s", flush=True)
        atomic_write(chunk_file, lambda tmp: Path(tmp).write_bytes(_npy_bytes(chunks)))
    vectors = np.concatenate([windows, chunks]).astype(np.float32)
    t = cfg.train
    t2 = time.perf_counter()
    sae, metrics = train_vector_sae(vectors, int(t.d_sae), int(t.k), host=str(cfg.model), epochs=int(t.epochs),
                                    batch_size=int(t.batch_size), lr=float(t.lr), seed=int(t.seed),
                                    log=lambda m, step: print(f"step {step} EV {m['explained_variance']:.4f} "
                                                              f"L0 {m['l0']:.1f}", flush=True))
    metrics["train_seconds"] = time.perf_counter() - t2
    path = save_sae(sae, out / "sae", meta={"recipe": to_dict(cfg), "metrics": metrics}, half=bool(cfg.half))
    atomic_write(out / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=2)))
    print(f"saved {sae.describe()} to {path}: held-out EV {metrics['explained_variance']:.4f}, "
          f"L0 {metrics['l0']:.1f}, dead {metrics['dead_fraction']:.2%}, {metrics['train_seconds']:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
