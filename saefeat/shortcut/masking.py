"""Masked copies x̃ of texts: shortcut tokens replaced by the tokenizer's mask (or unk) token.

Positions are token positions of the host's tokenization without special tokens (the positions that
`SAEEmbedder.encode_tokens` and `BiasOnlyModel.attribute` report). A token is masked as the whole word it
belongs to, so "##ing" never survives its masked stem; adjacent masked words stay separate mask tokens.

- hard masking replaces every shortcut token.
- soft masking replaces each shortcut token with probability equal to its weight in [0, 1] (its attribution
  or activation relative to the strongest), drawn once per text from a seeded generator: strong shortcuts
  are almost always masked, weak ones only sometimes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from saefeat.errors import SaefeatError

MASKINGS = ("hard", "soft")


def mask_token_id(tokenizer) -> int:
    """The mask token's id, else unk's; a tokenizer with neither cannot build masked copies."""
    for tid in (getattr(tokenizer, "mask_token_id", None), getattr(tokenizer, "unk_token_id", None)):
        if tid is not None:
            return int(tid)
    raise SaefeatError(f"{type(tokenizer).__name__} has neither a mask nor an unk token; cannot mask shortcut tokens")


def mask_string(tokenizer) -> str:
    """The text that the tokenizer reads back as its mask (or unk) token."""
    return str(tokenizer.convert_ids_to_tokens(mask_token_id(tokenizer)))


def normalize_token(token: str) -> str:
    """A token string without word-piece / byte-level markers, lower-cased (for tables and counting)."""
    return token.replace("##", "").replace("Ġ", "").replace("▁", "").strip().lower()


def token_offsets(tokenizer, text: str) -> list[tuple[int, int]]:
    """Character span of each token of `text` (no special tokens), aligned with HostModel.tokenize."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    except NotImplementedError as e:
        raise SaefeatError(f"{type(tokenizer).__name__} gives no character offsets (a fast tokenizer is needed "
                         "to mask tokens in text)") from e
    return [tuple(o) for o in enc["offset_mapping"]]


def _word_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start > 0 and text[start - 1].isalnum():
        start -= 1
    while end < len(text) and text[end].isalnum():
        end += 1
    return start, end


def mask_positions(text: str, offsets: Sequence[tuple[int, int]], positions: Sequence[int], mask: str,
                   whole_words: bool = True) -> str:
    """`text` with the tokens at `positions` (and, by default, the rest of their words) replaced by `mask`."""
    spans = []
    for p in sorted(set(int(p) for p in positions)):
        if not 0 <= p < len(offsets):
            continue  # beyond a max_tokens cut
        s, e = offsets[p]
        if e <= s:
            continue
        spans.append(_word_span(text, s, e) if whole_words else (s, e))
    if not spans:
        return text
    spans.sort()
    merged = [list(spans[0])]
    for s, e in spans[1:]:
        if s <= merged[-1][1]:  # pieces of the same word, or overlapping words
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out, last = [], 0
    for s, e in merged:
        out += [text[last:s], mask]
        last = e
    out.append(text[last:])
    return "".join(out)


def mask_texts(texts: Sequence[str], positions: Sequence[Sequence[int]], tokenizer, masking: str = "hard",
               weights: Sequence[Sequence[float]] | None = None, seed: int = 0,
               whole_words: bool = True) -> list[str]:
    """Masked copies of `texts`; `positions[i]` are the shortcut tokens of text i (`weights[i]` for soft)."""
    if masking not in MASKINGS:
        raise SaefeatError(f"masking must be one of {MASKINGS}, got {masking!r}")
    if len(positions) != len(texts):
        raise SaefeatError(f"{len(texts)} texts but {len(positions)} position lists")
    if masking == "soft" and weights is None:
        raise SaefeatError("soft masking needs a weight in [0, 1] for every shortcut position")
    rng = np.random.default_rng(seed)
    mask = f" {mask_string(tokenizer)} "
    out = []
    for i, (text, pos) in enumerate(zip(texts, positions)):
        pos = list(pos)
        if masking == "soft":
            w = np.clip(np.asarray(weights[i], dtype=float), 0.0, 1.0)
            if len(w) != len(pos):
                raise SaefeatError(f"text {i}: {len(pos)} positions but {len(w)} weights")
            keep = rng.random(len(pos)) < w
            pos = [p for p, k in zip(pos, keep) if k]
        out.append(mask_positions(text, token_offsets(tokenizer, text), pos, mask, whole_words) if pos else text)
    return out
