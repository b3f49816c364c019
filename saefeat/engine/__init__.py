"""Embedding corpora at scale: one worker (`StatsWorker`), local and Ray backends, resumable Parquet shard folders."""

from saefeat.engine.backends import RayOptions
from saefeat.engine.corpus import BACKENDS, EmbeddingRun, embed_corpus
from saefeat.engine.shards import read_embeddings, read_stats
from saefeat.engine.worker import StatsWorker

__all__ = ["BACKENDS", "EmbeddingRun", "RayOptions", "StatsWorker", "embed_corpus", "read_embeddings", "read_stats"]
