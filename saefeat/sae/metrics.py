"""SAE quality on held-out tokens, with SAEBench's definitions.

explained variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)
CE loss recovered  = (CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)
KL recovered       = (KL_zero_ablation - KL_sae) / KL_zero_ablation, each KL(clean || patched) per next token
dead / dense latents: fire on no token / on more than `dense_density` (10%) of the tokens
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from saefeat.errors import SaefeatError
from saefeat.hosts import Batch, HostModel
from saefeat.sae.activations import content_activations
from saefeat.sae.model import SAE


@torch.no_grad()
def activation_metrics(sae: SAE, batches: Iterable[torch.Tensor], dense_density: float = 0.1) -> dict[str, float]:
    """Explained variance, L0, and the fractions of dead latents (never fire) and dense latents (fire on more
    than `dense_density` of the tokens) over batches (n, d_in)."""
    sq_err = sum_sq = 0.0
    sum_vec = torch.zeros(sae.d_in, dtype=torch.float64, device=sae.W_enc.device)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_enc.device)
    n = l0 = 0
    for x in batches:
        x = x.float()
        z = sae.encode(x)
        x_hat = sae.decode(z).float()
        sq_err += (x - x_hat).pow(2).sum().item()
        sum_sq += x.pow(2).sum().item()
        sum_vec += x.double().sum(0)
        l0 += (z > 0).sum().item()
        fires += (z > 0).sum(0, dtype=torch.float64)
        n += len(x)
    total_var = sum_sq / n - (sum_vec / n).pow(2).sum().item()
    return {
        "explained_variance": 1.0 - (sq_err / n) / total_var,
        "l0": l0 / n,
        "dead_fraction": (fires == 0).double().mean().item(),
        "dense_fraction": (fires > dense_density * n).double().mean().item(),
        "eval_tokens": float(n),
    }


def reconstruction_metrics(sae: SAE, host: HostModel, layer: int, windows: list[list[int]],
                           batch_windows: int = 16) -> dict[str, float]:
    """Explained variance, L0 and dead-latent fraction over the content tokens of `windows`."""
    return activation_metrics(sae, (content_activations(host, layer, windows[i:i + batch_windows])
                                    for i in range(0, len(windows), batch_windows)))


def _patched_log_probs(host: HostModel, layer: int, batch: Batch, replace) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities (n_targets, vocab) at the content targets and the target ids, with the residual
    after `layer` replaced by `replace(x)` at the batch's content positions (None: the clean model)."""

    def splice(h: torch.Tensor, _content: torch.Tensor | None) -> torch.Tensor:
        h = h.clone()
        h[batch.content] = replace(h[batch.content].float()).to(h.dtype)
        return h

    with host.hook(layer, replace=None if replace is None else splice):
        logits = host.forward(batch).logits
    ids, att = batch.input_ids, batch.attention_mask
    # predict token t+1 from position t; score only targets that are content tokens
    target_ok = batch.content[:, 1:] & att[:, 1:].bool()
    return F.log_softmax(logits[:, :-1][target_ok].float(), dim=-1), ids[:, 1:][target_ok]


@torch.no_grad()
def ce_recovered(sae: SAE, host: HostModel, layer: int, windows: list[list[int]],
                 batch_windows: int = 8) -> dict[str, float]:
    """CE loss clean, with the SAE spliced in and with the layer zero-ablated, the KL divergence of each patched
    next-token distribution from the clean one, and the recovered shares of both."""
    if not host.is_causal:
        raise SaefeatError("CE loss recovered is defined for causal LMs only")
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl = {"sae": 0.0, "zero": 0.0}
    count = 0
    for i in range(0, len(windows), batch_windows):
        batch = host.batch(windows[i:i + batch_windows])
        clean, targets = _patched_log_probs(host, layer, batch, None)
        ce["clean"] += F.nll_loss(clean, targets, reduction="sum").item()
        for name, fn in (("sae", sae), ("zero", torch.zeros_like)):
            patched, _ = _patched_log_probs(host, layer, batch, fn)
            ce[name] += F.nll_loss(patched, targets, reduction="sum").item()
            kl[name] += F.kl_div(patched, clean, log_target=True, reduction="sum").item()
            del patched
        count += len(targets)
    ce = {k: v / count for k, v in ce.items()}
    kl = {k: v / count for k, v in kl.items()}
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "kl_sae": kl["sae"], "kl_zero_ablation": kl["zero"],
        "kl_div_recovered": (kl["zero"] - kl["sae"]) / kl["zero"],
    }


def evaluate_sae(sae: SAE, host: HostModel, layer: int, windows: list[list[int]]) -> dict[str, float]:
    """All quality metrics that apply to this host (CE recovered only for causal LMs)."""
    out = reconstruction_metrics(sae, host, layer, windows)
    if host.is_causal:
        out |= ce_recovered(sae, host, layer, windows)
    return out
