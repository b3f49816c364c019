"""Training TopK SAEs on a host's residual stream (Gao et al. 2024 recipe).

TopK activation, AuxK loss on dead latents, unit-norm decoder rows, a shuffled streaming buffer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saefeat.device import autocast
from saefeat.hosts import HostModel
from saefeat.sae.activations import CorpusSource, ShuffledBuffer, sample_windows
from saefeat.sae.metrics import evaluate_sae
from saefeat.sae.model import SAE, SAEConfig


@dataclass
class TrainConfig:
    """The training recipe (kept in configs/train/*.yaml for the shipped SAEs)."""

    layer: int
    d_sae: int = 4096
    k: int = 32
    total_tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float = 5e-4
    warmup_steps: int = 50
    aux_k: int | None = None  # default d_in // 2
    aux_coef: float = 1 / 32
    dead_tokens: int = 500_000  # a latent unused for this many tokens counts as dead for AuxK
    seq_len: int = 256
    buffer_tokens: int = 200_000
    batch_windows: int = 16
    eval_windows: int = 200
    held_out_every: int = 20
    bf16: bool = True  # bf16 autocast for host and SAE matmuls (fast on CPUs with AVX512-BF16 and on GPUs)
    seed: int = 0
    sources: list[CorpusSource] = field(default_factory=list)


def init_sae(cfg: TrainConfig, host: HostModel, sample: torch.Tensor) -> SAE:
    """Unit-norm random decoder, encoder = decoder transpose, b_dec = mean; inputs scaled so E||x||^2 = d_in."""
    g = torch.Generator().manual_seed(cfg.seed)
    scale = math.sqrt(host.d_model / sample.pow(2).sum(-1).mean().item())
    sae = SAE(SAEConfig(d_in=host.d_model, d_sae=cfg.d_sae, architecture="topk", k=cfg.k, input_scale=scale,
                        host=host.name, layer=cfg.layer, hook_name=host.hook_name(cfg.layer)))
    w = torch.randn(cfg.d_sae, host.d_model, generator=g)
    w /= w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_((sample * scale).mean(0))
    return sae


def _normalise_decoder(sae: SAE) -> None:
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _drop_parallel_grad(sae: SAE) -> None:
    """Keep decoder rows on the unit sphere: remove the gradient component along each row."""
    if sae.W_dec.grad is not None:
        w = sae.W_dec.data
        sae.W_dec.grad -= (sae.W_dec.grad * w).sum(-1, keepdim=True) * w


def train_sae(host: HostModel, cfg: TrainConfig, log: Callable[[dict[str, float], int], None] | None = None,
              show_progress_bar: bool = True) -> tuple[SAE, dict[str, float]]:
    """Train a TopK SAE on `cfg.sources`; return it with its held-out metrics."""
    torch.manual_seed(cfg.seed)
    host.check_layer(cfg.layer)
    dev = host.device
    precision = "bf16" if cfg.bf16 else "fp32"
    windows = sample_windows(host, cfg.sources, cfg.seq_len, cfg.seed, held_out=False,
                             held_out_every=cfg.held_out_every)
    buffer = ShuffledBuffer(host, cfg.layer, windows, cfg.buffer_tokens, cfg.batch_windows,
                            precision=precision)
    with autocast(dev, precision):
        first = buffer.next_batch(cfg.batch_size)
    sae = init_sae(cfg, host, first).to(dev)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    steps = max(1, cfg.total_tokens // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * min(1.0, 5 * (steps - s) / steps))
    aux_k = cfg.aux_k or host.d_model // 2
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=dev)
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train SAE L{cfg.layer} d_sae={cfg.d_sae} k={cfg.k}", disable=not show_progress_bar)
    x = first.to(dev)
    for step in bar:
        if step:
            with autocast(dev, precision):
                x = buffer.next_batch(cfg.batch_size).to(dev)
        x = x.float()
        target = x * sae.cfg.input_scale
        with autocast(dev, precision):
            pre = F.relu(sae.pre_acts(x))
            vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
        recon = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals.float(), mode="sum") + sae.b_dec
        err = target - recon
        total_var = (target - target.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=dev)
        fired[idx.flatten()] = True
        since_fired += len(x)
        since_fired[fired] = 0
        dead = since_fired > cfg.dead_tokens
        aux_loss = torch.zeros((), device=dev)
        if dead.any():
            k_aux = min(aux_k, int(dead.sum()))
            masked = pre.float().masked_fill(~dead, 0.0)
            a_vals, a_idx = masked.topk(k_aux, dim=-1, sorted=False)
            e_hat = F.embedding_bag(a_idx, sae.W_dec, per_sample_weights=a_vals, mode="sum")
            e = err.detach()
            aux_loss = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-8)
        loss = fvu + cfg.aux_coef * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _drop_parallel_grad(sae)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sched.step()
        _normalise_decoder(sae)
        if step % 20 == 0 or step == steps - 1:
            stats = {"train_fvu": fvu.item(), "train_aux_loss": aux_loss.item(),
                     "train_dead_fraction": dead.float().mean().item(), "tokens": float((step + 1) * cfg.batch_size),
                     "tokens_per_s": (step + 1) * cfg.batch_size / (time.time() - t0)}
            bar.set_postfix(fvu=f"{stats['train_fvu']:.3f}", dead=f"{stats['train_dead_fraction']:.3f}")
            if log:
                log(stats, step)
    sae.eval().requires_grad_(False)
    held_out = list(islice(sample_windows(host, cfg.sources, cfg.seq_len, cfg.seed, held_out=True,
                                          held_out_every=cfg.held_out_every), cfg.eval_windows))
    metrics = evaluate_sae(sae, host, cfg.layer, held_out)
    metrics["train_seconds"] = time.time() - t0
    if log:
        log(metrics, steps)
    return sae, metrics
