"""`saefeat index` and `saefeat search`: build an SAE index from a table file, query it from the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from saefeat.config import apply_overrides, baseline_config, embed_config, parse_overrides, read_config
from saefeat.data import DataError, check_texts, load_texts, read_table
from saefeat.errors import MissingFileError, OutputExistsError, SaefeatError
from saefeat.retrieval.index import Hit, SAEIndex
from saefeat.retrieval.store import is_index_folder


def index_file(cfg: DictConfig) -> SAEIndex:
    """Read `cfg.input`, build an index with the configured host, SAE and pooling, save it to `cfg.output`."""
    out = Path(cfg.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # checked before any embedding
        if not is_index_folder(out):
            raise OutputExistsError(f"output={out} exists and is not a saefeat index; choose another folder")
        if not cfg.overwrite:
            raise OutputExistsError(f"output={out} already holds an index; pass overwrite=true to replace it")
    texts, ids = load_texts(cfg.input, cfg.text_field, cfg.id_field)
    if cfg.title_field:
        titles = read_table(cfg.input, [cfg.title_field])[cfg.title_field].fillna("").astype(str).tolist()
        texts = [f"{t} {x}".strip() for t, x in zip(titles, texts)]
    dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise DataError(f"{cfg.input}, field {cfg.id_field!r}: duplicate ids {dup[:10]}")
    dense = None if str(cfg.dense).lower() in ("none", "null", "") else str(cfg.dense)
    config = embed_config(cfg)
    index = SAEIndex.build(texts, config, ids=ids, dense=dense,
                           sentence_model=baseline_config(cfg).sentence_model,
                           show_progress_bar=config.show_progress_bar)
    out = index.save(cfg.output)
    nnz = index.vectors.nnz
    print(f"indexed {len(index)} documents into {out}: {nnz / max(len(index), 1):.0f} latents per document "
          f"({config.pooling} pooling), dense side: {dense or 'none'}")
    return index


def search_config(overrides: Sequence[str]) -> DictConfig:
    """configs/commands/search.yaml merged with `key=value` overrides (unknown keys are errors)."""
    cfg = read_config("commands", "search.yaml")
    return apply_overrides(cfg, parse_overrides(overrides))


def read_examples(path: str | Path, text_field: str = "text") -> list[str]:
    """Example texts: a .txt file holds one per line (blank lines skipped); tables are read by column."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"examples file not found: {path}")
    if path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        texts = [ln for ln in lines if ln]
    else:
        texts = load_texts(path, text_field)[0]
    texts = check_texts(texts, source=str(path), field=text_field, allow_empty=False)
    if not texts:
        raise DataError(f"{path}: no examples in the file")
    return texts


def parse_latents(value: object) -> list[int]:
    """`[12, 40]`, `"12,40"` or `12` -> [12, 40]."""
    if value is None:
        return []
    items = list(value) if not isinstance(value, (str, int)) else str(value).replace(" ", "").split(",")
    try:
        return [int(x) for x in items if str(x) != ""]
    except ValueError as e:
        raise SaefeatError(f"exclude must list latent ids, e.g. exclude=12,40; got {value!r}") from e


def run_search(path: str | Path, overrides: Sequence[str], console: Console | None = None) -> list[Hit]:
    """`saefeat search idx/ query=...` / `examples=...`: print the ranked hits with the latents that matched."""
    cfg = search_config(overrides)
    if sum(x is not None for x in (cfg.query, cfg.examples, cfg.description)) != 1:
        raise SaefeatError("give exactly one of query=\"...\", examples=FILE or description=\"...\"")
    exclude = parse_latents(cfg.exclude)
    positives = read_examples(cfg.examples, cfg.text_field) if cfg.examples else None
    negatives = read_examples(cfg.negatives, cfg.text_field) if cfg.negatives else None
    index = SAEIndex.load(path)
    console = console or Console()
    if cfg.description is not None:
        prop = index.describe(str(cfg.description), n_latents=int(cfg.n_latents), exclude_latents=exclude)
        if len(prop) == 0:
            raise SaefeatError(f"no latent label is close to {str(cfg.description)!r}")
        console.print("property from the description: latents (similarity) "
                      + ", ".join(f"{j} ({w:.2f})" for j, w in zip(prop.latents.tolist(), prop.weights.tolist())))
        hits = index.search_property(prop, k=int(cfg.k), explain=int(cfg.explain))
        title = f"{path}: top {len(hits)} for the description {str(cfg.description)!r}"
    elif positives is not None:
        prop = index.property(positives, negatives, n_latents=int(cfg.n_latents), min_support=float(cfg.min_support),
                              exclude_latents=exclude, method=str(cfg.property_method), C=float(cfg.C))
        if len(prop) == 0:
            raise SaefeatError(f"no latent separates the {len(positives)} examples from the corpus; add examples or "
                             f"lower min_support (now {cfg.min_support})")
        top = np.argsort(-prop.weights, kind="stable")[:int(cfg.n_latents)]
        latents = ", ".join(f"{prop.latents[i]} ({prop.weights[i]:.2f})" for i in top)
        what = "classifier weights, largest" if prop.norm_idf is not None else "log-odds"
        console.print(f"property from {len(positives)} examples ({cfg.property_method}): latents ({what}) {latents}")
        hits = index.search_property(prop, k=int(cfg.k), explain=int(cfg.explain))
        title = f"{path}: top {len(hits)} by property"
    else:
        hits = index.search(str(cfg.query), k=int(cfg.k), mode=str(cfg.mode), alpha=float(cfg.alpha),
                            exclude_latents=exclude, explain=int(cfg.explain))
        title = f"{path}: top {len(hits)} for {str(cfg.query)!r} ({cfg.mode})"
    print_hits(hits, title, console, _labels_or_none(index))
    return hits


def _labels_or_none(index: SAEIndex) -> dict[int, tuple[str, float]]:
    from saefeat.retrieval.properties import latent_labels

    try:
        return latent_labels(index.embedder.sae.content_hash)
    except (ValueError, ImportError):
        return {}


def print_hits(hits: list[Hit], title: str, console: Console, labels: dict | None = None) -> None:
    """A table of hits; matched latents show as `id:contribution` with their label when one is known."""
    labels = labels or {}
    from saefeat.evaluation.comparison import widen_when_piped

    widen_when_piped(console)
    table = Table(title=title, show_lines=False)
    for col, kw in (("#", {"justify": "right"}), ("score", {"justify": "right"}), ("id", {}),
                    ("text", {"no_wrap": True, "overflow": "ellipsis", "max_width": 80}), ("latents matched", {})):
        table.add_column(col, **kw)
    for h in hits:
        text = " ".join(h.text.split())
        text = text[:200] + ("..." if len(text) > 200 else "")
        latents = ", ".join(f"{j}:{c:.2f}" + (f" ({labels[j][0]})" if j in labels else "") for j, c in h.latents)
        table.add_row(str(h.rank), f"{h.score:.3f}", h.doc_id, text, latents)
    console.print(table)
