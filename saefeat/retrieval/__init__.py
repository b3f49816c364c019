"""Retrieval over SAE embeddings: an inverted index of latents, ordinary, dense and hybrid search, and
property-based retrieval from example texts."""

from saefeat.retrieval.index import Hit, SAEIndex
from saefeat.retrieval.properties import Property, select_latents
from saefeat.retrieval.store import CorruptIndexError, IndexMismatchError, SAEIndexError

__all__ = ["SAEIndex", "Hit", "Property", "select_latents", "SAEIndexError", "CorruptIndexError",
           "IndexMismatchError"]
