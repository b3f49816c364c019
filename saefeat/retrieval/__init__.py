"""Retrieval over SAE embeddings: an inverted index of latents, ordinary, dense and hybrid search,
property-based retrieval from example texts, and every retriever behind one `Retriever` interface."""

from saefeat.retrieval.index import Hit, SAEIndex
from saefeat.retrieval.properties import Property, select_latents
from saefeat.retrieval.retrievers import IndexRetriever, Retriever, make_retriever
from saefeat.retrieval.store import CorruptIndexError, IndexMismatchError, SAEIndexError

__all__ = ["SAEIndex", "Hit", "Property", "select_latents", "SAEIndexError", "CorruptIndexError",
           "IndexMismatchError", "Retriever", "IndexRetriever", "make_retriever"]
