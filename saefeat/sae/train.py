"""Training SAEs on a host's residual stream: TopK (Gao et al. 2024), BatchTopK and Matryoshka BatchTopK.

Unit-norm decoder rows, AuxK loss on dead latents, a sparse encoder backward. Two data paths: a shuffled streaming
buffer that runs the host as it trains (`train_sae`), and an on-disk activation store written once and read for
every variant and epoch (`train_from_store`, with checkpoints and resume).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from saefeat.atomic import atomic_write
from saefeat.device import autocast
from saefeat.errors import MissingFileError, SaefeatError
from saefeat.hosts import HostModel
from saefeat.sae.activations import CorpusSource, ShuffledBuffer, sample_windows
from saefeat.sae.formats import load_sae, save_sae
from saefeat.sae.metrics import activation_metrics, evaluate_sae
from saefeat.sae.model import SAE, SAEConfig
from saefeat.sae.store import ActivationStore


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
    sae = SAE(SAEConfig(d_in=host.d_model, d_sae=cfg.d_sae, architecture="topk", k=cfg.k,
                        input_scale=input_scale(sample), host=host.name, layer=cfg.layer,
                        hook_name=host.hook_name(cfg.layer), context_size=cfg.seq_len))
    return init_weights(sae, sample, cfg.seed)


def _normalise_decoder(sae: SAE) -> None:
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def _drop_parallel_grad(sae: SAE) -> None:
    """Keep decoder rows on the unit sphere: remove the gradient component along each row."""
    if sae.W_dec.grad is not None:
        w = sae.W_dec.data
        sae.W_dec.grad -= (sae.W_dec.grad * w).sum(-1, keepdim=True) * w


ARCHITECTURES = ("topk", "batchtopk", "matryoshka")  # matryoshka = Matryoshka BatchTopK

def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR matrix from (row, col, value) triples in any order (duplicates are not merged)."""
    if len(rows) > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.argsort(rows, stable=True)
        cols, values = cols[order], values[order]
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, cols, values, shape)


class _PairDot(torch.autograd.Function):
    """out[n] = <a[rows[n]], b[cols[n]]> for distinct (row, col) pairs with `rows` sorted: a sampled product.

    The encoder's selected pre-activations without the dense (tokens x d_sae) product and its dense backward: the
    gradient reaches only the encoder columns of selected latents (sparse CSR products, exact in fp32).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        pattern = _csr(rows, cols, torch.zeros(len(rows), dtype=a.dtype, device=a.device), (len(a), len(b)))
        ctx.save_for_backward(a, b, rows, cols)
        return torch.sparse.sampled_addmm(pattern, a, b.t(), beta=0.0).values()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b, rows, cols = ctx.saved_tensors
        ga = _csr(rows, cols, grad, (len(a), len(b))) @ b if ctx.needs_input_grad[0] else None
        gb = _csr(cols, rows, grad, (len(b), len(a))) @ a if ctx.needs_input_grad[1] else None
        return ga, gb, None, None


def default_prefixes(d_sae: int, levels: int = 5) -> list[int]:
    """Nested dictionary sizes of a Matryoshka SAE: d/16, d/8, d/4, d/2, d for 5 levels."""
    return sorted({max(1, d_sae >> (levels - 1 - i)) for i in range(levels)})


@dataclass
class Objective:
    """The loss of one SAE architecture: sparsity rule, AuxK on dead latents, BatchTopK threshold estimate."""

    architecture: str = "topk"
    k: int = 32
    aux_k: int = 192
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000
    prefixes: list[int] | None = None  # Matryoshka: nested dictionary sizes, the last = d_sae
    threshold_beta: float = 0.999  # EMA of the smallest selected activation (BatchTopK inference threshold)
    candidates: int = 4  # BatchTopK: the top candidates*k latents of each token bound the batch threshold from below

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SaefeatError(f"unknown training architecture {self.architecture!r}; expected one of {ARCHITECTURES}")


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """The LR multiplier at `step` of `steps`: linear warm-up, constant, linear decay over the last 20%."""
    return min(1.0, (step + 1) / warmup_steps) * min(1.0, 5 * (steps - step) / steps)


class SAETrainer:
    """One SAE's optimisation state (Adam, LR schedule, dead-latent clock, threshold) and its training step.

    Decoder rows stay unit-norm; the encoder's selected pre-activations are recomputed sparsely in fp32, so the
    backward costs O(tokens x k x d_in) instead of a dense (tokens x d_sae) product.
    """

    PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init__(self, sae: SAE, objective: Objective, steps: int, lr: float, warmup_steps: int,
                 precision: str = "bf16"):
        self.sae, self.obj, self.steps, self.precision = sae, objective, steps, precision
        if objective.architecture != "topk" and sae.cfg.architecture != "batchtopk":
            raise SaefeatError(f"a {objective.architecture} objective trains a batchtopk SAE")
        if hasattr(sae, "threshold"):
            sae.threshold.requires_grad_(False)
        self.params = [getattr(sae, n) for n in self.PARAMS]
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, steps, warmup_steps))
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_enc.device)
        self.threshold: float | None = None
        self.step_count = 0

    # -- selection (no gradient): which (token, latent) pairs are active
    def _select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Active (rows, latents), sorted by row: each token's top k, or the batch's top k*B (BatchTopK)."""
        n, d_sae = pre.shape
        k = self.obj.k
        # torch.topk, not the inference kernel: bf16 pre-activations tie often, and any tied latent will do here
        if self.obj.architecture == "topk":
            idx = pre.topk(k, dim=-1, sorted=False).indices
            return torch.arange(n, device=pre.device).repeat_interleave(k), idx.reshape(-1)
        # the batch's k*B largest positive values, exactly: every token's top `candidates * k` hold k*B values, so
        # the (k*B)-th largest of them is a lower bound of the batch's (k*B)-th largest; the values above that bound
        # are read from the whole batch, and the k*B largest of them kept
        m = min(d_sae, self.obj.candidates * k)
        cand = pre.topk(m, dim=-1, sorted=False).values.reshape(-1).float()
        want = min(k * n, cand.numel())
        bound = cand.topk(want, sorted=False).values.min()
        above = pre >= bound if bound > 0 else pre > 0
        rows, cols = above.nonzero(as_tuple=True)
        if len(rows) > want:
            keep = pre[rows, cols].float().topk(want, sorted=False).indices.sort().values  # rows stay sorted
            rows, cols = rows[keep], cols[keep]
        return rows, cols

    def _encode_pairs(self, xc: torch.Tensor, w_t: torch.Tensor, rows: torch.Tensor,
                      latents: torch.Tensor) -> torch.Tensor:
        return F.relu(_PairDot.apply(xc, w_t, rows, latents) + self.sae.b_enc[latents])

    def step(self, x: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a batch (B, d_in) of raw activations; returns the batch's statistics."""
        sae, obj = self.sae, self.obj
        x = x.float()
        n = len(x)
        target = x * sae.cfg.input_scale
        with torch.no_grad(), autocast(x.device, self.precision):
            pre = sae.pre_acts(x)
        rows, latents = self._select(pre)
        xc = target - sae.b_dec if sae.cfg.apply_b_dec_to_input else target
        w_t = sae.W_enc.t().contiguous()
        vals = self._encode_pairs(xc, w_t, rows, latents)
        offsets = torch.zeros(n, dtype=torch.long, device=x.device)
        offsets[1:] = torch.bincount(rows, minlength=n).cumsum(0)[:-1]
        total_var = (target - target.mean(0)).pow(2).sum()
        stats: dict[str, float] = {}
        if obj.architecture == "matryoshka":
            # one decode for every nested prefix: the pairs of each prefix's new latents form their own bags
            # (level g of token r is bag g*n + r); cumulative sums over the levels give each prefix's reconstruction
            ends = torch.tensor((obj.prefixes or default_prefixes(sae.d_sae))[:-1], device=x.device)
            levels = len(ends) + 1
            bag = torch.bucketize(latents, ends, right=True) * n + rows
            order = torch.argsort(bag, stable=True)
            starts = torch.zeros(levels * n, dtype=torch.long, device=x.device)
            starts[1:] = torch.bincount(bag, minlength=levels * n).cumsum(0)[:-1]
            parts = F.embedding_bag(latents[order], sae.W_dec, starts, per_sample_weights=vals[order], mode="sum")
            prefix_recon = sae.b_dec + parts.view(levels, n, -1).cumsum(0)
            fvus = (target - prefix_recon).pow(2).sum((1, 2)) / total_var
            recon = prefix_recon[-1]
            loss = fvus.mean()  # every nested prefix reconstructs; the mean keeps the LR's scale
            fvu = fvus[-1]
            stats["fvu_smallest_prefix"] = fvus[0].item()
        else:
            recon = F.embedding_bag(latents, sae.W_dec, offsets, per_sample_weights=vals, mode="sum") + sae.b_dec
            fvu = (target - recon).pow(2).sum() / total_var
            loss = fvu
        with torch.no_grad():
            active = vals > 0
            fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
            fired[latents[active]] = True
            self.since_fired += n
            self.since_fired[fired] = 0
            dead = self.since_fired > obj.dead_tokens
            if obj.architecture != "topk" and active.any():
                t = vals[active].min().item()
                self.threshold = t if self.threshold is None else (
                    obj.threshold_beta * self.threshold + (1 - obj.threshold_beta) * t)
        aux_loss = torch.zeros((), device=x.device)
        if dead.any():
            dead_ids = dead.nonzero().squeeze(1)
            k_aux = min(obj.aux_k, len(dead_ids))
            with torch.no_grad():
                local = pre[:, dead_ids].topk(k_aux, dim=-1, sorted=False).indices
            a_lat = dead_ids[local].reshape(-1)
            a_rows = torch.arange(n, device=x.device).repeat_interleave(k_aux)
            a_vals = self._encode_pairs(xc, w_t, a_rows, a_lat)
            e_hat = F.embedding_bag(a_lat.view(n, k_aux), sae.W_dec, per_sample_weights=a_vals.view(n, k_aux),
                                    mode="sum")
            e = (target - recon).detach()
            aux_loss = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-8)
        loss = loss + obj.aux_coef * aux_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _drop_parallel_grad(sae)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        stats["lr"] = self.sched.get_last_lr()[0]
        self.sched.step()
        _normalise_decoder(sae)
        self.step_count += 1
        stats |= {"fvu": fvu.item(), "aux_loss": aux_loss.item(), "l0": active.sum().item() / n,
                  "dead_fraction": dead.float().mean().item()}
        return stats

    def apply_threshold(self) -> None:
        """Write the estimated threshold into a batchtopk SAE (its inference encoding then uses it)."""
        if self.obj.architecture != "topk" and self.threshold is not None:
            with torch.no_grad():
                self.sae.threshold.fill_(self.threshold)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able settings) that `load_state` restores exactly."""
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        opt = self.opt.state_dict()
        for i, st in opt["state"].items():
            tensors |= {f"opt.{i}.{name}": t for name, t in st.items()}
        tensors["since_fired"] = self.since_fired
        tensors["rng.torch"] = torch.get_rng_state()
        sched = {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"}
        info = {"step": self.step_count, "threshold": self.threshold, "param_groups": opt["param_groups"],
                "scheduler": sched, "sae_config": asdict(self.sae.cfg)}
        return tensors, info

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        dev = self.sae.W_enc.device
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = t if name == "step" else t.to(dev)
        self.opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        self.sched.load_state_dict({**info["scheduler"], "lr_lambdas": [None]})
        self.since_fired.copy_(tensors["since_fired"])
        torch.set_rng_state(tensors["rng.torch"])
        self.threshold = info["threshold"]
        self.step_count = int(info["step"])


def init_weights(sae: SAE, sample: torch.Tensor, seed: int) -> SAE:
    """Unit-norm random decoder, encoder = decoder transpose, b_dec = the (scaled) sample mean."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(sae.d_sae, sae.d_in, generator=g)
    w /= w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_((sample.float() * sae.cfg.input_scale).mean(0))
    return sae


def input_scale(sample: torch.Tensor) -> float:
    """The factor that makes E||x||^2 = d_in on `sample`."""
    return math.sqrt(sample.shape[-1] / sample.float().pow(2).sum(-1).mean().item())


@dataclass
class StoreTrainConfig:
    """A recipe for training one SAE from an activation store (configs/train/<model>-<variant>.yaml)."""

    layer: int
    architecture: str = "topk"  # topk | batchtopk | matryoshka (Matryoshka BatchTopK, saved as batchtopk)
    d_sae: int = 16384
    k: int = 32
    epochs: float = 3.0  # passes over the store's training tokens
    total_tokens: int | None = None  # overrides epochs when set
    batch_size: int = 4096
    lr: float = 5e-4
    warmup_steps: int = 100
    aux_k: int | None = None  # default d_in // 2
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000  # unused for this many tokens = dead (AuxK target, logged dead share)
    prefixes: list[int] | None = None  # Matryoshka nested sizes; default d/16, d/8, d/4, d/2, d
    threshold_beta: float = 0.999
    candidates: int = 4
    group_shards: int = 4  # shards shuffled together by the store reader
    init_from: str | None = None  # an SAE (any format load_sae reads) to start from instead of random weights
    bf16: bool = True
    seed: int = 0
    checkpoint_every: int = 500  # steps
    log_every: int = 50
    eval_every: int = 500  # steps between held-out evaluations (0 = only at the end)
    eval_tokens: int = 16_384  # held-out tokens of a periodic evaluation (the final one reads the whole slice)

    # settings that never change the trained weights: they may differ when a run resumes
    RUNTIME_KEYS = ("checkpoint_every", "log_every", "eval_every", "eval_tokens")
    # the run's length: a checkpoint resumes under another length while the LR schedules agree up to its step
    LENGTH_KEYS = ("epochs", "total_tokens")

    def __post_init__(self) -> None:
        Objective(self.architecture)  # validates the name
        if self.architecture == "matryoshka" and self.prefixes and self.prefixes[-1] != self.d_sae:
            raise SaefeatError(f"the last Matryoshka prefix must be d_sae={self.d_sae}, got {self.prefixes}")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_KEYS}

    def steps(self, train_tokens: int) -> int:
        """Optimiser steps of this recipe on a store with `train_tokens` training tokens."""
        total = self.total_tokens or int(self.epochs * train_tokens)
        return max(1, math.ceil(total / self.batch_size))


class TrainingRunError(SaefeatError):
    """A run folder whose checkpoint belongs to another recipe or another store."""


CHECKPOINT = "checkpoint.safetensors"


def _save_checkpoint(trainer: SAETrainer, path: Path, extra: dict[str, Any]) -> None:
    tensors, info = trainer.state()
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"saefeat_checkpoint": json.dumps(info | extra)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), durable=True)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), "pt") as fh:
        info = json.loads(fh.metadata()["saefeat_checkpoint"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, info


def _resumable(info: dict[str, Any], identity: dict[str, Any], cfg: StoreTrainConfig, steps: int,
               train_tokens: int) -> bool:
    """Whether a checkpoint is a prefix of this run: same recipe, store and layer up to the run's length,
    and an LR schedule that agrees with this run's at every step taken so far."""
    old = info["identity"]

    def shape(ident: dict[str, Any]) -> dict[str, Any]:
        recipe = {k: v for k, v in ident["recipe"].items() if k not in StoreTrainConfig.LENGTH_KEYS}
        return {**ident, "recipe": recipe}

    if old == identity:
        return True
    if shape(old) != shape(identity):
        return False
    old_cfg = StoreTrainConfig(**old["recipe"])
    old_steps, done = old_cfg.steps(train_tokens), int(info["step"])
    return done <= min(old_steps, steps) and all(
        lr_factor(s, old_steps, cfg.warmup_steps) == lr_factor(s, steps, cfg.warmup_steps) for s in range(done + 1))


def _eval_batches(acts: np.ndarray, device: torch.device, batch: int = 4096) -> Iterator[torch.Tensor]:
    for i in range(0, len(acts), batch):
        yield torch.from_numpy(np.array(acts[i:i + batch], dtype=np.float32)).to(device)


def evaluate_on_store(sae: SAE, store: ActivationStore, layer: int, max_tokens: int | None = None,
                      precision: str = "fp32") -> dict[str, float]:
    """Explained variance, L0 and never-firing share on the store's held-out slice (inference encoding)."""
    dev = sae.W_enc.device
    with autocast(dev, precision):
        return activation_metrics(sae, _eval_batches(store.eval_activations(layer, max_tokens), dev))


def warm_start(cfg: StoreTrainConfig, store: ActivationStore) -> SAE:
    """The SAE at `cfg.init_from` as trainable fp32 weights with the recipe's k: it must be a TopK SAE of the
    recipe's width, trained on the store's host at the recipe's layer (its input scale is kept)."""
    where = f"init_from={cfg.init_from}"
    try:
        init = load_sae(cfg.init_from)
    except MissingFileError as e:
        raise MissingFileError(f"{where}: {e}") from None
    if cfg.architecture != "topk" or init.cfg.architecture != "topk":
        raise SaefeatError(f"{where}: warm starts are for TopK SAEs and a topk recipe, got a "
                           f"{init.cfg.architecture} SAE and architecture={cfg.architecture}")
    if (init.d_in, init.d_sae) != (store.d_model, cfg.d_sae):
        raise SaefeatError(f"{where}: its shape (d_in {init.d_in}, d_sae {init.d_sae}) is not the recipe's "
                           f"(d_in {store.d_model}, d_sae {cfg.d_sae})")
    if (init.cfg.host, init.cfg.layer) != (store.identity["host"], cfg.layer):
        raise SaefeatError(f"{where}: it reads {init.cfg.host} layer {init.cfg.layer}, the recipe "
                           f"{store.identity['host']} layer {cfg.layer}")
    warm = {"content_hash": init.content_hash, "k": init.k, "path": str(cfg.init_from)}
    sae = SAE(replace(init.cfg, k=cfg.k, source_format="saefeat", extra={"warm_start": warm}))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(getattr(init, name).float())
    sae.content_hash = init.content_hash
    return sae


def train_from_store(store: ActivationStore, cfg: StoreTrainConfig, output: str | Path,
                     log: Callable[[dict[str, float], int], None] | None = None, half: bool = True,
                     meta: dict[str, Any] | None = None, device: str | torch.device | None = "cpu",
                     overwrite: bool = False, show_progress_bar: bool = True) -> tuple[SAE, dict[str, float], Path]:
    """Train an SAE on one layer of a store; return it, its held-out metrics and the folder it was saved to.

    `output` is the run folder: `checkpoint.safetensors` (every `checkpoint_every` steps and at the end),
    `log.jsonl` (every logged line) and `sae/` (the final SAE, saefeat layout, fp16 if `half`). Rerun with the
    same `output` to resume from the last checkpoint: the result is the one an uninterrupted run gives. `log`
    receives each line's metrics with the step (the command layer sends them to MLflow).
    """
    output = Path(output)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    precision = "bf16" if cfg.bf16 else "fp32"
    identity = {"recipe": cfg.identity(), "store": store.fingerprint, "layer": cfg.layer}
    start_sae = warm_start(cfg, store) if cfg.init_from else None
    if start_sae is not None:  # the starting weights, not the path, say which run a checkpoint belongs to
        identity["init_from"] = start_sae.content_hash
    steps = cfg.steps(store.train_tokens)
    ckpt = output / CHECKPOINT
    saved = _read_checkpoint(ckpt) if ckpt.is_file() else None
    if saved is not None and not _resumable(saved[1], identity, cfg, steps, store.train_tokens):
        if not overwrite:
            raise TrainingRunError(f"{ckpt} belongs to another recipe or store; pass overwrite=True or use "
                                   "another output folder")
        saved = None
    if saved is not None and saved[1]["identity"] != identity:
        print(f"{ckpt}: step {saved[1]['step']} of a run of another length, the same as step "
              f"{saved[1]['step']} of this one (same LR up to there); continuing it as {steps} steps", flush=True)
        saved[1]["identity"] = identity
    torch.manual_seed(cfg.seed)
    if saved is None and start_sae is not None:
        sae = start_sae
    elif saved is None:
        sample = torch.from_numpy(next(store.batches(cfg.layer, cfg.batch_size, cfg.seed,
                                                     group_shards=cfg.group_shards))).float()
        arch = "topk" if cfg.architecture == "topk" else "batchtopk"
        sae_cfg = SAEConfig(d_in=store.d_model, d_sae=cfg.d_sae, architecture=arch, k=cfg.k,
                            input_scale=input_scale(sample), host=store.identity["host"], layer=cfg.layer,
                            hook_name=f"blocks.{cfg.layer}.hook_resid_post", context_size=store.seq_len)
        if cfg.architecture != "topk":
            sae_cfg.extra["trained_as"] = cfg.architecture
        if cfg.architecture == "matryoshka":
            sae_cfg.extra["matryoshka_prefixes"] = cfg.prefixes or default_prefixes(cfg.d_sae)
        sae = init_weights(SAE(sae_cfg), sample, cfg.seed)
    else:
        sae = SAE(SAEConfig(**saved[1]["sae_config"]))
    sae = sae.to(dev).train()
    objective = Objective(cfg.architecture, cfg.k, cfg.aux_k or store.d_model // 2, cfg.aux_coef, cfg.dead_tokens,
                          sae.cfg.extra.get("matryoshka_prefixes"), cfg.threshold_beta, cfg.candidates)
    trainer = SAETrainer(sae, objective, steps, cfg.lr, cfg.warmup_steps, precision)
    elapsed = 0.0
    if saved is not None:
        trainer.load_state(*saved)
        elapsed = float(saved[1].get("train_seconds", 0.0))
    start = trainer.step_count
    output.mkdir(parents=True, exist_ok=True)
    log_file = output / "log.jsonl"
    name = f"L{cfg.layer} {cfg.architecture} d_sae={cfg.d_sae} k={cfg.k}"
    if start:
        print(f"resuming {name} from {ckpt} at step {start}/{steps}", flush=True)
        if log_file.is_file():  # lines logged after the checkpoint are logged again by this session
            kept = [ln for ln in log_file.read_text().splitlines(keepends=True)
                    if ln.endswith("\n") and json.loads(ln)["step"] <= start]
            atomic_write(log_file, lambda tmp: Path(tmp).write_text("".join(kept)))
    bar = tqdm(total=steps, initial=start, desc=f"train {name}", disable=not show_progress_bar, unit="step")
    batches = store.batches(cfg.layer, cfg.batch_size, cfg.seed, start=start, group_shards=cfg.group_shards)
    sums: dict[str, float] = {}
    n_sum, t_session, t_line = 0, time.perf_counter(), time.perf_counter()

    def emit(stats: dict[str, float], step: int) -> None:
        with open(log_file, "a") as fh:
            fh.write(json.dumps({"step": step, **stats}) + "\n")
        if log:
            log(stats, step)

    for step in range(start, steps):
        x = torch.from_numpy(next(batches)).to(dev)
        stats = trainer.step(x)
        for key, v in stats.items():
            sums[key] = sums.get(key, 0.0) + v
        n_sum += 1
        bar.update(1)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == steps:
            _save_checkpoint(trainer, ckpt, {"identity": identity,
                                             "train_seconds": elapsed + time.perf_counter() - t_session})
        if done % cfg.log_every == 0 or done == steps:
            now = time.perf_counter()
            line = {k: v / n_sum for k, v in sums.items()}
            line = {"explained_variance": 1.0 - line.pop("fvu"), **line, "tokens": float(done * cfg.batch_size),
                    "tokens_per_s": n_sum * cfg.batch_size / (now - t_line)}
            if cfg.eval_every and (done % cfg.eval_every == 0):
                trainer.apply_threshold()
                ev = evaluate_on_store(sae, store, cfg.layer, cfg.eval_tokens, precision)
                line |= {"eval_explained_variance": ev["explained_variance"], "eval_l0": ev["l0"]}
                if trainer.threshold is not None:
                    line["threshold"] = trainer.threshold
            bar.set_postfix(ev=f"{line['explained_variance']:.3f}", l0=f"{line['l0']:.1f}",
                            dead=f"{line['dead_fraction']:.2%}")
            held = f" | held-out EV {line['eval_explained_variance']:.4f} L0 {line['eval_l0']:.1f}" \
                if "eval_explained_variance" in line else ""
            tqdm.write(f"step {done}/{steps} tokens {done * cfg.batch_size / 1e6:.2f}M"
                       f"  EV {line['explained_variance']:.4f}  L0 {line['l0']:.1f}"
                       f"  dead {line['dead_fraction']:.2%}  aux {line['aux_loss']:.3f}  lr {line['lr']:.2e}"
                       f"  {line['tokens_per_s']:,.0f} tok/s{held}", file=sys.stdout)
            emit(line, done)
            sums, n_sum, t_line = {}, 0, time.perf_counter()
    bar.close()
    elapsed += time.perf_counter() - t_session
    trainer.apply_threshold()
    sae.eval().requires_grad_(False)
    metrics = evaluate_on_store(sae, store, cfg.layer)
    metrics |= {"train_seconds": elapsed, "train_tokens": float(steps * cfg.batch_size),
                "dead_fraction_training": (trainer.since_fired > cfg.dead_tokens).float().mean().item()}
    if trainer.threshold is not None:
        metrics["threshold"] = trainer.threshold
    emit({f"final_{k}": v for k, v in metrics.items()}, steps)
    recipe = {"train": asdict(cfg), "store": {"folder": str(store.folder), "fingerprint": store.fingerprint,
                                              **store.identity}}
    out = save_sae(sae.cpu(), output / "sae", meta={"recipe": recipe, "metrics": metrics, **(meta or {})},
                   half=half)
    return sae, metrics, out


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
    steps = max(1, cfg.total_tokens // cfg.batch_size)
    objective = Objective("topk", cfg.k, cfg.aux_k or host.d_model // 2, cfg.aux_coef, cfg.dead_tokens)
    trainer = SAETrainer(sae, objective, steps, cfg.lr, cfg.warmup_steps, precision)
    t0 = time.time()
    bar = tqdm(range(steps), desc=f"train SAE L{cfg.layer} d_sae={cfg.d_sae} k={cfg.k}", disable=not show_progress_bar)
    x = first.to(dev)
    for step in bar:
        if step:
            with autocast(dev, precision):
                x = buffer.next_batch(cfg.batch_size).to(dev)
        s = trainer.step(x)
        if step % 20 == 0 or step == steps - 1:
            stats = {"train_fvu": s["fvu"], "train_aux_loss": s["aux_loss"], "train_dead_fraction": s["dead_fraction"],
                     "tokens": float((step + 1) * cfg.batch_size),
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
