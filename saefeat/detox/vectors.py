"""Steering vectors away from toxic text at the SAE's layer: difference in means of the residual stream, the same on
SAE-denoised activations (SDCV, arXiv 2505.15038), and a vector learned inside the subspace of the top toxic
latents (SAE-SSV, arXiv 2505.16188)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from saefeat.detox.steering import VectorSteering
from saefeat.embed.embedder import SAEEmbedder
from saefeat.errors import SaefeatError


def _labels(labels: Sequence[int]) -> np.ndarray:
    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        raise SaefeatError("a steering vector needs toxic (1) and non-toxic (0) texts")
    return y


def _decoder_rows(embedder: SAEEmbedder, latents: Sequence[int] | None = None) -> np.ndarray:
    """Decoder rows in residual-stream units (the SAE's input scale undone)."""
    W = embedder.sae.W_dec.detach().float()
    if latents is not None:
        W = W[torch.as_tensor(list(latents), dtype=torch.long)]
    return (W / embedder.sae.cfg.input_scale).cpu().numpy()


def diff_in_means(embedder: SAEEmbedder, texts: Sequence[str], labels: Sequence[int], alpha: float = 1.0,
                  batch_size: int = 32) -> VectorSteering:
    """alpha * (mean clean - mean toxic) of the residual stream at the embedder's layer.

    Each document's residual stream is averaged over its tokens, then the documents of each class.
    """
    y = _labels(labels)
    dense = embedder.encode_dense(list(texts), pooling="mean", batch_size=batch_size)
    vector = dense[y == 0].mean(0) - dense[y == 1].mean(0)
    return VectorSteering(torch.from_numpy(vector), embedder.layer, alpha)


def sdcv(embedder: SAEEmbedder, texts: Sequence[str], labels: Sequence[int], alpha: float = 1.0,
         batch_size: int = 32) -> VectorSteering:
    """SDCV: the difference in means of the SAE's reconstructions instead of the raw residual stream.

    Reconstruction keeps what the SAE's latents carry and drops its error term, the part of the residual least
    tied to any feature. Decoding is linear, so the mean reconstruction of a document is the decoder applied to
    its mean latent code (the decoder bias cancels in the difference).
    """
    y = _labels(labels)
    codes = embedder.encode(list(texts), pooling="mean", batch_size=batch_size)
    diff = np.asarray(codes[y == 0].mean(0) - codes[y == 1].mean(0)).ravel()
    return VectorSteering(torch.from_numpy((diff @ _decoder_rows(embedder)).astype(np.float32)), embedder.layer,
                          alpha)


def ssv(embedder: SAEEmbedder, texts: Sequence[str], labels: Sequence[int], latents: Sequence[int],
        alpha: float = 1.0, l2: float = 1.0, steps: int = 300, lr: float = 0.05, C: float = 1.0,
        batch_size: int = 32, seed: int = 0) -> VectorSteering:
    """SAE-SSV: a steering vector restricted to the span of the decoder rows of `latents` (the top toxic ones).

    A logistic probe for toxicity is fitted on the documents' mean residual streams; the vector v = c @ W_dec[latents]
    is learned (Adam over the coefficients c) to move toxic documents to the probe's clean side, with a penalty
    `l2` on ||v||^2 relative to the squared norm of the difference in means, so that v stays as small as the
    move allows.
    """
    y = _labels(labels)
    if not len(latents):
        raise SaefeatError("SAE-SSV needs at least one latent to span its subspace")
    X = embedder.encode_dense(list(texts), pooling="mean", batch_size=batch_size).astype(np.float64)
    probe = LogisticRegression(C=C, max_iter=2000).fit(X, y)
    w = torch.as_tensor(probe.coef_[0], dtype=torch.float32)
    b = float(probe.intercept_[0])
    basis = torch.as_tensor(_decoder_rows(embedder, latents))
    toxic = torch.as_tensor(X[y == 1], dtype=torch.float32)
    ref = float(np.linalg.norm(X[y == 0].mean(0) - X[y == 1].mean(0))) ** 2 or 1.0
    torch.manual_seed(seed)
    c = torch.zeros(basis.shape[0], requires_grad=True)
    opt = torch.optim.Adam([c], lr=lr)
    for _ in range(steps):
        v = c @ basis
        loss = F.softplus((toxic + v) @ w + b).mean() + l2 * v.pow(2).sum() / ref
        opt.zero_grad()
        loss.backward()
        opt.step()
    return VectorSteering((c @ basis).detach(), embedder.layer, alpha)
