"""EmbedConfig: everything that decides how documents become embeddings, typed and validated in one place.

The YAML `embed:` section is this dataclass's structured config (a wrong type or an unknown key fails at load
with the key's name); `SAEEmbedder`, `SAEIndex.build`, `make_representation`, the tasks and the CLI all take it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from saefeat.device import BACKENDS, PRECISIONS
from saefeat.embed.pooling import DENSE_POOLINGS, SPARSE_POOLINGS
from saefeat.errors import SaefeatError

# settings read at encode time only: they never change a document's cached statistics
ENCODE_TIME = ("pooling", "pool_k", "batch_size", "show_progress_bar")


LONG_DOCS = ("truncate", "mean")  # how `sentence` reads a document longer than its model's max_seq_length


@dataclass(frozen=True)
class EmbedConfig:
    """How documents are embedded.

    Attributes:
        model: host alias (`minilm`, `smollm2`), hub id, local folder or GGUF file.
        sae: `default` (the SAE shipped for the host), a folder in any supported layout, or None (no SAE: the
            dense side only).
        layer: block to read; None = where the SAE was trained (for no SAE: the last block).
        pooling: max, sqrt_max, mean, sum, count, binary, topk or log1p_topk (see `saefeat.embed.pooling.pool`);
            pool_k: latents kept per document by `topk` and `log1p_topk`.
        sae_k: the k of a TopK SAE at inference (None = its trained k).
        window: content tokens per forward pass; None = the SAE's training window, else the host's default.
        overlap: tokens shared between neighbouring windows.
        max_tokens: cap on tokens read per document (None reads everything).
        keep_special: pool special tokens (CLS/SEP/BOS) too.
        precision: auto | fp32 | bf16 | int8; backend: auto | torch | onnx (see `saefeat.device.resolve_runtime`).
        device: None = CUDA when present, else CPU.
        cache: keep per-document statistics on disk; cache_dir: where (None = $SAEFEAT_CACHE or ~/.cache/saefeat).
        batch_size: windows per forward pass; show_progress_bar: None = when logging is at INFO and it helps.
    """

    model: str = "minilm"
    sae: str | None = "default"
    layer: int | None = None
    pooling: str = "max"
    pool_k: int = 64
    sae_k: int | None = None
    window: int | None = None
    overlap: int = 32
    max_tokens: int | None = None
    keep_special: bool = False
    precision: str = "auto"
    backend: str = "auto"
    device: str | None = None
    cache: bool = True
    cache_dir: str | None = None
    batch_size: int = 32
    show_progress_bar: bool | None = None

    def __post_init__(self) -> None:
        _positive(self, "pool_k", "batch_size")
        _positive(self, "layer", "sae_k", "window", "max_tokens", optional=True, minimum_of={"layer": 0})
        if not isinstance(self.overlap, int) or isinstance(self.overlap, bool) or self.overlap < 0:
            raise SaefeatError(f"embed.overlap must be an integer >= 0, got {self.overlap!r}")
        if self.window is not None and self.overlap >= self.window:
            raise SaefeatError(f"embed.overlap={self.overlap} must be smaller than embed.window={self.window}")
        _one_of(self, "pooling", SPARSE_POOLINGS)
        _one_of(self, "precision", PRECISIONS)
        _one_of(self, "backend", BACKENDS)
        if not isinstance(self.model, str) or not self.model.strip():
            raise SaefeatError(f"embed.model must name a host model, got {self.model!r}")
        if self.sae is not None and (not isinstance(self.sae, str) or not self.sae.strip()):
            raise SaefeatError(f"embed.sae must be 'default', a folder or null, got {self.sae!r}")

    def replace(self, **changes: Any) -> EmbedConfig:
        """A copy with `changes` applied (validated again); unknown names are an error that lists the valid ones.

        `cache_dir=False` (the Python API's way to turn the cache off) means cache=False."""
        if changes.get("cache_dir") is False:
            changes = {**changes, "cache": False, "cache_dir": None}
        if changes.get("cache_dir") is not None:
            changes = {**changes, "cache_dir": str(changes["cache_dir"])}
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            valid = ", ".join(f.name for f in fields(self))
            raise SaefeatError(f"unknown embedding setting(s) {unknown}; valid: {valid}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reader_key(self) -> tuple:
        """The settings that change what is computed (not how it is pooled or batched): embedders share on it."""
        return tuple((k, v) for k, v in asdict(self).items() if k not in ENCODE_TIME)


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baselines beside `sae` (the YAML `baselines:` section).

    Attributes:
        dense_pooling: pooling of `dense` (the host's activations where the SAE reads them).
        sentence_model: the sentence-transformers model of `sentence`.
        tfidf_max_features: vocabulary of `tfidf` (uni- and bigrams, min_df=3); None keeps all.
        sentence_sae: the SAE of `sae_sentence` (trained on `sentence_model`'s sentence embeddings); "default" is
            the one shipped for that model.
        sentence_sae_pooling: how `sae_sentence` pools its chunks' codes (a sparse pooling, as for `sae`).
        sentence_long_docs: a document longer than the model's max_seq_length: `truncate` (what
            sentence-transformers' `encode` does: its first max_seq_length tokens) or `mean` (the mean embedding of
            its chunks of that length, for documents whose content is spread over thousands of tokens).
    """

    dense_pooling: str = "mean"
    sentence_model: str = "minilm"
    tfidf_max_features: int | None = 20_000
    sentence_sae: str = "default"
    sentence_sae_pooling: str = "max"
    sentence_long_docs: str = "truncate"

    def __post_init__(self) -> None:
        if self.sentence_long_docs not in LONG_DOCS:
            raise SaefeatError(f"baselines.sentence_long_docs must be one of {', '.join(LONG_DOCS)}; "
                               f"got {self.sentence_long_docs!r}")
        if self.dense_pooling not in DENSE_POOLINGS:
            raise SaefeatError(f"baselines.dense_pooling must be one of {', '.join(DENSE_POOLINGS)}; "
                               f"got {self.dense_pooling!r}")
        if self.sentence_sae_pooling not in SPARSE_POOLINGS:
            raise SaefeatError(f"baselines.sentence_sae_pooling must be one of {', '.join(SPARSE_POOLINGS)}; "
                               f"got {self.sentence_sae_pooling!r}")
        if self.tfidf_max_features is not None and (not isinstance(self.tfidf_max_features, int)
                                                    or self.tfidf_max_features < 1):
            raise SaefeatError(f"baselines.tfidf_max_features must be an integer >= 1 or null, "
                               f"got {self.tfidf_max_features!r}")


def _positive(cfg: EmbedConfig, *names: str, optional: bool = False, minimum_of: dict | None = None) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        low = (minimum_of or {}).get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            allowed = f"an integer >= {low}" + (" or null" if optional else "")
            raise SaefeatError(f"embed.{name} must be {allowed}, got {value!r}")


def _one_of(cfg: EmbedConfig, name: str, valid: tuple[str, ...]) -> None:
    if getattr(cfg, name) not in valid:
        raise SaefeatError(f"embed.{name} must be one of {', '.join(valid)}; got {getattr(cfg, name)!r}")
