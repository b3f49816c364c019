"""Streams of host activations for SAE training and evaluation."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from saefeat.data import load_texts
from saefeat.errors import SaefeatError
from saefeat.hosts import HostModel


@dataclass
class CorpusSource:
    """One text file of a training mixture and its share of the sampled windows."""

    path: str
    text_field: str = "text"
    share: float = 1.0


def is_held_out(text: str, held_out_every: int) -> bool:
    """Deterministic document-level split: roughly 1 in `held_out_every` documents is held out."""
    return zlib.crc32(text[:2000].encode("utf-8", "ignore")) % held_out_every == 0


def _windows_of(host: HostModel, texts: list[str], seq_len: int, rng: random.Random,
                max_chars: int) -> Iterator[list[int]]:
    order = list(range(len(texts)))
    while True:
        rng.shuffle(order)
        for i in order:
            text = texts[i]
            if len(text) > max_chars:  # a random slice keeps tokenisation cheap on book-length texts
                start = rng.randrange(0, len(text) - max_chars)
                text = text[start:start + max_chars]
            ids = host.tokenize([text])[0]
            starts = list(range(0, max(1, len(ids) - seq_len // 4), seq_len))
            rng.shuffle(starts)
            for s in starts[:4]:
                window = ids[s:s + seq_len]
                if len(window) >= 8:
                    yield window


def sample_windows(host: HostModel, sources: Sequence[CorpusSource], seq_len: int, seed: int,
                   held_out: bool, held_out_every: int = 20, max_chars: int = 20_000) -> Iterator[list[int]]:
    """Endless token windows mixed from `sources` by share, from training or held-out documents only."""
    rng = random.Random(seed + (1 if held_out else 0))
    streams, shares = [], []
    for src in sources:
        texts, _ = load_texts(src.path, src.text_field)
        texts = [t for t in texts if t.strip() and is_held_out(t, held_out_every) == held_out]
        if texts:
            streams.append(_windows_of(host, texts, seq_len, rng, max_chars))
            shares.append(src.share)
    if not streams:
        raise SaefeatError("no documents in the training sources")
    while True:
        yield next(rng.choices(streams, weights=shares)[0])


def content_activations(host: HostModel, layer: int, windows: list[list[int]],
                        precision: str = "auto") -> torch.Tensor:
    """Residual activations (n_tokens, d) of the content (non-special) tokens of a batch of windows."""
    batch = host.batch(windows)
    return host.residual(batch.input_ids, batch.attention_mask, layer, precision=precision)[batch.content]


class ShuffledBuffer:
    """A streaming activation buffer: filled from the host, shuffled, refilled when half drained."""

    def __init__(self, host: HostModel, layer: int, windows: Iterator[list[int]], size: int,
                 batch_windows: int, precision: str = "auto"):
        self.host, self.layer, self.windows = host, layer, windows
        self.size, self.batch_windows, self.precision = size, batch_windows, precision
        self.store = torch.empty(0, host.d_model)
        self.tokens_read = 0

    def _fill(self) -> None:
        parts = [self.store]
        n = len(self.store)
        while n < self.size:
            acts = content_activations(self.host, self.layer, [next(self.windows) for _ in range(self.batch_windows)],
                                       self.precision).cpu()
            parts.append(acts)
            n += len(acts)
            self.tokens_read += len(acts)
        store = torch.cat(parts)
        self.store = store[torch.randperm(len(store))]

    def next_batch(self, batch_size: int) -> torch.Tensor:
        if len(self.store) < max(batch_size, self.size // 2):
            self._fill()
        batch, self.store = self.store[:batch_size], self.store[batch_size:]
        return batch
