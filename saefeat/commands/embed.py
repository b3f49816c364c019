"""`saefeat embed`: a table file of documents in; a pooled sparse .npz and a row-id file out, or a resumable
shard folder of token statistics written by the local or the Ray backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
from omegaconf import DictConfig

from saefeat.atomic import atomic_write
from saefeat.config import baseline_config, embed_config
from saefeat.data import load_texts
from saefeat.embed.storage import VALUE_DTYPES, ids_path, save_sparse, write_ids
from saefeat.errors import OutputExistsError, SaefeatError
from saefeat.representations import make_representation


def check_output(cfg: DictConfig) -> Path:
    """The .npz output path, checked before any embedding: value type, not a folder, nothing replaced
    unless overwrite=true."""
    out = Path(cfg.output)
    if out.is_dir():
        raise SaefeatError(f"output={out} is a folder; name a .npz file")
    if str(cfg.value_dtype) not in VALUE_DTYPES:
        raise SaefeatError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {cfg.value_dtype!r}")
    if not cfg.overwrite:
        existing = [p for p in (out, ids_path(out)) if p.exists()]
        if existing:
            raise OutputExistsError(f"{existing[0]} exists; pass overwrite=true to replace it")
    return out


def embed_file(cfg: DictConfig) -> Path:
    """Embed `cfg.input` (CSV/JSONL/Parquet): to `cfg.output` (.npz) plus `<output>.ids.jsonl`, or, for any
    other output name, to a shard folder (`embed_to_shards`)."""
    if cfg.representation not in ("sae", "dense"):
        raise SaefeatError(f"representation must be 'sae' or 'dense', got {cfg.representation!r}")
    out = Path(cfg.output)
    if out.suffix != ".npz":
        if out.suffix and not out.is_dir():
            raise SaefeatError(f"output={out}: name a .npz file (pooled embeddings) or a folder without a suffix "
                               "(a shard folder)")
        return embed_to_shards(cfg)
    if cfg.backend != "local":
        raise SaefeatError(f"backend={cfg.backend} writes a shard folder; name a folder as output, not {cfg.output}")
    out = check_output(cfg)
    texts, ids = load_texts(cfg.input, cfg.text_field, cfg.id_field, allow_empty=bool(cfg.allow_empty))
    X = make_representation(cfg.representation, embed_config(cfg), baseline_config(cfg)).fit_transform(texts)
    if sp.issparse(X):
        save_sparse(out, X, values=str(cfg.value_dtype))
    else:
        atomic_write(out, lambda tmp: np.savez(tmp, embeddings=X))
    write_ids(out, ids)
    print(f"wrote {X.shape[0]} x {X.shape[1]} {cfg.representation} embeddings to {out} (row ids: {ids_path(out)})")
    return out


def embed_to_shards(cfg: DictConfig) -> Path:
    """The shard-folder route: `saefeat.engine.embed_corpus` on `cfg.backend`, tracked in MLflow (backend, actors,
    throughput, the manifest)."""
    import mlflow

    from saefeat.config import to_dict
    from saefeat.engine import RayOptions, embed_corpus
    from saefeat.tracking import start_run

    if cfg.representation != "sae":
        raise SaefeatError("a shard folder holds SAE statistics; representation=dense writes a .npz output")
    ray = RayOptions(**to_dict(cfg.ray))
    embed = embed_config(cfg)
    with start_run(cfg.tracking.experiment or "embeddings", f"embed {Path(cfg.input).name} ({cfg.backend})",
                   to_dict(cfg), tags={"backend": str(cfg.backend), "output": str(Path(cfg.output).resolve())}):
        run = embed_corpus(cfg.input, cfg.output, embed, text_field=cfg.text_field, id_field=cfg.id_field,
                           backend=str(cfg.backend), shard_rows=int(cfg.shard_rows), ray=ray,
                           overwrite=bool(cfg.overwrite), allow_empty=bool(cfg.allow_empty),
                           show_progress_bar=embed.show_progress_bar is not False)
        mlflow.log_metrics({"docs": run.docs, "tokens": run.tokens, "seconds": run.seconds,
                            "docs_per_s": run.docs_per_s, "tokens_per_s": run.tokens_per_s,
                            "actors": ray.concurrency if cfg.backend == "ray" else 1})
        mlflow.log_dict(run.manifest, "manifest.json")
    m = run.manifest
    print(f"{run.folder}: {m['rows']} documents in {len(m['shards'])} shards, d_sae={m['d_sae']} "
          f"({run.docs} embedded now, {run.tokens_per_s:,.0f} tokens/s on {cfg.backend}); read them with "
          f"saefeat.read_embeddings({str(run.folder)!r}, pooling=...)")
    return run.folder
