"""SAE quality on held-out tokens, with SAEBench's definitions.

explained variance = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)
CE loss recovered  = (CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saefeat.device import autocast
from saefeat.hosts import HostModel
from saefeat.sae.activations import content_activations
from saefeat.sae.model import SAE


@torch.no_grad()
def reconstruction_metrics(sae: SAE, host: HostModel, layer: int, windows: list[list[int]],
                           batch_windows: int = 16) -> dict[str, float]:
    """Explained variance, L0 and dead-latent fraction over the content tokens of `windows`."""
    dev = host.device
    sq_err = sum_sq = 0.0
    sum_vec = torch.zeros(sae.d_in, dtype=torch.float64, device=dev)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)
    n = l0 = 0
    for i in range(0, len(windows), batch_windows):
        x = content_activations(host, layer, windows[i:i + batch_windows])
        z = sae.encode(x)
        x_hat = sae.decode(z)
        sq_err += (x - x_hat).pow(2).sum().item()
        sum_sq += x.pow(2).sum().item()
        sum_vec += x.double().sum(0)
        l0 += (z > 0).sum().item()
        fired |= (z > 0).any(0)
        n += len(x)
    total_var = sum_sq / n - (sum_vec / n).pow(2).sum().item()
    return {
        "explained_variance": 1.0 - (sq_err / n) / total_var,
        "l0": l0 / n,
        "dead_fraction": 1.0 - fired.float().mean().item(),
        "eval_tokens": float(n),
    }


def _patched_ce(host: HostModel, layer: int, ids: torch.Tensor, att: torch.Tensor, keep: torch.Tensor,
                replace) -> tuple[float, int]:
    """Mean next-token CE over content positions, with the residual after `layer` replaced by `replace(x)`."""

    def hook(_m, _i, output):
        if replace is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[keep] = replace(h[keep].float()).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = host.blocks[layer].register_forward_hook(hook)
    try:
        with autocast(host.device, "auto"):
            logits = host.model(input_ids=ids, attention_mask=att).logits.float()
    finally:
        handle.remove()
    # predict token t+1 from position t; score only targets that are content tokens
    target_ok = keep[:, 1:] & att[:, 1:].bool()
    loss = F.cross_entropy(logits[:, :-1][target_ok], ids[:, 1:][target_ok], reduction="sum")
    return loss.item(), int(target_ok.sum())


@torch.no_grad()
def ce_recovered(sae: SAE, host: HostModel, layer: int, windows: list[list[int]],
                 batch_windows: int = 8) -> dict[str, float]:
    """CE loss clean, with the SAE spliced in, and with the layer zero-ablated; and the recovered share."""
    if not host.is_causal:
        raise ValueError("CE loss recovered is defined for causal LMs only")
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    for i in range(0, len(windows), batch_windows):
        wrapped = [host.wrap(w) for w in windows[i:i + batch_windows]]
        ids, att = host.pad_batch([w for w, _ in wrapped])
        keep = torch.zeros_like(att, dtype=torch.bool)
        for j, (_, content) in enumerate(wrapped):
            keep[j, : len(content)] = torch.tensor(content, device=keep.device)
        for name, fn in (("clean", None), ("sae", sae), ("zero", torch.zeros_like)):
            loss, c = _patched_ce(host, layer, ids, att, keep, fn)
            totals[name] += loss
        count += c
    ce = {k: v / count for k, v in totals.items()}
    return {
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablation": ce["zero"],
        "ce_loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
    }


def evaluate_sae(sae: SAE, host: HostModel, layer: int, windows: list[list[int]]) -> dict[str, float]:
    """All quality metrics that apply to this host (CE recovered only for causal LMs)."""
    out = reconstruction_metrics(sae, host, layer, windows)
    if host.is_causal:
        out |= ce_recovered(sae, host, layer, windows)
    return out
