"""Content-addressed on-disk cache of per-document token statistics.

Layout: <root>/<settings hash>/settings.json and shard-*.npz files. The settings hash covers the
host model, layer, SAE hash, windowing and precision, and for kinds listed in `STATS_VERSIONS` the version
of the statistics a shard holds; a document is found by the hash of its text.
Each shard is written atomically (temporary file, then rename) as soon as its documents are done,
so an interrupted encode keeps every finished shard and the next call resumes after them. A shard carries a
checksum of its arrays; one that fails to read or to verify is logged, deleted and its documents recomputed, and
rows with NaN values, or with no activity where the document had tokens, are never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from saefeat.atomic import atomic_write
from saefeat.embed.pooling import TokenStats

_FIELDS = ("sum", "max", "count", "log1p_sum")

# Version of the statistics a shard of a kind holds, hashed into that kind's key, so shards written before a
# statistic was added sit under another key and are never read as if they held it. Bump on every change.
# sae: 1 = n_tokens, sum, max, count (no version in the key); 2 = + log1p_sum.
STATS_VERSIONS = {"sae": 2}
CHECKSUM = "checksum"
logger = logging.getLogger(__name__)


def doc_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAEFEAT_CACHE", Path.home() / ".cache" / "saefeat"))


class StatsCache:
    """Token statistics keyed by document hash, for one combination of settings.

    At most `max_loaded` shards stay in memory (least recently used go first), so memory does not grow with the
    corpus a long-lived process embeds.
    """

    def __init__(self, root: str | Path, settings: dict[str, Any], max_loaded: int = 64):
        version = STATS_VERSIONS.get(settings.get("kind"))
        if version is not None:
            settings = {**settings, "stats_version": version}
        self.dir = Path(root) / settings_hash(settings)
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "settings.json"
        if not meta.exists():
            atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2, default=str)))
        self._index: dict[str, tuple[Path, int]] = {}
        self._loaded: OrderedDict[Path, TokenStats] = OrderedDict()
        self.max_loaded = max(1, int(max_loaded))
        for shard in sorted(self.dir.glob("shard-*.npz")):
            try:
                with np.load(shard, allow_pickle=False) as z:
                    hashes = z["hashes"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                logger.warning("cache shard %s is unreadable (%s); deleting it, its documents are recomputed",
                               shard, e)
                shard.unlink(missing_ok=True)
                continue
            for row, h in enumerate(hashes.tolist()):
                self._index[h] = (shard, row)

    def __contains__(self, h: str) -> bool:
        return h in self._index

    def __len__(self) -> int:
        return len(self._index)

    def verify(self, hashes: list[str]) -> None:
        """Load the shards holding `hashes`; a shard that fails to read or to verify is deleted and forgotten, so
        its documents are no longer `in` the cache and get recomputed."""
        for h in hashes:
            if h not in self._index:
                continue
            shard = self._index[h][0]
            if shard in self._loaded:
                continue
            try:
                self._keep(shard, _read_shard(shard))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
                logger.warning("cache shard %s is unusable (%s); deleting it, its documents are recomputed", shard, e)
                shard.unlink(missing_ok=True)
                self._index = {k: v for k, v in self._index.items() if v[0] != shard}

    def get(self, hashes: list[str]) -> TokenStats:
        """Statistics of cached documents, in the order of `hashes`."""
        shards: dict[Path, TokenStats] = {}
        order: dict[Path, int] = {}
        refs = []
        for h in hashes:
            shard, row = self._index[h]
            if shard not in shards:
                held = self._loaded.get(shard)
                shards[shard] = held if held is not None else self._keep(shard, _read_shard(shard))
                self._loaded.move_to_end(shard)
            refs.append((order.setdefault(shard, len(order)), row))
        return TokenStats.gather(list(shards.values()), refs)

    def _keep(self, shard: Path, stats: TokenStats) -> TokenStats:
        self._loaded[shard] = stats
        while len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)
        return stats

    def put(self, hashes: list[str], stats: TokenStats) -> None:
        """Write one shard atomically and index it; rows with NaN, or with no activity where the document had
        tokens, are left out (they are recomputed next time, never served)."""
        keep = _trustworthy(stats)
        if not keep.all():
            logger.warning("%d of %d documents gave NaN or empty statistics; they are not cached",
                           int((~keep).sum()), len(keep))
            if not keep.any():
                return
            rows = np.flatnonzero(keep)
            stats = TokenStats.gather([stats], [(0, int(r)) for r in rows])
            hashes = [hashes[int(r)] for r in rows]
        shard = self.dir / f"shard-{uuid.uuid4().hex[:12]}.npz"
        arrays: dict[str, np.ndarray] = {"hashes": np.array(hashes), "n_tokens": stats.n_tokens}
        for name in _FIELDS:
            m = getattr(stats, name)
            if m is None:
                continue
            if sp.issparse(m):
                m = m.tocsr()
                arrays |= {f"{name}.data": m.data, f"{name}.indices": m.indices, f"{name}.indptr": m.indptr,
                           f"{name}.shape": np.array(m.shape)}
            else:
                arrays[name] = m
        arrays[CHECKSUM] = np.array(_checksum(arrays))
        atomic_write(shard, lambda tmp: np.savez(tmp, **arrays))
        self._keep(shard, stats)
        for row, h in enumerate(hashes):
            self._index[h] = (shard, row)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        if name != CHECKSUM:
            a = np.ascontiguousarray(arrays[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _trustworthy(stats: TokenStats) -> np.ndarray:
    """Per document: no NaN in its sums, and some activity where it had tokens."""
    s = stats.sum
    if sp.issparse(s):
        s = s.tocsr()
        nan = np.zeros(s.shape[0], bool)
        bad_rows = np.repeat(np.arange(s.shape[0]), np.diff(s.indptr))[np.isnan(s.data)]
        nan[bad_rows] = True
        active = np.diff(s.indptr) > 0
    else:
        nan = np.isnan(s).any(axis=1)
        active = (s != 0).any(axis=1)
    return ~nan & (active | (np.asarray(stats.n_tokens) == 0))


def _read_shard(path: Path) -> TokenStats:
    """A shard's statistics; raises ValueError when its arrays do not match their checksum."""
    with np.load(path, allow_pickle=False) as npz:
        z = {name: npz[name] for name in npz.files}
    if CHECKSUM not in z:
        raise ValueError("no checksum (an older saefeat wrote it), so it cannot be verified")
    if str(z[CHECKSUM]) != _checksum(z):
        raise ValueError("checksum mismatch")
    fields: dict[str, Any] = {}
    for name in _FIELDS:
        if f"{name}.data" in z:
            fields[name] = sp.csr_matrix((z[f"{name}.data"], z[f"{name}.indices"], z[f"{name}.indptr"]),
                                         shape=tuple(z[f"{name}.shape"]))
        elif name in z:
            fields[name] = z[name]
    return TokenStats(z["n_tokens"], fields["sum"], fields["max"], fields.get("count"), fields.get("log1p_sum"))
