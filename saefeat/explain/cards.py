"""Latent cards: what one SAE latent does, as contexts where it fires and summary statistics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from saefeat.embed.embedder import TokenActivations

LLM_LABEL_MIN_SCORE = 0.65  # detection balanced accuracy an LLM label needs to replace the offline one


@dataclass
class Context:
    """A window of tokens around one activation of a latent.

    `tokens` are display pieces (with the whitespace before each token), `acts` the latent's activation at
    each of them, `peak` the index of the marked token in the window; `doc` and `pos` locate the marked token
    in its document (the reference corpus of the store, or the texts a report was given).
    """

    tokens: list[str]
    acts: list[float]
    peak: int
    act: float
    doc: int
    pos: int
    token_id: int = -1
    ids: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class LatentCard:
    """Everything known about one latent: firing statistics, label, top and weak contexts, logit lens."""

    latent: int
    density: float            # share of reference tokens where the latent fires
    mean_act: float           # mean activation over the tokens where it fires
    max_act: float
    n_fire: int
    top: list[Context] = field(default_factory=list)
    weak: list[Context] = field(default_factory=list)
    label: str = ""
    label_tokens: list[str] = field(default_factory=list)
    llm_label: str | None = None
    llm_score: float | None = None
    promotes: list[str] = field(default_factory=list)
    suppresses: list[str] = field(default_factory=list)
    source: str = ""          # where the contexts come from: the store's corpus or the report's texts

    @property
    def dead(self) -> bool:
        return self.n_fire == 0

    @property
    def best_label(self) -> str:
        """The LLM label when its detection score is clearly above chance, else the offline label."""
        return best_label(self.label, self.llm_label, self.llm_score)


def best_label(label: str | None, llm_label: str | None, llm_score: float | None) -> str:
    """`llm_label` when its detection score reaches LLM_LABEL_MIN_SCORE, else the offline `label` ("" if none)."""
    if llm_label and llm_score is not None and llm_score >= LLM_LABEL_MIN_SCORE:
        return llm_label
    return label or ""


def token_rows(acts: Sequence[TokenActivations]) -> tuple[sp.csr_matrix, np.ndarray]:
    """Stack per-document token activations into one (total tokens, d_sae) CSR and the row offset of each doc."""
    offsets = np.concatenate([[0], np.cumsum([a.acts.shape[0] for a in acts])]).astype(np.int64)
    if not acts:
        return sp.csr_matrix((0, 0), dtype=np.float32), offsets
    return sp.vstack([a.acts for a in acts], format="csr"), offsets


def extract_windows(stacked: sp.csr_matrix, offsets: np.ndarray, pieces: Sequence[Sequence[str]],
                    token_ids: Sequence[Sequence[int]], doc: np.ndarray, pos: np.ndarray, latent: np.ndarray,
                    before: int, after: int) -> list[tuple[list[str], list[float], int, list[int]]]:
    """For each (doc, pos, latent) pick: the window's pieces, the latent's activation per token, the peak index
    and the window's token ids. `doc` indexes the rows of `offsets`/`pieces` (vectorised over all picks)."""
    doc, pos, latent = (np.asarray(a, dtype=np.int64) for a in (doc, pos, latent))
    if len(doc) == 0:
        return []
    lengths = np.diff(offsets)
    start = np.maximum(pos - before, 0)
    end = np.minimum(pos + after + 1, lengths[doc])
    size = end - start
    pick = np.repeat(np.arange(len(doc)), size)
    within = np.arange(size.sum()) - np.repeat(np.cumsum(size) - size, size)
    rows = offsets[doc][pick] + start[pick] + within
    vals = np.asarray(stacked[rows, latent[pick]]).ravel().astype(np.float32)
    out = []
    for i, chunk in enumerate(np.split(vals, np.cumsum(size)[:-1])):
        d, s, e = doc[i], start[i], end[i]
        out.append((list(pieces[d][s:e]), chunk.tolist(), int(pos[i] - s), [int(t) for t in token_ids[d][s:e]]))
    return out
