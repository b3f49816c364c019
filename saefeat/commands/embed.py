"""`saefeat embed`: a table file of documents in, a sparse .npz and a row-id file out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
from omegaconf import DictConfig

from saefeat.atomic import atomic_write
from saefeat.config import baseline_config, embed_config
from saefeat.data import load_texts
from saefeat.embed.storage import save_sparse
from saefeat.errors import SaefeatError
from saefeat.representations import make_representation


def embed_file(cfg: DictConfig) -> Path:
    """Embed `cfg.input` (CSV/JSONL/Parquet) and write `cfg.output` (.npz) plus `<output>.ids.txt`."""
    if cfg.representation not in ("sae", "dense"):
        raise SaefeatError(f"representation must be 'sae' or 'dense', got {cfg.representation!r}")
    out = Path(cfg.output)
    if out.suffix != ".npz":  # checked before any embedding
        raise SaefeatError(f"output must end in .npz, got {out}")
    texts, ids = load_texts(cfg.input, cfg.text_field, cfg.id_field)
    X = make_representation(cfg.representation, embed_config(cfg), baseline_config(cfg)).fit_transform(texts)
    if sp.issparse(X):
        save_sparse(out, X, values=str(cfg.value_dtype))
    else:
        atomic_write(out, lambda tmp: np.savez(tmp, embeddings=X))
    ids_path = out.with_suffix(".ids.txt")
    atomic_write(ids_path, lambda tmp: Path(tmp).write_text("\n".join(ids) + "\n"))
    print(f"wrote {X.shape[0]} x {X.shape[1]} {cfg.representation} embeddings to {out} (row ids: {ids_path})")
    return out
