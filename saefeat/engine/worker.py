"""The worker every embedding backend runs: it holds host and SAE, and turns a shard of documents into a Parquet
file of per-document token statistics.

One class for every backend (`saefeat.engine.backends`): the local backend calls it in process, the Ray backend
makes it an actor of a `map_batches` pool, so rows are the same whichever runs them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from saefeat.embed.cache import settings_hash
from saefeat.embed.config import ENCODE_TIME, EmbedConfig
from saefeat.engine.shards import write_shard


def worker_spec(config: EmbedConfig) -> dict[str, Any]:
    """What a worker is built from: the embedding config without its encode-time keys (pooling, pool_k, the
    progress bar; the batch size stays, as how the worker runs), local paths made absolute (an actor may start in
    another folder), plus the SAE's content hash, so that a replaced SAE file under the same path is another spec."""
    from saefeat.sae.formats import content_hash, sae_folder

    spec = {k: v for k, v in asdict(config).items() if k not in ENCODE_TIME or k == "batch_size"}
    for key in ("model", "sae"):
        if spec[key] not in (None, "default") and Path(spec[key]).exists():
            spec[key] = str(Path(spec[key]).resolve())
    if config.sae is not None:
        spec["sae_hash"] = content_hash(sae_folder(spec["sae"], config.model, config.layer))
    return spec


RUNTIME_KEYS = ("batch_size", "cache", "cache_dir")  # how a worker runs, never what its rows hold


def spec_hash(spec: dict[str, Any]) -> str:
    """The spec id: a hash of everything that decides a shard's rows (not `RUNTIME_KEYS`)."""
    return settings_hash({k: v for k, v in spec.items() if k not in RUNTIME_KEYS})


class StatsWorker:
    """Loads the host and SAE of `spec` once; `__call__` embeds shards of documents and writes each as Parquet.

    A batch is a dict of columns, one row per shard: `shard` (int), `first_row` (input position of its first
    document), `ids` and `texts` (lists). The result has one row per shard: its file name, row and token counts,
    checksum and seconds, and the worker's resolved settings hash (what precision and backend actually ran).
    """

    def __init__(self, spec: dict[str, Any], folder: str, threads: int | None = None):
        import torch

        from saefeat.embed.embedder import SAEEmbedder

        if threads:
            torch.set_num_threads(int(threads))
        cfg = EmbedConfig(**{k: v for k, v in spec.items() if k != "sae_hash"} | {"show_progress_bar": False})
        self.embedder = SAEEmbedder.from_config(cfg)
        if spec.get("sae_hash") and self.embedder.sae.content_hash != spec["sae_hash"]:
            raise RuntimeError(f"the SAE at {cfg.sae} changed since the run started (hash "
                               f"{self.embedder.sae.content_hash}, expected {spec['sae_hash']})")
        self.spec_hash = spec_hash(spec)
        self.settings_hash = settings_hash(self.embedder.settings("sae"))
        self.folder = Path(folder)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        records = [self.embed_shard(int(s), int(f), list(i), list(t))
                   for s, f, i, t in zip(batch["shard"], batch["first_row"], batch["ids"], batch["texts"])]
        return {key: np.array([r[key] for r in records]) for key in records[0]}

    def embed_shard(self, shard: int, first_row: int, ids: list[str], texts: list[str]) -> dict[str, Any]:
        """Embed one shard's documents and write `shard-NNNNNN.parquet` atomically; its manifest record."""
        t0 = time.perf_counter()
        stats = self.embedder.encode_stats(texts, "sae", show_progress_bar=False)
        meta = {"spec_hash": self.spec_hash, "settings_hash": self.settings_hash, "shard": shard,
                "d_sae": self.embedder.d_sae}
        name, checksum = write_shard(self.folder, shard, first_row, ids, stats, meta)
        emb = self.embedder
        return {"shard": shard, "name": name, "rows": len(ids), "n_tokens": int(stats.n_tokens.sum()),
                "checksum": checksum, "settings_hash": self.settings_hash, "d_sae": emb.d_sae,
                "host": emb.model_name, "host_fingerprint": emb.host.fingerprint, "sae": emb.sae.content_hash,
                "seconds": time.perf_counter() - t0}

