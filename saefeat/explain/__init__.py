"""Latent explanations: cards per latent (contexts, density, labels), terminal views and MLflow reports."""

from saefeat.explain.cards import Context, LatentCard
from saefeat.explain.report import log_latent_report
from saefeat.explain.store import LatentStore

__all__ = ["Context", "LatentCard", "LatentStore", "log_latent_report"]
