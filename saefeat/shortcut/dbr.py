"""Divergence-based regularization (DBR, arXiv 2502.18353): L = CE(y, p(.|x)) + λ·JSD(p(.|x) || p(.|x̃)).

x̃ is the masked copy of x (shortcut tokens masked), so the penalty makes the prediction on x agree with the
prediction made without the shortcut, taking the model's reliance on the shortcut away. λ = 0 (or no masked
copies) is plain ERM.

- `DBRClassifier` (mode `head`): a classifier head on frozen features of x and x̃ (SAE or dense). CPU-fast.
- `DBRFineTuner` (mode `finetune`): the host encoder, read at the SAE's layer, with a head; minilm fine-tunes on
  2 CPU cores (about 1 s per step of 16 texts x 128 tokens), and on CUDA when present.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from torch import nn
from tqdm.auto import tqdm

from saefeat.errors import SaefeatError
from saefeat.hosts import Batch, get_host
from saefeat.sae.formats import check_compatible, resolve_sae
from saefeat.sae.sites import host_read_point
from saefeat.shortcut.jsd import jsd


def _as_tensor(X) -> torch.Tensor:
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    return torch.as_tensor(X, dtype=torch.float32)


def _head(d: int, n_classes: int, hidden: int) -> nn.Module:
    if hidden:
        return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
    return nn.Linear(d, n_classes)


class DBRClassifier(ClassifierMixin, BaseEstimator):
    """A linear (or MLP) classifier on fixed features trained with CE + λ·JSD(p(x) || p(x̃)).

    Args:
        lam: weight λ of the JSD term (0 = ERM).
        hidden: 0 for a linear head, else the width of a one-hidden-layer MLP.
        weight_decay: L2 penalty on the head's weights (added to the loss).
        epochs: passes over the data; batch_size None = full batch.
        scale: "maxabs" (default for sparse), "standard" (default for dense) or "none"; fitted on X only.
    """

    def __init__(self, lam: float = 1.0, hidden: int = 0, weight_decay: float = 1e-3, epochs: int = 300,
                 lr: float = 1e-2, batch_size: int | None = None, scale: str = "auto", seed: int = 0):
        self.lam, self.hidden, self.weight_decay, self.epochs = lam, hidden, weight_decay, epochs
        self.lr, self.batch_size, self.scale, self.seed = lr, batch_size, scale, seed

    def _fit_scale(self, X) -> None:
        """Scale and center fitted on X; features that never vary in X get weight 0 (see the note below)."""
        kind = self.scale if self.scale != "auto" else ("maxabs" if sp.issparse(X) else "standard")
        A = _as_tensor(X)
        if kind == "maxabs":
            self.center_, spread = torch.zeros(A.shape[1]), A.abs().amax(0)
        elif kind == "standard":
            self.center_, spread = A.mean(0), A.std(0)
        elif kind == "none":
            self.center_, spread = torch.zeros(A.shape[1]), torch.ones(A.shape[1])
        else:
            raise SaefeatError(f"scale must be auto, maxabs, standard or none, got {self.scale!r}")
        # A latent that never fires on the training texts carries nothing to learn from; the mask token's own
        # latents are such features in x̃, and dropping them keeps the JSD from being met through them.
        self.inv_scale_ = torch.where(spread > 1e-8, 1.0 / spread.clamp_min(1e-8), torch.zeros_like(spread))

    def _prep(self, X) -> torch.Tensor:
        return (_as_tensor(X) - self.center_) * self.inv_scale_

    def fit(self, X, y, X_masked=None) -> DBRClassifier:
        """Fit on features X with labels y; X_masked (features of the masked copies, row-aligned) adds the JSD."""
        y = np.asarray(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise SaefeatError("the training labels hold one class only")
        if X_masked is not None and X_masked.shape != X.shape:
            raise SaefeatError(f"X_masked has shape {X_masked.shape}, X {X.shape}; masked copies must align row by row")
        y_t = torch.as_tensor(np.searchsorted(self.classes_, y), dtype=torch.long)
        self._fit_scale(X)
        A = self._prep(X)
        B = self._prep(X_masked) if X_masked is not None and self.lam > 0 else None
        torch.manual_seed(self.seed)
        net = _head(A.shape[1], len(self.classes_), self.hidden)
        if not self.hidden:  # a convex problem: start from zero, so unused features keep weight 0
            nn.init.zeros_(net.weight)
            nn.init.zeros_(net.bias)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
        gen = torch.Generator().manual_seed(self.seed)
        bs = self.batch_size or len(A)
        self.history_: list[dict[str, float]] = []
        for _ in range(self.epochs):
            # full batch: the rows as they are (a shuffled copy of the whole matrix each step cost most of the fit)
            batches = [slice(None)] if bs >= len(A) else torch.randperm(len(A), generator=gen).split(bs)
            for idx in batches:
                logits = net(A[idx])
                ce = nn.functional.cross_entropy(logits, y_t[idx])
                reg = jsd(logits, net(B[idx])) if B is not None else torch.zeros(())
                l2 = sum((w ** 2).sum() for w in weights)
                loss = ce + self.lam * reg + self.weight_decay * l2
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.history_.append({"ce": ce.item(), "jsd": reg.item()})
        self.net_ = net.eval()
        return self

    @torch.no_grad()
    def decision_function(self, X) -> np.ndarray:
        logits = self.net_(self._prep(X)).numpy()
        return logits[:, 1] - logits[:, 0] if len(self.classes_) == 2 else logits

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(self.net_(self._prep(X)), -1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]

    @torch.no_grad()
    def divergence(self, X, X_masked) -> np.ndarray:
        """Per-row JSD between predictions on x and on x̃: how much the prediction rests on the masked tokens."""
        return jsd(self.net_(self._prep(X)), self.net_(self._prep(X_masked)), reduction="none").numpy()


class DBRFineTuner(ClassifierMixin, BaseEstimator):
    """The host encoder (a private copy, trainable) read after block `layer`, pooled, and a linear head.

    representation "dense" mean-pools the residual stream; "sae" encodes it with the frozen SAE and max-pools
    the latents (gradients flow through the SAE into the encoder). Texts are cut to `max_tokens` tokens.
    """

    def __init__(self, model: str = "minilm", representation: str = "dense", sae: str = "default",
                 layer: int | None = None, lam: float = 1.0, lr: float = 2e-5, head_lr: float = 1e-3,
                 epochs: int = 2, batch_size: int = 16, max_tokens: int = 256, max_steps: int | None = None,
                 device: str | None = None, seed: int = 0, show_progress_bar: bool = False):
        self.model, self.representation, self.sae, self.layer = model, representation, sae, layer
        self.lam, self.lr, self.head_lr, self.epochs, self.batch_size = lam, lr, head_lr, epochs, batch_size
        self.max_tokens, self.max_steps, self.device, self.seed = max_tokens, max_steps, device, seed
        self.show_progress_bar = show_progress_bar

    def _setup(self, n_classes: int) -> None:
        if self.representation not in ("dense", "sae"):
            raise SaefeatError(f"representation must be 'dense' or 'sae', got {self.representation!r}")
        host = get_host(self.model, self.device)
        self.host_ = host
        self.sae_ = None
        layer, site = self.layer, "output"
        if self.representation == "sae" or layer is None:
            sae = resolve_sae(self.sae, self.model, host.device, layer=self.layer)
            check_compatible(sae, self.model, host.d_model, None)
            layer, site = host_read_point(sae.cfg, layer)
            if self.representation == "sae":
                self.sae_ = sae.requires_grad_(False).eval()
        host.check_layer(int(layer))
        self.layer_, self.site_ = int(layer), site
        torch.manual_seed(self.seed)
        self.encoder_ = copy.deepcopy(host.model).to(host.device).train()
        d = self.sae_.d_sae if self.sae_ is not None else host.d_model
        self.head_ = nn.Sequential(nn.LayerNorm(d, elementwise_affine=False), nn.Linear(d, n_classes)).to(host.device)

    def _batch(self, texts: Sequence[str]) -> Batch:
        host = self.host_
        cap = min(self.max_tokens, host.window_capacity)
        return host.batch([ids[:cap] for ids in host.tokenize(list(texts))])

    def _logits(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self._batch(texts)
        body = getattr(self.encoder_, "base_model", self.encoder_)
        with self.host_.hook(self.layer_, self.site_, stop=True, model=body) as cap:
            self.host_.forward(batch, model=body)
        h, content = cap.value.float(), batch.content
        m = content.unsqueeze(-1)
        if self.sae_ is None:
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            z = self.sae_.encode(h).float()
            pooled = z.masked_fill(~m, 0.0).amax(1)  # latents are >= 0, so masked positions never win
        return self.head_(pooled)

    def fit(self, texts: Sequence[str], y, masked_texts: Sequence[str] | None = None) -> DBRFineTuner:
        """Fine-tune on `texts` (labels y); `masked_texts[i]`, the masked copy of texts[i], adds the JSD term."""
        texts = list(texts)
        y = np.asarray(y)
        if masked_texts is not None and len(masked_texts) != len(texts):
            raise SaefeatError(f"{len(texts)} texts but {len(masked_texts)} masked copies")
        self.classes_ = np.unique(y)
        self._setup(len(self.classes_))
        y_t = torch.as_tensor(np.searchsorted(self.classes_, y), dtype=torch.long, device=self.host_.device)
        opt = torch.optim.AdamW([{"params": self.encoder_.parameters(), "lr": self.lr},
                                 {"params": self.head_.parameters(), "lr": self.head_lr}])
        gen = torch.Generator().manual_seed(self.seed)
        self.history_: list[dict[str, float]] = []
        steps = 0
        use_jsd = masked_texts is not None and self.lam > 0
        for _ in range(self.epochs):
            order = torch.randperm(len(texts), generator=gen).split(self.batch_size)
            for idx in tqdm(order, desc="fine-tune", disable=not self.show_progress_bar):
                idx = idx.tolist()
                logits = self._logits([texts[i] for i in idx])
                ce = nn.functional.cross_entropy(logits, y_t[idx])
                reg = jsd(logits, self._logits([masked_texts[i] for i in idx])) if use_jsd \
                    else torch.zeros((), device=logits.device)
                loss = ce + self.lam * reg
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.history_.append({"ce": ce.item(), "jsd": reg.item(), "loss": loss.item()})
                steps += 1
                if self.max_steps is not None and steps >= self.max_steps:
                    break
            if self.max_steps is not None and steps >= self.max_steps:
                break
        self.encoder_.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        texts = list(texts)
        bs = batch_size or self.batch_size
        out = [torch.softmax(self._logits(texts[i:i + bs]), -1).cpu() for i in range(0, len(texts), bs)]
        return torch.cat(out).numpy()

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        return self.classes_[self.predict_proba(texts).argmax(1)]
