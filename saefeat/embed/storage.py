"""Compact on-disk storage of sparse embeddings: the smallest index dtype, float32 or float16 values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from saefeat.atomic import atomic_write

VALUE_DTYPES = ("float32", "float16")


def index_dtype(n_cols: int) -> np.dtype:
    return np.dtype(np.uint16) if n_cols <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def save_sparse(path: str | Path, X: sp.csr_matrix, values: str = "float32") -> None:
    """Write a CSR matrix to .npz atomically; latent ids as uint16 when d_sae <= 65536."""
    if values not in VALUE_DTYPES:
        raise ValueError(f"values must be one of {VALUE_DTYPES}, got {values!r}")
    X = sp.csr_matrix(X)
    arrays = {"data": X.data.astype(values), "indices": X.indices.astype(index_dtype(X.shape[1])),
              "indptr": X.indptr.astype(np.int64), "shape": np.array(X.shape, dtype=np.int64)}
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def load_sparse(path: str | Path) -> sp.csr_matrix:
    """Read a matrix written by `save_sparse` (float32 values, int32 indices in memory)."""
    with np.load(path, allow_pickle=False) as z:
        return sp.csr_matrix((z["data"].astype(np.float32), z["indices"].astype(np.int32), z["indptr"]),
                             shape=tuple(z["shape"]))


def stored_bytes(X: sp.csr_matrix | np.ndarray, values: str = "float32") -> int:
    """Bytes of the arrays `save_sparse` writes for X (dense arrays: n x d x 4)."""
    if not sp.issparse(X):
        return int(np.asarray(X).size * 4)
    nnz, n = X.nnz, X.shape[0]
    return nnz * (np.dtype(values).itemsize + index_dtype(X.shape[1]).itemsize) + (n + 1) * 8
