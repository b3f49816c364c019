"""Steering a causal LM: a forward hook on one block that edits the residual stream during generation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from saefeat.errors import SaefeatError
from saefeat.hosts import HostModel
from saefeat.sae.formats import check_compatible
from saefeat.sae.model import SAE


class Intervention(Protocol):
    """Maps the residual stream after a block, (..., d_model), to the change to add to it."""

    layer: int | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class SAELatentClamp:
    """Clamp SAE latents and add decode(clamped) - decode(original) to the residual stream.

    Adding the difference of the two reconstructions (rather than replacing the residual with the SAE's
    reconstruction) leaves the SAE's reconstruction error out of the model: only the clamped latents move.

    Args:
        sae: the SAE of the hooked layer.
        latents: indices of the latents to clamp.
        value: what each latent is clamped to, at every position (a scalar or one value per latent);
            0 ablates the latents where they fire, a negative value also pushes against their directions.
        strength: interpolates between no change (0) and the full clamp (1): z' = z + strength * (value - z).
        where: ``"all"`` clamps at every position; ``"active"`` only where the latent fires (conditional
            clamping: positions without toxic content are left exactly as they were).
    """

    def __init__(self, sae: SAE, latents: Sequence[int], value: float | Sequence[float] = 0.0,
                 strength: float = 1.0, where: str = "all"):
        if where not in ("all", "active"):
            raise SaefeatError(f"where must be 'all' or 'active', got {where!r}")
        latents = [int(i) for i in latents]
        if not latents:
            raise SaefeatError("no latents to clamp")
        bad = [i for i in latents if not 0 <= i < sae.d_sae]
        if bad:
            raise SaefeatError(f"latent {bad[0]} is out of range for an SAE with {sae.d_sae} latents")
        values = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
        if values.numel() not in (1, len(latents)):
            raise SaefeatError(f"give one clamp value or one per latent ({len(latents)}), got {values.numel()}")
        self.sae, self.latents, self.strength, self.where = sae, latents, float(strength), where
        self.values = values.expand(len(latents)).clone()
        self.layer = sae.cfg.layer
        self._idx = torch.tensor(latents)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx = self._idx.to(x.device)
        z = self.sae.encode(x)[..., idx]
        clamped = z + self.strength * (self.values.to(z) - z)
        if self.where == "active":
            clamped = torch.where(z > 0, clamped, z)
        # decode(z') - decode(z): the bias cancels, only the clamped latents' decoder rows remain
        return ((clamped - z) @ self.sae.W_dec[idx] / self.sae.cfg.input_scale).to(x.dtype)

    def check(self, host: HostModel, layer: int) -> None:
        check_compatible(self.sae, host.name, host.d_model, layer)


class VectorSteering:
    """Add `alpha * vector` to the residual stream after block `layer` at every position."""

    def __init__(self, vector: torch.Tensor, layer: int, alpha: float = 1.0):
        self.vector = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        self.layer, self.alpha = int(layer), float(alpha)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.alpha * self.vector.to(x)).expand_as(x)

    def check(self, host: HostModel, layer: int) -> None:
        if self.vector.numel() != host.d_model:
            raise SaefeatError(f"the steering vector has {self.vector.numel()} dimensions but host {host.name!r} "
                             f"has d_model={host.d_model}")


@contextlib.contextmanager
def steer(host: HostModel, intervention: Intervention | None, layer: int | None = None) -> Iterator[None]:
    """Apply `intervention` to the residual stream after block `layer` of `host` inside the `with` block.

    Every forward pass of `host.model` (a prompt pass or one decoding step) is edited; positions holding
    special tokens (BOS, padding) are left alone, as the SAE never saw them. The hooks are removed on exit,
    also when generation raises. `intervention=None` is a no-op (the unsteered model).
    """
    if intervention is None:
        yield
        return
    layer = getattr(intervention, "layer", None) if layer is None else int(layer)
    if layer is None:
        raise SaefeatError("the intervention does not record its layer; pass layer=")
    host.check_layer(layer)
    if hasattr(intervention, "check"):
        intervention.check(host, layer)
    with host.hook(layer, add=intervention):
        yield


def active_hooks(host: HostModel, layer: int) -> int:
    """Number of forward hooks on block `layer` and on the model (0 when nothing is steering it)."""
    return len(host.blocks[layer]._forward_hooks) + len(host.model._forward_pre_hooks) \
        + len(host.model._forward_hooks)
