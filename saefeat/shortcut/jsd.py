"""Jensen-Shannon divergence between predictive distributions, from logits (numerically stable)."""

from __future__ import annotations

import math

import torch

from saefeat.errors import SaefeatError


def jsd_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row JSD(P || Q) = ½KL(P||M) + ½KL(Q||M), M = ½(P+Q), in nats; inputs are log-probabilities (..., C)."""
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def jsd(logits_p: torch.Tensor, logits_q: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """JSD between softmax(logits_p) and softmax(logits_q) row by row; reduction mean, sum or none.

    Symmetric, zero exactly when the distributions agree, and at most log 2.
    """
    out = jsd_from_log_probs(torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)).clamp_min(0.0)
    if reduction == "mean":
        return out.mean()
    if reduction == "sum":
        return out.sum()
    if reduction == "none":
        return out
    raise SaefeatError(f"reduction must be mean, sum or none, got {reduction!r}")
