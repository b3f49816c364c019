"""Readable token strings: display pieces that rebuild the text, and clean single-token names for labels."""

from __future__ import annotations

from collections.abc import Sequence


def token_pieces(tokenizer, text: str, ids: Sequence[int]) -> list[str]:
    """The text of each token with the whitespace before it, so that "".join(pieces) rebuilds the text.

    Uses the tokenizer's character offsets; falls back to cleaned token strings when they are not available.
    """
    ids = list(ids)
    try:
        enc = tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        same = list(enc["input_ids"][: len(ids)]) == ids
    except (NotImplementedError, KeyError, TypeError, ValueError):
        same = False
    if not same:
        return [token_text(tokenizer, t) for t in tokenizer.convert_ids_to_tokens(ids)]
    pieces, prev = [], 0
    for _, end in offsets[: len(ids)]:
        pieces.append(text[prev:end] if end > prev else "")  # byte-level BPE can split one character in two
        prev = max(prev, end)
    return pieces


def token_text(tokenizer, token: str) -> str:
    """One vocabulary token as text: byte-level BPE markers decoded, WordPiece '##' dropped."""
    text = tokenizer.convert_tokens_to_string([token])
    return text[2:] if text.startswith("##") and len(text) > 2 else text


def token_name(tokenizer, token_id: int) -> str:
    """A short printable name of a token id for labels: stripped text, whitespace shown as symbols."""
    text = token_text(tokenizer, tokenizer.convert_ids_to_tokens(int(token_id)))
    stripped = text.strip()
    if stripped:
        return stripped
    return text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣") or "∅"
