"""On-disk layout of an SAE index: data files plus a manifest (with checksums) written last.

    idx/manifest.json   format version, embedder identity, sizes, sha256 of every data file
    idx/postings.npz    latent -> (doc, activation) postings: a CSC matrix of raw pooled activations
    idx/docs.parquet    doc ids and texts
    idx/dense.faiss     optional dense vectors (FAISS flat inner-product index)

A save writes a complete copy into a temporary folder beside the target and renames it into place, so a
crash never leaves a half-written index under the target name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from saefeat.atomic import atomic_dir
from saefeat.errors import MissingFileError, OutputExistsError, SaefeatError
from saefeat.sae.formats import file_hash

FORMAT = "saefeat-index"
VERSION = 1
MANIFEST = "manifest.json"
POSTINGS = "postings.npz"
DOCS = "docs.parquet"
DENSE = "dense.faiss"


class SAEIndexError(SaefeatError):
    """Base class of index errors (a ValueError, so the CLI prints it as one line)."""


class CorruptIndexError(SAEIndexError):
    """The index folder is incomplete, altered or unreadable."""


class IndexMismatchError(SAEIndexError):
    """The index was built with another host, layer or SAE than the one given."""


def write_index(path: str | Path, postings: sp.csc_matrix, ids: list[str], texts: list[str],
                dense_index: Any | None, manifest: dict[str, Any]) -> Path:
    """Write an index folder atomically; `manifest` gets the file checksums and is written last."""
    import faiss

    target = Path(path)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_index_folder(target))):
        raise OutputExistsError(f"{target} exists and is not a saefeat index (no saefeat {MANIFEST}); refusing to "
                                "replace it")

    def write(tmp: Path) -> None:
        sp.save_npz(tmp / POSTINGS, postings, compressed=False)
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}),
                       tmp / DOCS)
        files = [POSTINGS, DOCS]
        if dense_index is not None:
            faiss.write_index(dense_index, str(tmp / DENSE))
            files.append(DENSE)
        full = {"format": FORMAT, "version": VERSION, **manifest,
                "files": {f: {"sha256": file_hash(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str))

    atomic_dir(target, write)
    return target


def is_index_folder(path: str | Path) -> bool:
    """Whether `path` holds a saefeat index: its manifest says so (any other manifest.json is not ours)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an index folder, after checking that every data file is intact."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"index folder not found: {path}")
    mf = path / MANIFEST
    if not mf.is_file():
        raise CorruptIndexError(f"{path} is not a complete saefeat index: {MANIFEST} is missing "
                                f"(an interrupted save, or not an index folder)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptIndexError(f"{mf}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptIndexError(f"{mf}: not an saefeat index manifest")
    if manifest.get("version") != VERSION:
        raise CorruptIndexError(f"{mf}: index format version {manifest.get('version')} is not supported "
                                f"(this saefeat reads version {VERSION}); rebuild the index")
    files = manifest.get("files")
    required = {POSTINGS, DOCS} | ({DENSE} if manifest.get("dense") else set())
    if not isinstance(files, dict) or not required <= set(files):
        listed = sorted(files) if isinstance(files, dict) else files
        raise CorruptIndexError(f"{mf}: the manifest must list {sorted(required)} with their checksums; it lists "
                                f"{listed}")
    unexpected = sorted(set(files) - {POSTINGS, DOCS, DENSE})
    if unexpected:
        raise CorruptIndexError(f"{mf}: unknown data files {unexpected} (names must be saefeat's plain file names)")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CorruptIndexError(f"{path}: data file {name} is missing")
        if f.stat().st_size != info["bytes"] or file_hash(f) != info["sha256"]:
            raise CorruptIndexError(f"{f}: checksum mismatch, the file was altered or truncated; rebuild the index")
    return manifest


def read_data(path: str | Path, manifest: dict[str, Any]) -> tuple[sp.csc_matrix, list[str], list[str], Any | None]:
    """Postings, ids, texts and the dense FAISS index (or None) of a checked index folder."""
    import faiss

    path = Path(path)
    try:
        postings = sp.load_npz(path / POSTINGS).tocsc()
        table = pq.read_table(path / DOCS)
        ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
        dense = faiss.read_index(str(path / DENSE)) if manifest.get("dense") else None
    except Exception as e:  # a file that passed its checksum but does not parse
        raise CorruptIndexError(f"{path}: unreadable index data ({type(e).__name__}: {e})") from e
    n = manifest["n_docs"]
    sizes = {"postings rows": postings.shape[0], "doc ids": len(ids), "texts": len(texts)}
    if dense is not None:
        sizes["dense vectors"] = dense.ntotal
    if any(v != n for v in sizes.values()) or postings.shape[1] != manifest["d_sae"]:
        raise CorruptIndexError(f"{path}: inconsistent sizes {sizes}, manifest says {n} docs x {manifest['d_sae']}")
    postings.data = postings.data.astype(np.float32, copy=False)
    return postings, ids, texts, dense
