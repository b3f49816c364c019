"""Building latent cards: one pass of an SAEEmbedder over a reference corpus, chunk by chunk, resumable."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from saefeat.embed.cache import doc_hash
from saefeat.embed.embedder import SAEEmbedder, TokenActivations
from saefeat.errors import SaefeatError
from saefeat.explain.cards import extract_windows, token_rows
from saefeat.explain.labels import label_from_tokens
from saefeat.explain.logit_lens import logit_lens
from saefeat.explain.store import SCHEMA_VERSION, LatentStore
from saefeat.explain.tokens import token_pieces

logger = logging.getLogger(__name__)


class _CardState:
    """Running statistics and kept contexts of every latent, merged chunk by chunk.

    `contexts` holds only the numbers of each kept context (STATE_COLUMNS); a context's window is computed
    once, in the chunk that found it, and goes straight to the store.
    """

    def __init__(self, d_sae: int, n_top: int, n_sample: int, before: int, after: int):
        self.d, self.n_top, self.n_sample, self.before, self.after = d_sae, n_top, n_sample, before, after
        self.n_fire = np.zeros(d_sae, np.int64)
        self.sum_act = np.zeros(d_sae, np.float64)
        self.max_act = np.zeros(d_sae, np.float32)
        self.contexts = _frame("top", *(np.zeros(0, np.int64),) * 5, np.zeros(0, np.int64), np.nan, 0, 0)

    def restore(self, n_fire: np.ndarray, sum_act: np.ndarray, max_act: np.ndarray, contexts: pd.DataFrame) -> None:
        self.n_fire, self.sum_act, self.max_act = n_fire, sum_act, max_act
        self.contexts = contexts.assign(_local=-1)

    def update(self, acts: Sequence[TokenActivations], pieces: Sequence[list[str]], doc_offset: int,
               rng: np.random.Generator) -> tuple[int, list[int], pd.DataFrame]:
        """Fold one chunk of documents in; returns (tokens read, rids dropped, new contexts with windows)."""
        stacked, offsets = token_rows(acts)
        n_tok = int(offsets[-1])
        if stacked.nnz == 0:
            return n_tok, [], self.contexts.iloc[:0].assign(tokens=[], acts=[], ids=[])
        coo = stacked.tocoo()
        row_doc = np.repeat(np.arange(len(acts)), np.diff(offsets))
        lat, val = coo.col.astype(np.int64), coo.data.astype(np.float32)
        doc = row_doc[coo.row]
        pos = coo.row - offsets[doc]
        self.n_fire += np.bincount(lat, minlength=self.d)
        self.sum_act += np.bincount(lat, weights=val, minlength=self.d)
        np.maximum.at(self.max_act, lat, val)

        order = np.lexsort((-val, doc, lat))  # strongest token of each (latent, document) first
        first = np.ones(len(order), bool)
        first[1:] = (lat[order][1:] != lat[order][:-1]) | (doc[order][1:] != doc[order][:-1])
        top = order[first]
        top = top[_first_n(lat[top], -val[top], self.n_top)]
        key = rng.random(len(lat))  # a uniform sample of firings: the n smallest random keys per latent
        sample = _first_n(lat, key, self.n_sample)
        tokens = np.concatenate([np.asarray(a.token_ids, np.int64) for a in acts])[coo.row]
        rid0 = int(self.contexts.rid.max()) + 1 if len(self.contexts) else 0
        new = pd.concat([_frame("top", lat, doc, pos, val, tokens, top, np.nan, doc_offset, rid0),
                         _frame("sample", lat, doc, pos, val, tokens, sample, key[sample], doc_offset,
                                rid0 + len(top))], ignore_index=True)
        kept = []
        for kind, n in (("top", self.n_top), ("sample", self.n_sample)):
            both = pd.concat([self.contexts[self.contexts.kind == kind], new[new.kind == kind]], ignore_index=True)
            keys = -both.act.to_numpy(float) if kind == "top" else both.key.to_numpy(float)
            kept.append(both.iloc[_first_n(both.latent.to_numpy(np.int64), keys, n)])
        ctx = pd.concat(kept, ignore_index=True)
        dropped = sorted(set(self.contexts.rid.tolist()) - set(ctx.rid.tolist()))
        added = ctx[ctx._local >= 0].copy()
        wins = extract_windows(stacked, offsets, pieces, [a.token_ids for a in acts], added._local.to_numpy(),
                               added.pos.to_numpy(), added.latent.to_numpy(), self.before, self.after)
        added["tokens"] = [w[0] for w in wins]
        added["acts"] = [w[1] for w in wins]
        added["peak"] = np.asarray([w[2] for w in wins], np.int64)
        added["ids"] = [w[3] for w in wins]
        ctx.loc[ctx._local >= 0, "peak"] = added.peak.to_numpy()
        self.contexts = ctx.assign(_local=-1)
        return n_tok, dropped, added


def _first_n(group: np.ndarray, sort_key: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n entries with the smallest sort_key in each group (ties keep input order)."""
    order = np.lexsort((np.arange(len(group)), sort_key, group))
    g = group[order]
    start = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    rank = np.arange(len(g)) - np.repeat(start, np.diff(np.r_[start, len(g)]))
    return order[rank < n]


def _frame(kind: str, lat, doc, pos, val, tok, idx, key, doc_offset: int, rid0: int) -> pd.DataFrame:
    return pd.DataFrame({"rid": rid0 + np.arange(len(idx), dtype=np.int64), "latent": lat[idx], "kind": kind,
                         "doc": doc[idx] + doc_offset, "pos": pos[idx], "act": val[idx].astype(np.float64),
                         "token_id": tok[idx], "peak": np.full(len(idx), -1, np.int64),
                         "key": np.broadcast_to(np.asarray(key, np.float64), (len(idx),)).copy(),
                         "_local": doc[idx]})


def fingerprint(emb: SAEEmbedder, texts: Sequence[str], settings: dict) -> str:
    """What the cards depend on: SAE, host and windowing, the corpus and the card settings.

    The runtime (backend, precision) is left out: it shifts activations (bf16 about 1%; int8 keeps about 94% of a
    document's top-32 latents), not what a latent's card describes.
    """
    emb_settings = {k: v for k, v in emb.settings("sae").items() if k not in ("precision", "backend")}
    h = hashlib.sha256(json.dumps({"v": SCHEMA_VERSION, "emb": emb_settings, **settings},
                                  sort_keys=True, default=str).encode())
    for t in texts:
        h.update(doc_hash(t).encode())
    return h.hexdigest()[:24]


def build_cards(emb: SAEEmbedder, texts: Sequence[str], sources: Sequence[str], corpus: str = "custom",
                n_top: int = 12, n_sample: int = 12, context_before: int = 12, context_after: int = 4,
                chunk_docs: int = 32, batch_size: int = 32, seed: int = 0, store_dir: str | Path | None = None,
                overwrite: bool = False, show_progress_bar: bool = True) -> LatentStore:
    """Build (or resume) the latent cards of `emb`'s SAE over `texts`; returns the store.

    Each chunk of `chunk_docs` documents is committed in one transaction; rerunning after an interruption
    continues after the last committed chunk. A finished store is returned as is unless `overwrite`.
    """
    if not texts:
        raise SaefeatError("the reference corpus is empty")
    if min(n_top, n_sample, chunk_docs) < 1 or min(context_before, context_after) < 0:
        raise SaefeatError("n_top, n_sample and chunk_docs must be >= 1, context_before/after >= 0")
    settings = {"n_top": n_top, "n_sample": n_sample, "before": context_before, "after": context_after,
                "seed": seed}
    fp = fingerprint(emb, texts, settings)
    store = LatentStore.for_sae(emb.sae.content_hash, store_dir, for_writing=True)
    meta = store.meta
    if meta and meta.get("fingerprint") != fp:
        if not overwrite:
            raise SaefeatError(f"{store.path} holds cards of this SAE built with other settings or another corpus "
                             f"({meta.get('corpus')}, {meta.get('n_docs')} docs); pass overwrite=true to rebuild")
        store.delete()
        meta = {}
    elif meta and overwrite and meta.get("complete"):
        store.delete()
        meta = {}
    if meta.get("complete"):
        logger.info("latent cards already built: %s", store.path)
        return store
    state = _CardState(emb.d_sae, n_top, n_sample, context_before, context_after)
    if not meta:
        with store.con:
            store.put_docs(texts, sources)
            store.set_meta({"version": SCHEMA_VERSION, "fingerprint": fp, "sae": emb.sae.content_hash,
                            "sae_description": emb.sae.describe(), "host": emb.model_name, "layer": emb.layer,
                            "embedder": emb.settings("sae"),
                            "corpus": corpus, "n_docs": len(texts), "docs_done": 0, "n_tokens": 0,
                            "complete": False, **settings})
        done, n_tokens = 0, 0
    else:
        done, n_tokens = int(meta["docs_done"]), int(meta["n_tokens"])
        if done:
            state.restore(*store.read_state())
        logger.info("resuming latent cards after %d of %d documents", done, len(texts))
    tok = emb.host.tokenizer
    with tqdm(total=len(texts), initial=done, desc="latent cards", unit="doc", disable=not show_progress_bar) as bar:
        for start in range(done, len(texts), chunk_docs):
            chunk = list(texts[start:start + chunk_docs])
            acts = emb.encode_tokens_batch(chunk, batch_size)
            pieces = [token_pieces(tok, t, a.token_ids) for t, a in zip(chunk, acts)]
            n_tok, dropped, added = state.update(acts, pieces, start, np.random.default_rng([seed, start]))
            n_tokens += n_tok
            store.write_state(state.n_fire, state.sum_act, state.max_act, dropped, added,
                              {"docs_done": start + len(chunk), "n_tokens": n_tokens})
            bar.update(len(chunk))
    _finish(store, emb, texts)
    return store


def _finish(store: LatentStore, emb: SAEEmbedder, texts: Sequence[str]) -> None:
    """Offline labels and (causal hosts) logit-lens tokens for every latent; marks the store complete."""
    tok = emb.host.tokenizer
    background = np.bincount(np.concatenate([np.asarray(x, np.int64) for x in emb.host.tokenize(list(texts))]),
                             minlength=len(tok))
    promotes = suppresses = None
    if emb.host.is_causal and emb.host.model.get_output_embeddings() is not None:
        promotes, suppresses = logit_lens(emb.host, emb.sae)
    top = store.contexts(kind="top")
    groups = dict(tuple(top.groupby("latent"))) if len(top) else {}
    rows = []
    for lat in range(emb.d_sae):
        g = groups.get(lat)
        if g is None:
            label, tokens = "(never fires)", []
        else:
            g = g.sort_values("act", ascending=False)
            lab = label_from_tokens(g.token_id.tolist(), background, tok,
                                    context_ids=[t for ids in g.ids for t in ids])
            label, tokens = lab.label, lab.tokens
        rows.append((lat, label, tokens, promotes[lat] if promotes else [], suppresses[lat] if suppresses else []))
    with store.con:
        store.set_labels(rows)
        store.set_meta({"complete": True})
    store.compact()
