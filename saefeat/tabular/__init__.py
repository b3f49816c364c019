"""Synthetic tabular rows conditioned on SAE concepts: serialise rows, find concepts, synthesize, evaluate."""

from saefeat.tabular.concepts import ClusterConcepts, Concept, label_concepts, latent_concept, resolve_latents
from saefeat.tabular.schema import TableSchema, prepare_table
from saefeat.tabular.serialize import RowSerializer
from saefeat.tabular.synth import ConditionalSynthesizer

__all__ = ["ClusterConcepts", "Concept", "ConditionalSynthesizer", "RowSerializer", "TableSchema",
           "label_concepts", "latent_concept", "prepare_table", "resolve_latents"]
