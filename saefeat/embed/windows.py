"""Splitting long token sequences into overlapping windows in which every token is owned exactly once."""

from __future__ import annotations

from dataclasses import dataclass

from saefeat.errors import SaefeatError


@dataclass(frozen=True)
class Window:
    """Tokens [start, end) of document `doc` go through the model; tokens [own_start, own_end) are pooled."""

    doc: int
    start: int
    end: int
    own_start: int
    own_end: int


def split_windows(doc: int, n_tokens: int, size: int, overlap: int, causal: bool) -> list[Window]:
    """Windows of `size` tokens with `overlap` tokens shared between neighbours.

    A token in an overlap is owned by one window only, so pooling never double-counts: in a causal
    LM the earlier window owns it (it sees more left context there); in a bidirectional encoder the
    overlap is split at its midpoint (each token sits away from a window edge).
    """
    if size <= 0:
        raise SaefeatError(f"window size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise SaefeatError(f"overlap must be in [0, window size={size}), got {overlap}")
    if n_tokens == 0:
        return []
    stride = size - overlap
    starts = [0]
    while starts[-1] + size < n_tokens:
        starts.append(starts[-1] + stride)
    cut = overlap if causal else overlap // 2
    own_starts = [0] + [s + cut for s in starts[1:]]
    own_ends = own_starts[1:] + [n_tokens]
    return [Window(doc, s, min(s + size, n_tokens), a, b) for s, a, b in zip(starts, own_starts, own_ends)]
