"""Compact on-disk storage of sparse embeddings: the smallest index dtypes, float16 or float32 values.

float16 is the default: activations computed under bf16 autocast carry 8 significant bits, float16 keeps 11,
so it loses nothing there (and at most a 5e-4 relative error on fp32 runs); float32 stores them exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from saefeat.atomic import atomic_write
from saefeat.errors import SaefeatError

VALUE_DTYPES = ("float32", "float16")


def index_dtype(n_cols: int) -> np.dtype:
    return np.dtype(np.uint16) if n_cols <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def pointer_dtype(nnz: int) -> np.dtype:
    return np.dtype(np.int32) if nnz <= np.iinfo(np.int32).max else np.dtype(np.int64)


def save_sparse(path: str | Path, X: sp.csr_matrix, values: str = "float16") -> None:
    """Write a CSR matrix to .npz atomically; latent ids as uint16 when d_sae <= 65536."""
    if values not in VALUE_DTYPES:
        raise SaefeatError(f"values must be one of {VALUE_DTYPES}, got {values!r}")
    X = sp.csr_matrix(X)
    if values == "float16" and X.nnz and np.abs(X.data).max() > np.finfo(np.float16).max:
        raise SaefeatError(f"values up to {np.abs(X.data).max():.3g} overflow float16; save with values='float32'")
    arrays = {"data": X.data.astype(values), "indices": X.indices.astype(index_dtype(X.shape[1])),
              "indptr": X.indptr.astype(pointer_dtype(X.nnz)), "shape": np.array(X.shape, dtype=np.int64)}
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def load_sparse(path: str | Path) -> sp.csr_matrix:
    """Read a matrix written by `save_sparse` (float32 values, int32 indices in memory)."""
    with np.load(path, allow_pickle=False) as z:
        data, indices, indptr = z["data"].astype(np.float32), z["indices"].astype(np.int32), z["indptr"]
        return sp.csr_matrix((data, indices, indptr.astype(np.int64)), shape=tuple(z["shape"]))


def stored_bytes(X: sp.csr_matrix | np.ndarray, values: str = "float16") -> int:
    """Bytes of the arrays `save_sparse` writes for X (dense arrays: n x d x 4)."""
    if not sp.issparse(X):
        return int(np.asarray(X).size * 4)
    nnz, n = X.nnz, X.shape[0]
    return nnz * (np.dtype(values).itemsize + index_dtype(X.shape[1]).itemsize) + (n + 1) * pointer_dtype(
        nnz).itemsize


def ids_path(output: str | Path) -> Path:
    """Where the row ids of an embedding file go: `<output>.ids.jsonl`, one JSON string per line, in row order."""
    return Path(output).with_suffix(".ids.jsonl")


def write_ids(output: str | Path, ids: list[str]) -> None:
    """Write the row ids beside an embedding file (JSON lines: any string survives, newlines included)."""
    lines = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids)
    atomic_write(ids_path(output), lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))


def read_ids(output: str | Path) -> list[str]:
    """The row ids written beside an embedding file."""
    with open(ids_path(output), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]
