"""`saefeat embed`: a table file of documents in, a sparse .npz and a row-id file out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from omegaconf import DictConfig

from saefeat.atomic import atomic_write
from saefeat.config import baseline_config, embed_config
from saefeat.data import load_texts
from saefeat.embed.storage import VALUE_DTYPES, save_sparse
from saefeat.errors import OutputExistsError, SaefeatError
from saefeat.representations import make_representation


def ids_path(output: str | Path) -> Path:
    """Where `saefeat embed` writes the row ids of `output`: one JSON string per line, in row order."""
    return Path(output).with_suffix(".ids.jsonl")


def read_ids(output: str | Path) -> list[str]:
    """The row ids written beside an embedding file."""
    with open(ids_path(output), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def check_output(cfg: DictConfig) -> Path:
    """The output path, checked before any embedding: suffix, value type, not a folder, nothing replaced
    unless overwrite=true."""
    out = Path(cfg.output)
    if out.is_dir():
        raise SaefeatError(f"output={out} is a folder; name a .npz file")
    if out.suffix != ".npz":
        raise SaefeatError(f"output must end in .npz, got {out}")
    if str(cfg.value_dtype) not in VALUE_DTYPES:
        raise SaefeatError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {cfg.value_dtype!r}")
    if not cfg.overwrite:
        existing = [p for p in (out, ids_path(out)) if p.exists()]
        if existing:
            raise OutputExistsError(f"{existing[0]} exists; pass overwrite=true to replace it")
    return out


def embed_file(cfg: DictConfig) -> Path:
    """Embed `cfg.input` (CSV/JSONL/Parquet) and write `cfg.output` (.npz) plus `<output>.ids.jsonl`."""
    if cfg.representation not in ("sae", "dense"):
        raise SaefeatError(f"representation must be 'sae' or 'dense', got {cfg.representation!r}")
    out = check_output(cfg)
    texts, ids = load_texts(cfg.input, cfg.text_field, cfg.id_field)
    X = make_representation(cfg.representation, embed_config(cfg), baseline_config(cfg)).fit_transform(texts)
    if sp.issparse(X):
        save_sparse(out, X, values=str(cfg.value_dtype))
    else:
        atomic_write(out, lambda tmp: np.savez(tmp, embeddings=X))
    lines = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in ids)
    atomic_write(ids_path(out), lambda tmp: Path(tmp).write_text(lines, encoding="utf-8"))
    print(f"wrote {X.shape[0]} x {X.shape[1]} {cfg.representation} embeddings to {out} (row ids: {ids_path(out)})")
    return out
