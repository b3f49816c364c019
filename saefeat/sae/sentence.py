"""SAEs over sentence embeddings (the `sae_sentence` representation): their training data and their training.

The data comes from an activation store of the sentence-transformers model's final block: the mean of a window's
token activations, L2-normalised, is what the model's mean pooling and Normalize give for that window's text
(cosine 0.995 on minilm's held-out windows; the store leaves out [CLS]/[SEP]). Short texts are not like the
windows they sit in (a span's in-context mean has cosine 0.68 to the span encoded alone), so short chunks of the
same training windows are encoded by the model itself and added.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from saefeat.errors import SaefeatError
from saefeat.sae.model import SAE, SAEConfig
from saefeat.sae.store import ActivationStore
from saefeat.sae.train import Objective, SAETrainer, init_weights, input_scale

SITE = "sentence_embedding"  # SAEConfig.site of an SAE over a sentence-transformers model's pooled embeddings


def window_embeddings(store: ActivationStore, layer: int) -> np.ndarray:
    """One L2-normalised mean-pooled vector per training window of the store (float32, (windows, d_model))."""
    out = []
    for i, rec in enumerate(store.shards):
        acts = store.shard(i, layer)
        lengths = np.load(store.folder / rec["name"] / "lengths.npy")
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        sums = np.add.reduceat(np.asarray(acts, dtype=np.float32), bounds[:-1], axis=0)
        out.append(sums / lengths[:, None])
    vecs = np.concatenate(out)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-8)


def short_chunks(store: ActivationStore, decode: Callable[[list[int]], str], n: int, min_tokens: int = 16,
                 max_tokens: int = 128, seed: int = 0) -> list[str]:
    """`n` texts of `min_tokens`..`max_tokens` tokens cut at random from the store's training windows."""
    rng = np.random.default_rng(seed)
    per_shard = math.ceil(n / len(store.shards))
    texts: list[str] = []
    for i in range(len(store.shards)):
        windows = store.windows(i)
        for w in rng.choice(len(windows), per_shard, replace=per_shard > len(windows)):  # spans differ on repeats
            ids = windows[int(w)]
            size = int(rng.integers(min_tokens, min(max_tokens, len(ids)) + 1)) if len(ids) > min_tokens else len(ids)
            start = int(rng.integers(0, len(ids) - size + 1))
            texts.append(decode(ids[start:start + size]))
    return texts[:n]


def train_vector_sae(vectors: np.ndarray, d_sae: int, k: int, host: str, epochs: int = 30, batch_size: int = 1024,
                     lr: float = 1e-3, seed: int = 0, held_out: float = 0.05,
                     log: Callable[[dict[str, float], int], None] | None = None,
                     extra: dict[str, Any] | None = None) -> tuple[SAE, dict[str, float]]:
    """A TopK SAE trained on rows of `vectors` (sentence embeddings); returns it and its held-out metrics
    (explained variance, L0, dead share over the held-out rows)."""
    if vectors.ndim != 2 or len(vectors) < 100:
        raise SaefeatError(f"need at least 100 vectors (rows, d) to train on, got shape {vectors.shape}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(vectors))
    n_eval = max(1, int(held_out * len(vectors)))
    train, evals = vectors[order[n_eval:]], vectors[order[:n_eval]]
    torch.manual_seed(seed)
    sample = torch.from_numpy(train[:4096]).float()
    cfg = SAEConfig(d_in=vectors.shape[1], d_sae=d_sae, architecture="topk", k=k, input_scale=input_scale(sample),
                    host=host, layer=None, hook_name=SITE, site=SITE, extra=dict(extra or {}))
    sae = init_weights(SAE(cfg), sample, seed).train()
    steps_per_epoch = max(1, len(train) // batch_size)
    trainer = SAETrainer(sae, Objective("topk", k, vectors.shape[1] // 2, 1 / 32, 10 * len(train)),
                         epochs * steps_per_epoch, lr, min(50, steps_per_epoch), precision="fp32")
    for epoch in range(epochs):
        perm = rng.permutation(len(train))
        for j in range(steps_per_epoch):
            stats = trainer.step(torch.from_numpy(train[perm[j * batch_size:(j + 1) * batch_size]]).float())
            if log and (j == steps_per_epoch - 1):
                log({"explained_variance": 1.0 - stats["fvu"], "l0": stats["l0"], "epoch": float(epoch)},
                    trainer.step_count)
    sae.eval()
    return sae, vector_metrics(sae, evals)


@torch.no_grad()
def vector_metrics(sae: SAE, vectors: np.ndarray) -> dict[str, float]:
    """Explained variance, mean L0 and the share of latents that never fire on `vectors`."""
    x = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
    z = sae.encode(x)
    recon = sae.decode(z)
    ev = 1.0 - float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    fired = (z > 0).any(0)
    return {"explained_variance": ev, "l0": float((z > 0).sum(1).float().mean()),
            "dead_fraction": 1.0 - float(fired.float().mean()), "rows": float(len(vectors))}


def check_sentence_sae(sae: SAE, model: str, d_model: int, names: Sequence[str] = ()) -> None:
    """Refuse, by name, an SAE that was not trained on `model`'s sentence embeddings."""
    c = sae.cfg
    if c.site != SITE:
        raise SaefeatError(f"SAE {sae.describe()} was trained at site {c.site!r}, not on sentence embeddings "
                           f"(site {SITE!r}); use it as `sae`, or give sae_sentence an SAE trained with "
                           "saefeat.sae.sentence")
    if c.d_in != d_model or (c.host and c.host not in (model, *names)):
        raise SaefeatError(f"SAE {sae.describe()} was trained on {c.host!r} sentence embeddings (d={c.d_in}), "
                           f"not on {model!r} (d={d_model})")
