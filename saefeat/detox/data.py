"""The toxicity data: Jigsaw comments (and their splits), RealToxicityPrompts prompts, held-out corpus paragraphs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TypeVar

import numpy as np
from sklearn.model_selection import train_test_split

from saefeat.data import DataError, check_texts, iter_jsonl, read_table
from saefeat.errors import SaefeatError

T = TypeVar("T")


def load_labelled_comments(path: str | Path, text_field: str = "comment_text",
                           label_field: str = "toxic") -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels of a Jigsaw-style table; bad rows raise a DataError naming them."""
    df = read_table(path, [text_field, label_field])
    texts = check_texts(df[text_field].tolist(), source=str(path), field=text_field, allow_empty=False)
    labels = df[label_field]
    bad = np.flatnonzero(~labels.isin([0, 1]).to_numpy())
    if len(bad):
        raise DataError(f"{path}, field {label_field!r}: rows {bad[:10].tolist()} are not 0/1 "
                        f"(e.g. {labels.iloc[bad[0]]!r})")
    y = labels.astype(int).to_numpy()
    if len(np.unique(y)) < 2:
        raise DataError(f"{path}, field {label_field!r}: every row has label {y[0]}; need both classes")
    return texts, y


def load_prompts(path: str | Path) -> list[str]:
    """Prompt texts of a RealToxicityPrompts JSONL file (field `prompt.text`, or a plain `text`)."""
    out = []
    for line, rec in enumerate(iter_jsonl(path), 1):
        prompt = rec.get("prompt")
        text = prompt.get("text") if isinstance(prompt, dict) else rec.get("text", prompt)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {line}: field 'prompt.text' is missing or empty")
        out.append(text)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def natural_rate_subsample(y: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """Row indices that keep every negative and as many positives as give a positive share of `rate`."""
    if not 0 < rate < 1:
        raise SaefeatError(f"the toxic rate must be in (0, 1), got {rate}")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    n_pos = round(len(neg) * rate / (1 - rate))
    if n_pos > len(pos):  # too few positives: keep them all and drop negatives instead
        neg = np.random.default_rng(seed).choice(neg, round(len(pos) * (1 - rate) / rate), replace=False)
        n_pos = len(pos)
    keep = np.random.default_rng(seed).choice(pos, n_pos, replace=False)
    return np.sort(np.concatenate([neg, keep]))


def split_comments(y: np.ndarray, calib_fraction: float, val_fraction: float, toxic_rate: float, seed: int = 0,
                   source: str = "the comments") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / calibration / validation rows; validation subsampled to the natural `toxic_rate`.

    Raises a DataError naming `source` when a split holds one class only.
    """
    idx = np.arange(len(y))
    rest, val = train_test_split(idx, test_size=float(val_fraction), random_state=seed, stratify=y)
    calib_share = float(calib_fraction) / (1 - float(val_fraction))
    train, calib = train_test_split(rest, test_size=calib_share, random_state=seed, stratify=y[rest])
    val = val[natural_rate_subsample(y[val], float(toxic_rate), seed)]
    for name, rows in (("training", train), ("calibration", calib), ("validation", val)):
        if len(np.unique(y[rows])) < 2:
            raise DataError(f"{source}: the {name} split holds one class only; use more comments")
    return np.sort(train), np.sort(calib), val


def stratified_cap(texts: list[T], y: np.ndarray, n: int | None, seed: int = 0) -> tuple[list[T], np.ndarray]:
    """At most `n` of the labelled texts (or any items: row ids), a stratified sample in their original order (all
    when n is None); the same `y`, `n` and `seed` pick the same rows whatever the items are."""
    if n is None or n >= len(texts):
        return texts, y
    keep, _ = train_test_split(np.arange(len(texts)), train_size=int(n), random_state=seed, stratify=y)
    keep = np.sort(keep)
    return [texts[i] for i in keep], y[keep]


def sample_prompts(prompts: list[str], n: int, seed: int = 0) -> list[str]:
    """A seeded sample of at most `n` prompts, in their original order."""
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in sorted(rng.choice(len(prompts), min(int(n), len(prompts)), replace=False))]


def corpus_paragraphs(path: str | Path, n: int, min_chars: int = 400, max_chars: int = 1500,
                      per_doc: int = 4, seed: int = 0) -> list[str]:
    """`n` prose paragraphs from the middle of the documents of a JSONL corpus (field `text`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rng = np.random.default_rng(seed)
    out: list[str] = []
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                text = json.loads(line).get("text", "")
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from e
            middle = text[len(text) // 5: -len(text) // 5 or None]  # skip front matter and licence text
            paras = [" ".join(p.split()) for p in middle.split("\n\n")]
            paras = [p for p in paras if min_chars <= len(p) <= max_chars and not p.isupper()]
            if paras:
                pick = rng.choice(len(paras), min(per_doc, len(paras)), replace=False)
                out += [paras[i] for i in sorted(pick)]
            if len(out) >= n:
                break
    if len(out) < n:
        raise DataError(f"{path}: found only {len(out)} paragraphs of {min_chars}-{max_chars} characters, "
                        f"{n} requested")
    return out[:n]
