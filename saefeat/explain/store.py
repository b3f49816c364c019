"""The on-disk store of latent cards: one SQLite file per SAE, keyed by the SAE's content hash.

Layout: `<store_dir>/<sae hash>.sqlite` with tables
  meta(key, value)            JSON values: settings fingerprint, progress (docs_done), complete, ...
  docs(doc, source, text)     the reference corpus, so every listed context can be re-encoded
  latents(latent, ...)        firing counts, activation sum and max, labels, logit-lens tokens
  contexts(rid, latent, kind, ...) top contexts (kind "top") and a random sample of firings (kind "sample");
                              window activations as float32 and token ids as int32 blobs
Each chunk of the build is committed in one transaction (contexts that left the kept set deleted, new ones
inserted), so an interrupted build resumes after the last finished chunk and a reader never sees half a chunk.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saefeat.embed.cache import default_cache_dir
from saefeat.errors import SaefeatError
from saefeat.explain.cards import Context, LatentCard, best_label

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (doc INTEGER PRIMARY KEY, source TEXT, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS latents (
    latent INTEGER PRIMARY KEY, n_fire INTEGER NOT NULL, sum_act REAL NOT NULL, max_act REAL NOT NULL,
    label TEXT, label_tokens TEXT, llm_label TEXT, llm_score REAL, promotes TEXT, suppresses TEXT);
CREATE TABLE IF NOT EXISTS contexts (
    rid INTEGER PRIMARY KEY, latent INTEGER NOT NULL, kind TEXT NOT NULL, doc INTEGER NOT NULL,
    pos INTEGER NOT NULL, act REAL NOT NULL, token_id INTEGER NOT NULL, peak INTEGER NOT NULL, key REAL,
    tokens TEXT NOT NULL, acts BLOB NOT NULL, ids BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS contexts_latent ON contexts (latent);
"""

STATE_COLUMNS = ("rid", "latent", "kind", "doc", "pos", "act", "token_id", "peak", "key")
CONTEXT_COLUMNS = (*STATE_COLUMNS, "tokens", "acts", "ids")


def store_dir(path: str | Path | None = None) -> Path:
    """The folder of latent stores: `path`, else `$SAEFEAT_LATENTS`, else `<cache dir>/latents`."""
    if path:
        return Path(path)
    env = os.environ.get("SAEFEAT_LATENTS")
    return Path(env) if env else default_cache_dir() / "latents"


class LatentStore:
    """Read and write the latent cards of one SAE."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._con: sqlite3.Connection | None = None

    @classmethod
    def for_sae(cls, sae_hash: str, directory: str | Path | None = None, for_writing: bool = False) -> LatentStore:
        """The cards of the SAE with `sae_hash`: the user's store, else (for reading, with no `directory` given)
        the cards shipped beside a default SAE in the package (read-only)."""
        if not sae_hash:
            raise SaefeatError("the SAE has no content hash; latent cards are keyed by it")
        own = cls(store_dir(directory) / f"{sae_hash}.sqlite")
        if own.exists or for_writing or directory is not None:
            return own
        from saefeat.sae.formats import DEFAULTS_DIR

        shipped = sorted(DEFAULTS_DIR.glob(f"*/latent_cards/{sae_hash}.sqlite"))
        return cls(shipped[0], read_only=True) if shipped else own

    # ---- connection ---------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return self.path.is_file()

    @property
    def con(self) -> sqlite3.Connection:
        if self._con is None and self.read_only:
            self._con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        elif self._con is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(self.path)
            self._con.executescript(_SCHEMA)
        return self._con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def compact(self) -> None:
        """Rewrite the file without the half-filled pages chunk commits leave (16k-latent cards: 27 MB -> 18 MB)."""
        self.con.execute("VACUUM")

    def delete(self) -> None:
        if self.read_only:
            raise SaefeatError(f"{self.path} holds the cards shipped with the package; they are never deleted")
        self.close()
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)

    # ---- meta and docs ------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        if not self.exists:
            return {}
        return {k: json.loads(v) for k, v in self.con.execute("SELECT key, value FROM meta")}

    def set_meta(self, values: dict[str, Any]) -> None:
        """Update meta keys (call inside a transaction: `with store.con:`)."""
        self.con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in values.items()])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def n_tokens(self) -> int:
        return int(self.meta.get("n_tokens", 0))

    def put_docs(self, texts: Sequence[str], sources: Sequence[str]) -> None:
        self.con.executemany("INSERT INTO docs VALUES (?, ?, ?)",
                             [(i, s, t) for i, (t, s) in enumerate(zip(texts, sources))])

    def docs(self, ids: Iterable[int] | None = None) -> dict[int, str]:
        if ids is None:
            return dict(self.con.execute("SELECT doc, text FROM docs ORDER BY doc"))
        ids = sorted({int(i) for i in ids})
        q = f"SELECT doc, text FROM docs WHERE doc IN ({','.join('?' * len(ids))})"
        return dict(self.con.execute(q, ids)) if ids else {}

    # ---- build state --------------------------------------------------------------------
    def write_state(self, n_fire: np.ndarray, sum_act: np.ndarray, max_act: np.ndarray, dropped: Sequence[int],
                    added: pd.DataFrame, meta: dict[str, Any]) -> None:
        """Commit one chunk of a build in one transaction: the statistics, the contexts that left the kept set
        (by rid) and the new ones (STATE_COLUMNS plus tokens, acts, ids per row)."""
        with self.con:
            self.con.execute("DELETE FROM latents")
            self.con.executemany(
                "INSERT INTO latents (latent, n_fire, sum_act, max_act) VALUES (?, ?, ?, ?)",
                zip(range(len(n_fire)), n_fire.tolist(), sum_act.tolist(), max_act.tolist()))
            self.con.executemany("DELETE FROM contexts WHERE rid = ?", ((int(r),) for r in dropped))
            a = added
            self.con.executemany(
                f"INSERT INTO contexts VALUES ({','.join('?' * len(CONTEXT_COLUMNS))})",
                zip(a.rid.tolist(), a.latent.tolist(), a.kind.tolist(), a.doc.tolist(), a.pos.tolist(),
                    a.act.tolist(), a.token_id.tolist(), a.peak.tolist(), a.key.tolist(),
                    map(json.dumps, a.tokens), (np.asarray(x, np.float32).tobytes() for x in a.acts),
                    (np.asarray(x, np.int32).tobytes() for x in a.ids)))
            self.set_meta(meta)

    def read_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
        """(n_fire, sum_act, max_act, contexts without their windows) as of the last committed chunk."""
        lat = pd.read_sql_query("SELECT latent, n_fire, sum_act, max_act FROM latents ORDER BY latent", self.con)
        ctx = pd.read_sql_query(f"SELECT {', '.join(STATE_COLUMNS)} FROM contexts ORDER BY rid", self.con)
        return (lat.n_fire.to_numpy(np.int64), lat.sum_act.to_numpy(np.float64),
                lat.max_act.to_numpy(np.float32), ctx)

    def contexts(self, latents: Sequence[int] | None = None, kind: str | None = None) -> pd.DataFrame:
        """Kept contexts with their windows (tokens, acts, ids as lists), optionally of some latents/one kind."""
        q = f"SELECT {', '.join(CONTEXT_COLUMNS)} FROM contexts WHERE 1"
        args: list = []
        if latents is not None:
            ids = sorted({int(x) for x in latents})
            q += f" AND latent IN ({','.join('?' * len(ids))})"
            args += ids
        if kind is not None:
            q += " AND kind = ?"
            args.append(kind)
        df = pd.read_sql_query(q + " ORDER BY rid", self.con, params=args)
        df["tokens"] = [json.loads(x) for x in df.tokens]
        df["acts"] = [np.frombuffer(x, np.float32).tolist() for x in df.acts]
        df["ids"] = [np.frombuffer(x, np.int32).tolist() for x in df.ids]
        return df

    def set_labels(self, rows: Iterable[tuple[int, str, list[str], list[str], list[str]]]) -> None:
        """(latent, label, label_tokens, promotes, suppresses) per latent (inside a transaction)."""
        self.con.executemany(
            "UPDATE latents SET label = ?, label_tokens = ?, promotes = ?, suppresses = ? WHERE latent = ?",
            [(lab, json.dumps(toks), json.dumps(pro), json.dumps(sup), lat) for lat, lab, toks, pro, sup in rows])

    def set_llm_label(self, latent: int, label: str, score: float | None) -> None:
        with self.con:
            self.con.execute("UPDATE latents SET llm_label = ?, llm_score = ? WHERE latent = ?",
                             (label, score, int(latent)))

    # ---- cards --------------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return int(self.con.execute("SELECT COUNT(*) FROM latents").fetchone()[0])

    def firing_counts(self) -> np.ndarray:
        """Tokens of the reference corpus where each latent fires, indexed by latent (empty without a store)."""
        if not self.exists:
            return np.zeros(0, np.int64)
        rows = self.con.execute("SELECT n_fire FROM latents ORDER BY latent").fetchall()
        return np.array([n for (n,) in rows], dtype=np.int64)

    def labels(self) -> dict[int, str]:
        """Latent -> label of every labelled latent, the same as its card's `best_label` (empty without a store)."""
        if not self.exists:
            return {}
        rows = self.con.execute("SELECT latent, label, llm_label, llm_score FROM latents ORDER BY latent")
        out = {int(lat): best_label(label, llm, score) for lat, label, llm, score in rows}
        return {lat: label for lat, label in out.items() if label}

    def cards(self, latents: Sequence[int], n_top: int | None = None, n_weak: int | None = None) -> list[LatentCard]:
        """Cards of the given latents, in the order given."""
        latents = [int(x) for x in latents]
        d = self.d_sae
        bad = [x for x in latents if not 0 <= x < d]
        if bad:
            raise SaefeatError(f"latent {bad[0]} is out of range: this SAE has {d} latents (0..{d - 1})")
        q = (f"SELECT latent, n_fire, sum_act, max_act, label, label_tokens, llm_label, llm_score, promotes, "
             f"suppresses FROM latents WHERE latent IN ({','.join('?' * len(set(latents)))})")
        rows = {r[0]: r for r in self.con.execute(q, sorted(set(latents)))}
        ctx = self.contexts(latents)
        by_latent = dict(tuple(ctx.groupby("latent"))) if len(ctx) else {}
        meta = self.meta
        n_tokens = max(int(meta.get("n_tokens", 0)), 1)
        source = f"reference corpus {meta.get('corpus', '?')} ({meta.get('docs_done', 0)} docs, {n_tokens} tokens)"
        cards = []
        for lat in latents:
            _, n_fire, sum_act, max_act, label, label_tokens, llm_label, llm_score, pro, sup = rows[lat]
            top, weak = [], []
            if lat in by_latent:
                g = by_latent[lat]
                top = [_context(r) for r in g[g.kind == "top"].sort_values("act", ascending=False).itertuples()]
                weak = [_context(r) for r in g[g.kind == "sample"].sort_values("act").itertuples()]
            cards.append(LatentCard(
                latent=lat, density=n_fire / n_tokens, mean_act=sum_act / max(n_fire, 1), max_act=max_act,
                n_fire=n_fire, top=top if n_top is None else top[:n_top],
                weak=weak if n_weak is None else weak[:n_weak],
                label=label or "", label_tokens=json.loads(label_tokens or "[]"), llm_label=llm_label,
                llm_score=llm_score, promotes=json.loads(pro or "[]"), suppresses=json.loads(sup or "[]"),
                source=source))
        return cards

    def card(self, latent: int) -> LatentCard:
        return self.cards([latent])[0]


def _context(r) -> Context:
    return Context(tokens=r.tokens, acts=r.acts, peak=int(r.peak), act=float(r.act), doc=int(r.doc),
                   pos=int(r.pos), token_id=int(r.token_id), ids=r.ids)
