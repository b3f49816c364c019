"""An on-disk activation store: a host's residual stream over a training mixture, written once, read many times.

One forward pass of the host fills several layers at once. Every SAE variant and every epoch then reads the same
fp16 activations from disk, instead of running the host again. Layout of a store folder:

    manifest.json          the settings (host fingerprint, layers, window, sources, seed), token counts and
                           every finished shard with the SHA-256 of each of its files
    eval/                  the held-out slice: windows of held-out documents only
    shard_00000/           1. training shard: `L<layer>.npy` (tokens, d_model) float16 per layer (content tokens
                           only, in window order), `ids.npy` int32 token ids, `lengths.npy` int32 tokens per window

Each file is written atomically and flushed to disk, and a shard counts only once the manifest lists it. An
interrupted write therefore keeps every finished shard and redoes at most the one in progress. The window stream
is deterministic (seeded), so a resumed write checks that each kept shard holds the windows it would write again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saefeat.atomic import atomic_write
from saefeat.device import autocast
from saefeat.errors import MissingFileError, SaefeatError
from saefeat.hashing import file_sha256
from saefeat.hosts import HostModel
from saefeat.sae.activations import CorpusSource, sample_windows

STORE_FORMAT = "saefeat-activation-store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
EVAL = "eval"


class StoreError(SaefeatError):
    """A store folder that is missing, incomplete, damaged, or was written with other settings."""


@dataclass
class StoreConfig:
    """What a store holds: which layers, which windows of which corpus, and how many tokens."""

    layers: list[int]
    seq_len: int = 256  # content tokens per window
    train_tokens: int = 10_000_000  # written until at least this many (whole shards)
    eval_tokens: int = 131_072  # held-out slice
    shard_windows: int = 1024  # windows per shard (~260k tokens at seq_len 256)
    batch_windows: int = 32  # windows per host forward
    held_out_every: int = 20  # document split shared with `sample_windows`
    precision: str = "bf16"  # host forward precision (saefeat.device)
    seed: int = 0
    sources: list[CorpusSource] = field(default_factory=list)


def store_identity(host: HostModel, cfg: StoreConfig) -> dict[str, Any]:
    """The settings that decide a store's content (its token budget aside: a store can be extended)."""
    sources = [{"name": Path(s.path).name, "bytes": Path(s.path).stat().st_size, "text_field": s.text_field,
                "share": float(s.share)} for s in cfg.sources]
    return {"host": host.name, "host_fingerprint": host.fingerprint, "d_model": host.d_model,
            "layers": sorted(set(cfg.layers)), "seq_len": cfg.seq_len, "eval_tokens": cfg.eval_tokens,
            "shard_windows": cfg.shard_windows, "batch_windows": cfg.batch_windows,
            "held_out_every": cfg.held_out_every, "precision": cfg.precision, "seed": cfg.seed,
            "dtype": "float16", "sources": sources}


class _Stop(Exception):
    """Ends the host's forward pass after the deepest captured block."""


@torch.no_grad()
def capture_layers(host: HostModel, windows: list[list[int]], layers: Sequence[int],
                   precision: str = "auto") -> dict[int, torch.Tensor]:
    """Residuals (n_content_tokens, d) after each of `layers`, from one forward pass over a batch of windows.

    The forward stops after the deepest layer; each layer's values are those `host.residual` gives for it.
    """
    wrapped = [host.wrap(w) for w in windows]
    ids, att = host.pad_batch([w for w, _ in wrapped])
    content = torch.zeros_like(att, dtype=torch.bool)
    for i, (_, mask) in enumerate(wrapped):
        content[i, : len(mask)] = torch.tensor(mask, device=content.device)
    layers = sorted(set(layers))
    out: dict[int, torch.Tensor] = {}

    def hook_for(layer: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            out[layer] = hidden.float()[content]
            if layer == layers[-1]:
                raise _Stop

        return hook

    handles = [host.blocks[layer].register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        with autocast(host.device, precision):
            host.model(input_ids=ids, attention_mask=att)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Write `arr` to `path` atomically and durably; return the SHA-256 of the file."""
    digest: list[str] = []

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
        digest.append(file_sha256(tmp))

    atomic_write(path, write, durable=True)
    return digest[0]


def _window_hash(windows: list[list[int]]) -> str:
    h = hashlib.sha256()
    for w in windows:
        h.update(np.asarray([len(w), *w], dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def _shard_intact(folder: Path, rec: dict[str, Any] | None, d_model: int) -> bool:
    """Cheap check that a listed shard's files are all there with the shapes the manifest gives."""
    if not rec:
        return False
    try:
        for name in rec["files"]:
            arr = np.load(folder / name, mmap_mode="r")
            want = (rec["windows"],) if name == "lengths.npy" else (rec["tokens"],)
            if name.startswith("L"):
                want = (rec["tokens"], d_model)
            if arr.shape != want:
                return False
    except (OSError, ValueError):
        return False
    return True


def _write_shard(host: HostModel, cfg: StoreConfig, folder: Path, windows: list[list[int]], bar: tqdm) -> dict:
    layers = sorted(set(cfg.layers))
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for i in range(0, len(windows), cfg.batch_windows):
        acts = capture_layers(host, windows[i:i + cfg.batch_windows], layers, cfg.precision)
        for layer, a in acts.items():
            parts[layer].append(a.to(torch.float16).cpu().numpy())
        bar.update(len(acts[layers[0]]))
    lengths = np.asarray([len(w) for w in windows], dtype=np.int32)
    arrays = {f"L{layer}.npy": np.concatenate(parts.pop(layer)) for layer in layers}
    arrays["ids.npy"] = np.concatenate([np.asarray(w, dtype=np.int32) for w in windows])
    arrays["lengths.npy"] = lengths
    files = {name: _save_npy(folder / name, arr) for name, arr in arrays.items()}
    return {"name": folder.name, "windows": len(windows), "tokens": int(lengths.sum()),
            "window_hash": _window_hash(windows), "files": files}


def _take_tokens(windows: Iterator[list[int]], n_tokens: int) -> list[list[int]]:
    out, total = [], 0
    while total < n_tokens:
        w = next(windows)
        out.append(w)
        total += len(w)
    return out


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("format") != STORE_FORMAT:
        raise StoreError(f"{path} is not an activation-store manifest")
    return doc


def _changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def write_store(host: HostModel, cfg: StoreConfig, folder: str | Path, overwrite: bool = False,
                show_progress_bar: bool = True) -> ActivationStore:
    """Write (or finish, or extend) the store at `folder`; return it opened for reading.

    Rerunning with the same settings resumes after the last finished shard; a larger `train_tokens` appends
    shards. Other settings raise a StoreError unless `overwrite`, which deletes the old store first.
    """
    folder = Path(folder)
    for s in cfg.sources:
        if not Path(s.path).is_file():
            raise MissingFileError(f"store corpus not found: {s.path}")
    for layer in cfg.layers:
        host.check_layer(layer)
    identity = store_identity(host, cfg)
    manifest = _read_manifest(folder)
    if manifest is not None and manifest["identity"] != identity:
        if not overwrite:
            raise StoreError(f"the store at {folder} was written with other settings "
                             f"({', '.join(_changed_keys(manifest['identity'], identity))}); pass overwrite=True "
                             "or choose another folder")
        manifest = None
        for p in [folder / MANIFEST, folder / EVAL, *folder.glob("shard_*")]:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if manifest is not None and manifest["complete"] and manifest["train_tokens"] >= cfg.train_tokens and all(
            _shard_intact(folder / rec["name"], rec, host.d_model) for rec in [manifest["eval"], *manifest["shards"]]):
        return ActivationStore(folder)  # finished earlier (`ActivationStore.verify` checks every byte)
    if manifest is None:
        manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "identity": identity, "eval": None,
                    "shards": [], "train_tokens": 0, "complete": False,
                    "written": {"tokens": 0, "seconds": 0.0}}
    manifest["target_train_tokens"] = cfg.train_tokens
    manifest["complete"] = False
    manifest["sources"] = [asdict(s) for s in cfg.sources]
    manifest["runtime"] = {"torch": torch.__version__, "device": str(host.device), "threads": torch.get_num_threads()}
    done = {rec["name"]: rec for rec in manifest["shards"]}

    def save() -> None:
        manifest["shards"] = [done[k] for k in sorted(done)]
        manifest["train_tokens"] = sum(rec["tokens"] for rec in manifest["shards"])
        atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)), durable=True)

    save()
    written, t0 = 0, time.perf_counter()
    total = cfg.eval_tokens + max(cfg.train_tokens, manifest["train_tokens"])
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"store {host.name} L{identity['layers']}",
               disable=not show_progress_bar, smoothing=0.05)

    def account(rec: dict[str, Any], fresh: bool) -> None:
        nonlocal written
        if fresh:
            written += rec["tokens"]
            manifest["written"]["tokens"] += rec["tokens"]
            manifest["written"]["seconds"] += time.perf_counter() - t_shard
        else:
            bar.update(rec["tokens"])
        rate = written / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} tok/s written")

    t_shard = time.perf_counter()
    if not _shard_intact(folder / EVAL, manifest["eval"], host.d_model):
        windows = _take_tokens(sample_windows(host, cfg.sources, cfg.seq_len, cfg.seed, held_out=True,
                                              held_out_every=cfg.held_out_every), cfg.eval_tokens)
        manifest["eval"] = _write_shard(host, cfg, folder / EVAL, windows, bar)
        account(manifest["eval"], True)
        save()
    else:
        account(manifest["eval"], False)
    stream = sample_windows(host, cfg.sources, cfg.seq_len, cfg.seed, held_out=False,
                            held_out_every=cfg.held_out_every)
    tokens, i = 0, 0
    while tokens < cfg.train_tokens or f"shard_{i:05d}" in done:
        name = f"shard_{i:05d}"
        windows = list(islice(stream, cfg.shard_windows))
        rec = done.get(name)
        t_shard = time.perf_counter()
        if rec and rec["window_hash"] == _window_hash(windows) and _shard_intact(folder / name, rec, host.d_model):
            account(rec, False)
        else:
            rec = done[name] = _write_shard(host, cfg, folder / name, windows, bar)
            account(rec, True)
            save()
        tokens += rec["tokens"]
        i += 1
    bar.close()
    manifest["complete"] = True
    manifest["last_write"] = {"tokens": written, "seconds": time.perf_counter() - t0}
    save()
    return ActivationStore(folder)


class ActivationStore:
    """A finished store opened for reading (arrays are memory-mapped)."""

    def __init__(self, folder: str | Path, allow_incomplete: bool = False):
        self.folder = Path(folder)
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise StoreError(f"no activation store at {self.folder} (no {MANIFEST})")
        if not manifest["complete"] and not allow_incomplete:
            raise StoreError(f"the store at {self.folder} is incomplete; rerun its write to finish it")
        self.manifest = manifest
        self.identity: dict[str, Any] = manifest["identity"]
        self.shards: list[dict[str, Any]] = manifest["shards"]

    @property
    def layers(self) -> list[int]:
        return list(self.identity["layers"])

    @property
    def d_model(self) -> int:
        return int(self.identity["d_model"])

    @property
    def seq_len(self) -> int:
        return int(self.identity["seq_len"])

    @property
    def train_tokens(self) -> int:
        return sum(rec["tokens"] for rec in self.shards)

    @property
    def fingerprint(self) -> str:
        """Hash of the settings and of every file's checksum: equal fingerprints mean equal content."""
        files = [self.manifest["eval"]["files"]] + [rec["files"] for rec in self.shards]
        doc = json.dumps({"identity": self.identity, "files": files}, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise StoreError(f"the store at {self.folder} holds layers {self.layers}, not {layer}")

    def shard(self, index: int, layer: int) -> np.ndarray:
        """Activations (tokens, d_model) float16 of one training shard, memory-mapped."""
        self._check_layer(layer)
        return np.load(self.folder / self.shards[index]["name"] / f"L{layer}.npy", mmap_mode="r")

    def eval_activations(self, layer: int, max_tokens: int | None = None) -> np.ndarray:
        """The held-out slice (tokens, d_model) float16, memory-mapped; its first `max_tokens` when given."""
        self._check_layer(layer)
        arr = np.load(self.folder / EVAL / f"L{layer}.npy", mmap_mode="r")
        return arr if max_tokens is None else arr[:max_tokens]

    def windows(self, index: int | None = None) -> list[list[int]]:
        """The token windows of a training shard (`index`) or of the held-out slice (None)."""
        folder = self.folder / (EVAL if index is None else self.shards[index]["name"])
        ids, lengths = np.load(folder / "ids.npy"), np.load(folder / "lengths.npy")
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        return [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]

    def verify(self) -> list[str]:
        """Files whose SHA-256 differs from the manifest's (reads the whole store); empty when all are intact."""
        bad = []
        for rec in [self.manifest["eval"], *self.shards]:
            for name, digest in rec["files"].items():
                path = self.folder / rec["name"] / name
                if not path.is_file() or file_sha256(path) != digest:
                    bad.append(str(path))
        return bad

    def _epoch_groups(self, epoch: int, seed: int, group_shards: int) -> list[np.ndarray]:
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
        return [order[i:i + group_shards] for i in range(0, len(order), group_shards)]

    def batches(self, layer: int, batch_size: int, seed: int = 0, start: int = 0,
                group_shards: int = 4) -> Iterator[np.ndarray]:
        """Endless shuffled batches (batch_size, d_model) float16 of one layer's training tokens.

        Each epoch visits every token once: the shards in a seeded random order, `group_shards` at a time loaded
        together and their tokens shuffled. Batch `b` is tokens b*B..(b+1)*B of that stream (batches run across
        epoch ends), so `start=b` resumes exactly where batch b-1 ended.
        """
        self._check_layer(layer)
        sizes = [rec["tokens"] for rec in self.shards]
        epoch, offset = divmod(start * batch_size, self.train_tokens)
        pending: list[np.ndarray] = []
        have = 0
        while True:
            for gi, group in enumerate(self._epoch_groups(epoch, seed, group_shards)):
                size = sum(sizes[i] for i in group)
                if offset >= size:
                    offset -= size
                    continue
                data = np.concatenate([self.shard(int(i), layer) for i in group])
                data = data[np.random.default_rng([seed, epoch, gi]).permutation(size)[offset:]]
                offset = 0
                while len(data):
                    take = min(batch_size - have, len(data))
                    pending.append(data[:take])
                    have, data = have + take, data[take:]
                    if have == batch_size:
                        yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                        pending, have = [], 0
            epoch += 1


def store_config(doc: dict[str, Any]) -> StoreConfig:
    """A StoreConfig from a recipe's `store` section (plain dict; `sources` as mappings)."""
    doc = dict(doc)
    doc["sources"] = [CorpusSource(**dict(s)) for s in doc.get("sources", [])]
    doc["layers"] = [int(x) for x in doc["layers"]]
    known = set(StoreConfig.__dataclass_fields__)
    unknown = sorted(set(doc) - known)
    if unknown:
        raise StoreError(f"unknown store settings {unknown}; valid: {sorted(known)}")
    return StoreConfig(**doc)


__all__ = ["ActivationStore", "StoreConfig", "StoreError", "capture_layers", "store_config", "store_identity",
           "write_store"]
