"""`embed_corpus`: a corpus file in, a resumable shard folder of token statistics out, on any backend."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

import saefeat
from saefeat.data import load_texts
from saefeat.embed.config import EmbedConfig
from saefeat.engine.backends import RayOptions, Shard, run_local, run_ray
from saefeat.engine.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    ShardFolderError,
    read_manifest,
    shard_intact,
    shard_meta,
    shard_name,
    write_manifest,
)
from saefeat.engine.worker import spec_hash, worker_spec
from saefeat.errors import OutputExistsError, SaefeatError
from saefeat.hashing import file_sha256

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


@dataclass
class EmbeddingRun:
    """What one call of `embed_corpus` did: the folder, its manifest, and this session's throughput."""

    folder: Path
    manifest: dict[str, Any]
    docs: int
    tokens: int
    seconds: float
    first_shard_seconds: float = 0.0  # until the first shard landed: start-up (Ray, model loading) plus one shard
    first_shard_docs: int = 0

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def steady_docs_per_s(self) -> float:
        """Documents a second after the first shard landed (start-up excluded)."""
        rest = self.seconds - self.first_shard_seconds
        return (self.docs - self.first_shard_docs) / rest if rest > 0 else 0.0


def _refuse_foreign(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest (None when there is none); refuses a file or a folder saefeat did not write."""
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"output={folder} is a file; a shard folder is written there (use a .npz name "
                                "for one pooled file)")
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None and folder.is_dir() and any(folder.iterdir()):
        raise OutputExistsError(f"output={folder} is a folder saefeat did not write (no {MANIFEST}); choose another")
    return manifest


def _prepare_folder(folder: Path, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest to resume, None to start afresh; refuses (without overwrite) another run's folder."""
    manifest = _refuse_foreign(folder)
    if manifest is None:
        return None
    changed = sorted(k for k in identity if manifest.get(k) != identity[k])
    if not changed:
        return manifest
    if not overwrite:
        raise OutputExistsError(f"output={folder} holds embeddings of other settings ({', '.join(changed)}); pass "
                                "overwrite=true to replace them, or choose another folder")
    for p in folder.iterdir():  # a saefeat embeddings folder (its manifest says so): its own files only
        if p.name == MANIFEST or p.name.startswith("shard-"):
            p.unlink()
    return None


def _finished(folder: Path, manifest: dict[str, Any], n_shards: int, spec_id: str) -> dict[int, dict[str, Any]]:
    """Shards already done: those in the manifest whose file verifies, and shard files a killed run wrote after
    its last manifest update (adopted when their metadata names this spec)."""
    done: dict[int, dict[str, Any]] = {}
    for key, record in manifest.get("shards", {}).items():
        if shard_intact(folder, record):
            done[int(key)] = record
        else:
            logger.warning("%s: missing or damaged, recomputing it", folder / record["name"])
    for i in range(n_shards):
        path = folder / shard_name(i)
        if i in done or not path.is_file():
            continue
        try:
            meta = shard_meta(path)
        except (ShardFolderError, OSError, ValueError):
            continue
        if meta.get("spec_hash") == spec_id and meta.get("shard") == i:
            done[i] = {"shard": i, "name": path.name, "rows": pq.read_metadata(path).num_rows,
                       "checksum": file_sha256(path), "settings_hash": meta.get("settings_hash"),
                       "d_sae": meta.get("d_sae"), "adopted": True}
    return done


def embed_corpus(input: str | Path, output: str | Path, config: EmbedConfig | None = None, *,
                 text_field: str = "text", id_field: str | None = None, backend: str = "local",
                 shard_rows: int = 1000, ray: RayOptions | None = None, overwrite: bool = False,
                 allow_empty: bool = False, show_progress_bar: bool = True) -> EmbeddingRun:
    """Embed a CSV/JSONL/Parquet corpus into a shard folder at `output` (Parquet shards of `shard_rows`
    documents and `manifest.json`); read it back with `saefeat.read_embeddings(output, pooling=...)`.

    Rerunning with the same input and settings resumes: finished shards are kept, the rest computed. `backend`:
    `local` (this process) or `ray` (a Ray Data actor pool, see `RayOptions`). Rows are the same on both.
    """
    if backend not in BACKENDS:
        raise SaefeatError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if shard_rows < 1:
        raise SaefeatError(f"shard_rows must be >= 1, got {shard_rows}")
    config = config or EmbedConfig()
    if config.sae is None:
        raise SaefeatError("a shard folder holds SAE statistics; embed.sae=None has none (use a .npz output)")
    ray = ray or RayOptions()
    folder = Path(output).resolve()
    _refuse_foreign(folder)  # before any reading
    input = Path(input)
    texts, ids = load_texts(input, text_field, id_field, allow_empty=allow_empty)  # every row checked first
    spec = worker_spec(config)
    spec_id = spec_hash(spec)
    identity = {"spec_hash": spec_id, "input_sha256": file_sha256(input), "rows": len(texts),
                "text_field": text_field, "id_field": id_field, "shard_rows": shard_rows}
    manifest = _prepare_folder(folder, identity, overwrite)
    n_shards = -(-len(texts) // shard_rows)
    if manifest is None:
        manifest = {"format": FORMAT, "version": VERSION, **identity, "spec": spec, "input": str(input.resolve()),
                    "n_shards": n_shards, "shards": {}, "complete": False, "sessions": []}
    done = _finished(folder, manifest, n_shards, spec_id)
    manifest["shards"] = {str(k): v for k, v in sorted(done.items())}
    manifest["complete"] = len(done) == n_shards
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, manifest)
    todo = [Shard(i, i * shard_rows, ids[i * shard_rows:(i + 1) * shard_rows], texts[i * shard_rows:(i + 1) *
                                                                                     shard_rows])
            for i in range(n_shards) if i not in done]
    if done and todo:
        logger.info("resuming %s: %d of %d shards done", folder, len(done), n_shards)
    t0, docs, tokens, first = time.perf_counter(), 0, 0, (0.0, 0)
    records = run_ray(todo, spec, str(folder), ray) if backend == "ray" else run_local(todo, spec, str(folder))
    with tqdm(total=len(texts), initial=len(texts) - sum(len(s.ids) for s in todo), unit="doc",
              desc=f"embed ({backend})", disable=not show_progress_bar) as bar:
        for record in records:
            manifest["shards"][str(record["shard"])] = record
            manifest["shards"] = dict(sorted(manifest["shards"].items(), key=lambda kv: int(kv[0])))
            write_manifest(folder, manifest)
            docs += int(record["rows"])
            tokens += int(record["n_tokens"])
            elapsed = time.perf_counter() - t0
            if not first[1]:
                first = (elapsed, docs)
            bar.update(int(record["rows"]))
            bar.set_postfix(tok_s=f"{tokens / elapsed:,.0f}", doc_s=f"{docs / elapsed:,.1f}")
    seconds = time.perf_counter() - t0
    hashes = {r.get("settings_hash") for r in manifest["shards"].values()}
    if len(hashes) > 1:
        raise ShardFolderError(f"{folder}: shards were computed with different resolved settings ({sorted(hashes)}):"
                               " workers resolved precision or backend differently; pin embed.precision and "
                               "embed.backend, and rerun with overwrite=true")
    manifest["settings_hash"] = hashes.pop() if hashes else None
    widths = {r.get("d_sae") for r in manifest["shards"].values()}
    manifest["d_sae"] = widths.pop() if len(widths) == 1 else None
    for key in ("host", "host_fingerprint", "sae"):
        found = {r[key] for r in manifest["shards"].values() if r.get(key)}
        if found:
            manifest[key] = sorted(found)[0]
    manifest["complete"] = len(manifest["shards"]) == n_shards
    manifest["sessions"].append({"backend": backend, "actors": ray.concurrency if backend == "ray" else 1,
                                 "docs": docs, "tokens": tokens, "seconds": round(seconds, 3),
                                 "first_shard_seconds": round(first[0], 3),
                                 "saefeat": saefeat.__version__, **({"ray": asdict(ray)} if backend == "ray" else {})})
    write_manifest(folder, manifest)
    return EmbeddingRun(folder, manifest, docs, tokens, seconds, *first)


__all__ = ["BACKENDS", "EmbeddingRun", "embed_corpus"]
