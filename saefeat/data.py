"""Reading users' tables (CSV, JSONL, Parquet; optionally gzipped) and validating text columns."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
from pyarrow import ArrowInvalid

from saefeat.errors import SaefeatError

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class DataError(SaefeatError):
    """Bad input data; the message names the file, the row and the field."""


def _kind(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)} (optionally .gz)")


def read_table(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet file into a DataFrame; missing `columns` raise a DataError naming them."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a table file ({', '.join(SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    kind = _kind(path)
    try:
        if kind == ".parquet":
            df = pd.read_parquet(path)
        elif kind in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if kind == ".tsv" else ",", encoding="utf-8",
                             keep_default_na=False, na_values=[""], quoting=3 if kind == ".tsv" else 0)
        else:
            df = pd.DataFrame(list(iter_jsonl(path)))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e})") from e
    except (OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError, ArrowInvalid) as e:
        raise DataError(f"{path}: unreadable {kind} file ({type(e).__name__}: {e})") from e
    if df.empty and not len(df.columns):
        raise DataError(f"{path}: no columns and no rows")
    if columns:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the file has {list(df.columns)}")
    return df


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one dict per line of a (gzipped) JSONL file; a bad line raises a DataError naming it."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from e


def check_texts(texts: Sequence[object], source: str = "input", field: str = "text",
                allow_empty: bool = True) -> list[str]:
    """Validate documents: strings (or UTF-8 bytes), not None; empty ones allowed only if `allow_empty`.

    Raises a DataError naming the rows and the field.
    """
    out: list[str] = []
    bad: list[str] = []
    for i, t in enumerate(texts):
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(f"row {i}: undecodable bytes")
                continue
        if t is None or (isinstance(t, float) and t != t):
            bad.append(f"row {i}: missing (None/NaN)")
        elif not isinstance(t, str):
            bad.append(f"row {i}: {type(t).__name__}, not a string")
        elif not allow_empty and not t.strip():
            bad.append(f"row {i}: empty or whitespace only")
        elif not _encodable(t):
            bad.append(f"row {i}: invalid Unicode (a lone surrogate)")
        else:
            out.append(t)
            continue
        if len(bad) >= 10:
            break
    if bad:
        raise DataError(f"{source}, field {field!r}: " + "; ".join(bad))
    return out


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_texts(path: str | Path, text_field: str = "text", id_field: str | None = None,
               allow_empty: bool = True) -> tuple[list[str], list[str]]:
    """Texts and row ids from a table file (ids default to the row number)."""
    cols = [text_field] + ([id_field] if id_field else [])
    df = read_table(path, cols)
    texts = check_texts(df[text_field].tolist(), source=str(path), field=text_field, allow_empty=allow_empty)
    if not texts:
        raise DataError(f"{path}: no rows (only a header?)")
    ids = df[id_field].astype(str).tolist() if id_field else [str(i) for i in range(len(df))]
    if id_field and len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = [(i, x) for i, x in enumerate(ids) if x in seen or seen.add(x)]
        raise DataError(f"{path}, field {id_field!r}: duplicate ids, e.g. row {dup[0][0]}: {dup[0][1]!r} "
                        f"({len(dup)} duplicates)")
    return texts, ids
