"""The shard folder an embedding run writes: Parquet shards of per-document token statistics and a manifest.

Each shard holds consecutive input rows: `row` (input position), `id`, `n_tokens`, `latents` (the latents that
fire in the document) and, aligned with them, `sum`, `max`, `count` and `log1p_sum` (the additive statistics every
pooling is computed from). `manifest.json` records the spec, the input's fingerprint and every finished shard with
its row count and checksum. `read_embeddings` pools a folder (or a `.npz` of `saefeat embed`) into CSR rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from saefeat.atomic import atomic_write
from saefeat.embed.pooling import TokenStats, pool
from saefeat.errors import SaefeatError
from saefeat.hashing import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "saefeat-embeddings"
VERSION = 1
STATS = ("sum", "max", "count", "log1p_sum")
_META_KEY = b"saefeat"


class ShardFolderError(SaefeatError):
    """A shard folder that cannot be read or resumed: a missing, foreign or damaged manifest or shard."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.parquet"


def _on_count_pattern(stats: TokenStats) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """The firing pattern (the count matrix, indices sorted) and each statistic's values on it."""
    count = stats.count.tocsr()
    count.sort_indices()
    rows = np.repeat(np.arange(count.shape[0]), np.diff(count.indptr))
    values = {}
    for key in STATS:
        m = getattr(stats, key).tocsr()
        m.sort_indices()
        if np.array_equal(m.indptr, count.indptr) and np.array_equal(m.indices, count.indices):
            values[key] = m.data.astype(np.float32)
        else:  # another sparsity pattern: read the values where the latent fired
            values[key] = np.asarray(m[rows, count.indices]).ravel().astype(np.float32)
    return count, values


def write_shard(folder: Path, shard: int, first_row: int, ids: list[str], stats: TokenStats,
                meta: dict[str, Any]) -> tuple[str, str]:
    """Write one shard atomically; (file name, sha256 of the file)."""
    count, values = _on_count_pattern(stats)
    offsets = pa.array(count.indptr.astype(np.int32))
    columns = {"row": pa.array(np.arange(first_row, first_row + len(ids), dtype=np.int64)),
               "id": pa.array(ids, pa.string()),
               "n_tokens": pa.array(np.asarray(stats.n_tokens, np.int32)),
               "latents": pa.ListArray.from_arrays(offsets, pa.array(count.indices.astype(np.int32)))}
    for key in STATS:
        columns[key] = pa.ListArray.from_arrays(offsets, pa.array(values[key]))
    table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(meta)})
    name = shard_name(shard)
    atomic_write(folder / name, lambda tmp: pq.write_table(table, tmp, compression="zstd"), durable=True)
    return name, file_sha256(folder / name)


def shard_meta(path: Path) -> dict[str, Any]:
    """The saefeat metadata a shard's Parquet schema carries (spec and settings hashes, shard index, d_sae)."""
    meta = pq.read_schema(path).metadata or {}
    if _META_KEY not in meta:
        raise ShardFolderError(f"{path} is not a saefeat embedding shard")
    return json.loads(meta[_META_KEY])


def read_shard(path: Path, d_sae: int) -> tuple[TokenStats, np.ndarray, list[str]]:
    """(statistics, input positions, ids) of one shard."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardFolderError(f"{path}: unreadable shard ({e})") from e
    lat = table.column("latents").combine_chunks()
    indptr = np.asarray(lat.offsets, dtype=np.int64)
    indices = np.asarray(lat.values, dtype=np.int32)
    shape = (table.num_rows, d_sae)

    def matrix(key: str) -> sp.csr_matrix:
        vals = np.asarray(table.column(key).combine_chunks().values, dtype=np.float32)
        return sp.csr_matrix((vals, indices, indptr), shape=shape)

    stats = TokenStats(table.column("n_tokens").to_numpy().astype(np.int64), *(matrix(k) for k in STATS))
    return stats, table.column("row").to_numpy(), table.column("id").to_pylist()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, None when there is none; a ShardFolderError when it is not saefeat's."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardFolderError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ShardFolderError(f"{path} is not a saefeat embeddings manifest")
    return doc


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)), durable=True)


def shard_intact(folder: Path, record: dict[str, Any]) -> bool:
    path = folder / record["name"]
    return path.is_file() and file_sha256(path) == record["checksum"]


def iter_shards(folder: str | Path, verify: bool = True) -> Iterator[tuple[TokenStats, np.ndarray, list[str]]]:
    """The shards of a finished folder in input order, one at a time (statistics, input positions, ids)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ShardFolderError(f"{folder}: no {MANIFEST}; not a saefeat embeddings folder")
    if not manifest.get("complete"):
        raise ShardFolderError(f"{folder}: the embedding run has not finished (rerun it to resume)")
    for key in sorted(manifest["shards"], key=int):
        record = manifest["shards"][key]
        if verify and not shard_intact(folder, record):
            raise ShardFolderError(f"{folder / record['name']}: missing, or its checksum does not match the "
                                   "manifest; rerun the embedding to recompute it")
        yield read_shard(folder / record["name"], int(manifest["d_sae"]))


def _input_order(positions: list[np.ndarray]) -> np.ndarray | None:
    """The permutation to input order of rows read shard by shard; None when they are in order already."""
    pos = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    return None if np.all(pos[1:] > pos[:-1]) else np.argsort(pos, kind="stable")


def read_stats(path: str | Path) -> tuple[TokenStats, list[str]]:
    """All statistics of a shard folder, rows in input order, and the row ids."""
    parts, ids, positions = [], [], []
    for stats, rows, shard_ids in iter_shards(path):
        parts.append(stats)
        ids.extend(shard_ids)
        positions.append(rows)
    stats, order = TokenStats.stack(parts), _input_order(positions)
    return (stats, ids) if order is None else (stats.take(order), [ids[i] for i in order])


def read_embeddings(path: str | Path, pooling: str | None = None, pool_k: int = 64) -> tuple[sp.csr_matrix, list[str]]:
    """Document embeddings and their ids, in input order, from what `saefeat embed` wrote: a shard folder
    (pooled here with `pooling`, default max, one shard at a time) or a `.npz` file (pooled when written)."""
    path = Path(path)
    if path.suffix == ".npz":
        from saefeat.embed.storage import load_sparse, read_ids

        if pooling is not None:
            raise SaefeatError(f"{path} holds embeddings pooled when they were written; pooling= applies to a "
                               "shard folder only")
        return load_sparse(path), read_ids(path)
    parts, ids, positions = [], [], []
    for stats, rows, shard_ids in iter_shards(path):
        parts.append(pool(stats, pooling or "max", pool_k))
        ids.extend(shard_ids)
        positions.append(rows)
    X, order = sp.vstack(parts, format="csr").astype(np.float32), _input_order(positions)
    return (X, ids) if order is None else (X[order], [ids[i] for i in order])
