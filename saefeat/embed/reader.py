"""WindowReader: documents -> batches of residual-stream activations of their tokens, window by window."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saefeat.device import Runtime
from saefeat.embed.windows import Window, split_windows
from saefeat.hosts import HostModel
from saefeat.onnx_host import EXPORT_VERSION as ONNX_EXPORT_VERSION
from saefeat.onnx_host import OnnxHost

logger = logging.getLogger(__name__)


class WindowReader:
    """Reads the residual stream of `host` at block `layer`'s output (or input, `site="input"`).

    Long documents are split into windows of `window` content tokens that overlap by `overlap`; each token is
    owned by exactly one window (see `saefeat.embed.windows`). On the ONNX backend the host truncated after
    the read block runs on ONNX Runtime (`saefeat.onnx_host`).
    """

    def __init__(self, host: HostModel, layer: int, site: str, window: int, overlap: int, max_tokens: int | None,
                 keep_special: bool, runtime: Runtime, onnx_root: Path):
        host.check_layer(layer)
        split_windows(0, 1, window, overlap, host.is_causal)  # validates window/overlap early
        self.host, self.layer, self.site = host, layer, site
        self.window, self.overlap, self.max_tokens, self.keep_special = window, overlap, max_tokens, keep_special
        self.runtime = runtime
        self.precision = runtime.autocast_precision  # of the torch parts: the SAE step, and a torch host
        self._onnx = OnnxHost(host, layer, runtime.precision, onnx_root) if runtime.backend == "onnx" else None

    def settings(self) -> dict:
        """Everything that changes the activations read for a document."""
        s = {"host": self.host.name, "host_fingerprint": self.host.fingerprint, "layer": self.layer,
             "window": self.window, "overlap": self.overlap, "max_tokens": self.max_tokens,
             "keep_special": self.keep_special, "precision": self.runtime.precision}
        if self.site != "output":  # output-site keys as before, so existing caches stay valid
            s["site"] = self.site
        if self.runtime.backend != "torch":
            s["backend"] = self.runtime.backend
            s["onnx_export"] = ONNX_EXPORT_VERSION
        return s

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, cut to `max_tokens` (logged when it cuts)."""
        ids = self.host.tokenize(texts)
        if self.max_tokens is not None:
            cut = sum(len(x) > self.max_tokens for x in ids)
            if cut:
                logger.warning("max_tokens=%d cut %d of %d documents", self.max_tokens, cut, len(ids))
            ids = [x[: self.max_tokens] for x in ids]
        return ids

    def batches(self, docs_ids: list[list[int]], batch_size: int,
                bar: tqdm | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (doc index, token position, activation) for every owned token, batch by batch.

        Special tokens kept by `keep_special` have position -1."""
        windows: list[Window] = []
        for d, ids in enumerate(docs_ids):
            windows += split_windows(d, len(ids), self.window, self.overlap, self.host.is_causal)
        windows.sort(key=lambda w: w.end - w.start, reverse=True)  # similar lengths batch with little padding
        for b in range(0, len(windows), batch_size):
            chunk = windows[b:b + batch_size]
            batch = self.host.batch([docs_ids[w.doc][w.start:w.end] for w in chunk])
            if self._onnx is not None:
                acts = self._onnx.residual(batch.input_ids, batch.attention_mask)
            else:
                acts = self.host.residual(batch.input_ids, batch.attention_mask, self.layer, self.precision,
                                          self.site)
            rows, cols, docs, pos = [], [], [], []
            content = batch.content.cpu()
            for i, w in enumerate(chunk):
                offset = int(content[i].nonzero()[0]) if content[i].any() else 0  # first content position
                own = list(range(offset + w.own_start - w.start, offset + w.own_end - w.start))
                extra = (~content[i] & batch.attention_mask[i].bool().cpu()).nonzero().view(-1).tolist() \
                    if self.keep_special else []
                rows += [i] * (len(own) + len(extra))
                cols += own + extra
                docs += [w.doc] * (len(own) + len(extra))
                pos += list(range(w.own_start, w.own_end)) + [-1] * len(extra)
            dev = acts.device
            x = acts[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
            if bar is not None:  # fractions of documents: long documents advance window by window
                done = sum((w.own_end - w.own_start) / max(1, len(docs_ids[w.doc])) for w in chunk)
                bar.update(min(done, bar.total - bar.n))
            yield torch.tensor(docs, device=dev), torch.tensor(pos, device=dev), x
