"""Reference corpora for latent cards: a default mixed sample of the shared data, or a user's table file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from saefeat.data import DataError, load_texts
from saefeat.errors import MissingFileError, SaefeatError

DEFAULT_SOURCES = (("gutenberg", "corpus/gutenberg_one_book_per_author.jsonl.gz"),
                   ("maec", "earnings/maec_transcripts_unlabeled.jsonl.gz"))


def default_corpus(data_dir: str | Path, n_docs: int = 400, passage_chars: int = 900,
                   seed: int = 0, names: tuple[str, ...] = ("gutenberg", "maec")) -> tuple[list[str], list[str]]:
    """Passages of about `passage_chars` characters, in equal shares from the sources `names`: Gutenberg books (public
    domain: the only source for cards shipped with the package) and MAEC calls.

    Passages start at a paragraph (Gutenberg) or sentence (MAEC) boundary, end at one, and have their
    whitespace collapsed. Returns (texts, sources) with sources like "maec:<call id>".
    """
    data_dir = Path(data_dir)
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    sources: list[str] = []
    chosen = [(name, rel) for name, rel in DEFAULT_SOURCES if name in names]
    if not chosen:
        raise SaefeatError(f"unknown corpus sources {names}; known: {[n for n, _ in DEFAULT_SOURCES]}")
    shares = [n_docs // len(chosen) + (i < n_docs % len(chosen)) for i in range(len(chosen))]
    for (name, rel), n in zip(chosen, shares):
        path = data_dir / rel
        if not path.is_file():
            raise MissingFileError(f"default reference corpus: {path} not found (set data_dir= or corpus=FILE)")
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.readlines()
        sep = "\n\n" if name == "gutenberg" else "\n"
        got, tries = 0, 0
        while got < n and tries < 20 * n:
            tries += 1
            row = json.loads(lines[int(rng.integers(len(lines)))])
            passage = _passage(row["text"], sep, passage_chars, rng)
            if passage:
                texts.append(passage)
                sources.append(f"{name}:{row.get('id', '?')}")
                got += 1
    return texts, sources


def _passage(text: str, sep: str, chars: int, rng: np.random.Generator) -> str | None:
    if len(text) < 2 * chars:
        return None
    start = int(rng.integers(0, len(text) - 2 * chars))
    cut = text.find(sep, start)
    if cut < 0:
        return None
    start = cut + len(sep)
    end = text.rfind(sep, start, start + chars + chars // 4)
    if end < start + chars // 2:
        end = text.rfind(". ", start, start + chars) + 1
    if end < start + chars // 2:
        return None
    passage = " ".join(text[start:end].split())
    return passage if len(passage) >= chars // 2 else None


def file_corpus(path: str | Path, text_field: str = "text", n_docs: int | None = None,
                seed: int = 0) -> tuple[list[str], list[str]]:
    """Non-empty documents of a CSV/JSONL/Parquet file, sampled down to `n_docs` (kept in file order)."""
    texts, ids = load_texts(path, text_field)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        raise DataError(f"{path}, field {text_field!r}: no non-empty documents")
    if n_docs is not None and len(keep) > n_docs:
        keep = sorted(np.random.default_rng(seed).choice(keep, n_docs, replace=False).tolist())
    name = Path(path).name
    return [texts[i] for i in keep], [f"{name}:{ids[i]}" for i in keep]
