"""Sparse autoencoders: the model, the published file layouts, the shipped defaults and the trainer."""

from saefeat.sae.formats import load_sae, save_sae
from saefeat.sae.model import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig", "load_sae", "save_sae"]
