"""A sentence-transformers model's embeddings on ONNX Runtime: the `sentence` baseline's fast CPU path.

It applies to the common stack, a Transformer then mean pooling (then optionally Normalize), whose transformer is
an encoder saefeat can export (`saefeat.onnx_host`, every block). Inputs are the model's own preprocessing, so
truncation at max_seq_length and special tokens are as in `SentenceTransformer.encode`; other stacks (CLS pooling,
Dense layers, prompts) stay on sentence-transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def onnx_stack(st) -> bool:
    """Whether `st` is Transformer -> mean Pooling [-> Normalize], the stack `OnnxSentenceEncoder` reproduces."""
    names = [type(m).__name__ for m in st]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return False
    return getattr(st[1], "pooling_mode", None) == "mean" and getattr(st[1], "include_prompt", True)


class OnnxSentenceEncoder:
    """`encode(texts)` of the sentence-transformers model `st` (an `onnx_stack`), with its transformer on ONNX
    Runtime at `precision` (fp32 or int8); `host` is the same weights loaded by saefeat, which exports them."""

    def __init__(self, st, host, precision: str, cache_root: Path):
        from saefeat.onnx_host import OnnxHost

        self.st, self.normalize = st, len(st) == 3
        self.onnx = OnnxHost(host, host.n_layers - 1, precision, cache_root)

    def _inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        prep = getattr(self.st, "preprocess", None) or self.st.tokenize
        return prep(texts)

    def encode(self, texts: list[str], batch_size: int = 32, show_progress_bar: bool = False) -> np.ndarray:
        """(len(texts), d) float32 embeddings, in input order; batches are formed by length, as
        sentence-transformers does, so little of each is padding."""
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.onnx.host.d_model), np.float32)
        starts = range(0, len(texts), batch_size)
        for b in tqdm(starts, desc="encode sentence (onnx)", disable=not show_progress_bar):
            rows = order[b:b + batch_size]
            feats = self._inputs([texts[i] for i in rows])
            att = feats["attention_mask"]
            h = self.onnx.residual(feats["input_ids"], att)
            m = att.unsqueeze(-1).float()
            v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if self.normalize:
                v = torch.nn.functional.normalize(v, dim=-1)
            out[rows] = v.numpy()
        return out
