"""The sparse autoencoder: ReLU, JumpReLU, TopK and BatchTopK architectures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saefeat.errors import SaefeatError
from saefeat.sae.topk import topk_relu

ARCHITECTURES = ("relu", "jumprelu", "topk", "batchtopk")
_CPU_CHUNK_ELEMENTS = 1 << 21  # pre-activations per CPU chunk: 4 MiB in bf16, within a core's L2 + shared L3


@dataclass
class SAEConfig:
    """What an SAE is and where it reads: shapes, activation, hook point, normalisation."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    apply_b_dec_to_input: bool = True
    input_scale: float = 1.0  # activations are multiplied by this before encoding (undone on decode)
    host: str | None = None
    layer: int | None = None
    hook_name: str | None = None
    site: str = "resid_post"  # where the SAE was trained (saefeat.sae.sites.SITES); read_point says where to read
    context_size: int | None = None  # training window in content tokens, when the file says it
    source_format: str = "saefeat"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SaefeatError(f"unknown SAE architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        if self.architecture in ("topk", "batchtopk") and not self.k:
            raise SaefeatError(f"a {self.architecture} SAE needs k")


class SAE(nn.Module):
    """Sparse autoencoder with `encode(x)` / `decode(z)` on tensors of any leading shape.

    Weights follow the SAELens convention: W_enc (d_in, d_sae), W_dec (d_sae, d_in).
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture in ("jumprelu", "batchtopk"):
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))
        self.content_hash: str = ""
        self._encoder_cast: tuple | None = None  # (key, W_enc, b_enc) in the autocast dtype

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def k(self) -> int | None:
        return self.cfg.k

    @property
    def is_topk(self) -> bool:
        """True when encoding is a per-token top-k (BatchTopK without a threshold counts)."""
        if self.cfg.architecture == "topk":
            return True
        return self.cfg.architecture == "batchtopk" and not bool((self.threshold > 0).any())

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.input_scale != 1.0:
            x = x * self.cfg.input_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        W, b = self._encoder_weights(x.device.type)
        return torch.addmm(b, x.reshape(-1, self.d_in), W).reshape(*x.shape[:-1], self.d_sae)

    def _encoder_weights(self, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """W_enc and b_enc as the encoder's matmul reads them. Under autocast, frozen weights are cast here once:
        autocast caches the casts of trainable weights only, so it would cast W_enc again on every call."""
        if self.W_enc.requires_grad or not torch.is_autocast_enabled(device_type):
            return self.W_enc, self.b_enc
        dtype = torch.get_autocast_dtype(device_type)
        key = (dtype, self.W_enc.data_ptr(), self.W_enc._version, self.b_enc.data_ptr(), self.b_enc._version)
        if self._encoder_cast is None or self._encoder_cast[0] != key:
            self._encoder_cast = (key, self.W_enc.to(dtype), self.b_enc.to(dtype))
        return self._encoder_cast[1], self._encoder_cast[2]

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise SaefeatError(f"SAE expects inputs of width d_in={self.d_in}, got {x.shape[-1]}")

    def encode_topk(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse encoding of a top-k SAE: (values, indices), each (..., k)."""
        self._check(x)
        # top-k before ReLU: the same code, without a ReLU pass over all d_sae pre-activations
        vals, idx = self.pre_acts(x).topk(k or self.k, dim=-1, sorted=False)
        return F.relu(vals), idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations (..., d_sae)."""
        self._check(x)
        arch = self.cfg.architecture
        if self.is_topk:
            vals, idx = self.encode_topk(x)
            return torch.zeros(*x.shape[:-1], self.d_sae, dtype=vals.dtype, device=vals.device).scatter_(
                -1, idx, vals
            )
        pre = self.pre_acts(x)
        if arch == "relu":
            return F.relu(pre)
        # JumpReLU, and BatchTopK at inference (a learned global threshold, as SAELens does)
        return F.relu(pre) * (pre > self.threshold)

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zero activations of 2-D inputs as COO triples (row, latent, value), kept on x's device."""
        if self.is_topk:
            return topk_rows_to_coo(*self.encode_topk_rows(x))
        parts = []
        for first, chunk in self._row_chunks(x):
            z = self.encode(chunk)
            rows, cols = z.nonzero(as_tuple=True)
            parts.append((rows + first, cols, z[rows, cols]))
        return _cat_rows(parts)

    def encode_topk_rows(self, x: torch.Tensor, pre_acts: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference codes of a top-k SAE for 2-D inputs: (values, latent ids), each (rows, k), ReLU'd.

        The latents and values of `encode_topk`, through the compiled CPU kernel where it applies (no autograd).
        `pre_acts` replaces the encoder's matmul (the int8 step of `saefeat.onnx_sae`); the selection is the same.
        """
        self._check(x)
        pre_acts = pre_acts or self.pre_acts
        return _cat_rows([topk_relu(pre_acts(chunk), self.k) for _, chunk in self._row_chunks(x)])

    def _row_chunks(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(first row, rows) pieces of x: on CPU, small enough that each chunk's (rows x d_sae) pre-activations
        stay in cache between the matmul and the selection that reads them (about 25% faster than whole)."""
        step = x.shape[0] if x.device.type != "cpu" else max(1, _CPU_CHUNK_ELEMENTS // self.d_sae)
        return [(i, x[i:i + step]) for i in range(0, max(1, x.shape[0]), step)]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the host's activation space (..., d_in)."""
        return (z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.cfg.input_scale

    def decode_topk(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Decode a sparse (values, indices) code without building the dense (.., d_sae) tensor."""
        lead = vals.shape[:-1]
        flat = F.embedding_bag(idx.reshape(-1, idx.shape[-1]), self.W_dec, per_sample_weights=vals.reshape(
            -1, vals.shape[-1]).to(self.W_dec.dtype), mode="sum")
        return ((flat + self.b_dec) / self.cfg.input_scale).reshape(*lead, self.d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_topk:
            return self.decode_topk(*self.encode_topk(x))
        return self.decode(self.encode(x))

    def describe(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k else ""
        return f"{c.architecture} SAE {c.d_in}->{c.d_sae}{k} ({c.source_format}; host={c.host}, layer={c.layer})"


def random_like(sae: SAE, seed: int = 0) -> SAE:
    """An untrained TopK SAE of `sae`'s shape, k and read point (Gaussian encoder and decoder, zero biases): the
    control a trained SAE's probe results should beat, since a wide sparse random code is itself a strong
    feature map."""
    cfg = SAEConfig(d_in=sae.d_in, d_sae=sae.d_sae, architecture="topk", k=sae.k or 32, host=sae.cfg.host,
                    layer=sae.cfg.layer, hook_name=sae.cfg.hook_name, site=sae.cfg.site,
                    context_size=sae.cfg.context_size)
    out = SAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out.W_enc.copy_(torch.randn(cfg.d_in, cfg.d_sae, generator=gen) * cfg.d_in ** -0.5)
        out.W_dec.copy_(torch.randn(cfg.d_sae, cfg.d_in, generator=gen) * cfg.d_sae ** -0.5)
    return out


def topk_rows_to_coo(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, k) top-k codes as COO triples (row, latent, value) of their non-zero entries."""
    rows = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
    keep = vals > 0
    return rows[keep], idx[keep], vals[keep]


def _cat_rows(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The per-chunk tuples of tensors joined along rows, field by field."""
    return parts[0] if len(parts) == 1 else tuple(torch.cat(t) for t in zip(*parts))
