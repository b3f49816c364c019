"""The latents that drove a task's result, logged to the active MLflow run as a table and an HTML page."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd

from saefeat.data import check_texts
from saefeat.embed.embedder import SAEEmbedder
from saefeat.errors import SaefeatError
from saefeat.explain.cards import Context, LatentCard, extract_windows, token_rows
from saefeat.explain.labels import label_from_tokens
from saefeat.explain.render import context_plain, report_html
from saefeat.explain.store import LatentStore
from saefeat.explain.tokens import token_pieces

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatentReport:
    """A latent report: the table (latent, importance, label, density, mean_act, examples) and its HTML page."""

    title: str
    table: pd.DataFrame
    html: str

    def log(self) -> pd.DataFrame:
        """Log `<title>.json` and `<title>.html` to the active MLflow run; returns the table."""
        if mlflow.active_run() is None:
            logger.warning("latent report %r: no active MLflow run, nothing logged", self.title)
            return self.table
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.title).strip("_") or "latents"
        mlflow.log_table(self.table, f"{slug}.json")
        mlflow.log_text(self.html, f"{slug}.html")
        return self.table


def log_latent_report(embedder, latents: Sequence[int], importance: Sequence[float],
                      texts: Sequence[str] | None = None, title: str = "top latents",
                      n_examples: int = 2) -> pd.DataFrame:
    """`latent_report(...)` logged to the active MLflow run (`<title>.json` and `<title>.html`); returns its table."""
    return latent_report(embedder, latents, importance, texts, title, n_examples).log()


def latent_report(embedder, latents: Sequence[int], importance: Sequence[float],
                  texts: Sequence[str] | None = None, title: str = "top latents",
                  n_examples: int = 2) -> LatentReport:
    """Describe `latents` (with their `importance` in the fitted model): one row and one card each.

    Cards come from the latent store of the embedder's SAE when `saefeat describe-latents` has built one;
    otherwise contexts are found on the fly in `texts` (the task's own documents; a bounded number of them is
    re-encoded). The table has latent, importance, label, density, mean_act, example_1..n.
    """
    emb = _embedder(embedder)
    latents = [int(x) for x in latents]
    importance = [float(x) for x in importance]
    if len(latents) != len(importance):
        raise SaefeatError(f"latents and importance differ in length ({len(latents)} vs {len(importance)})")
    bad = [x for x in latents if not 0 <= x < emb.d_sae]
    if bad:
        raise SaefeatError(f"latent {bad[0]} is out of range for an SAE with {emb.d_sae} latents")
    store = LatentStore.for_sae(emb.sae.content_hash)
    if store.exists and store.meta.get("docs_done"):
        cards = store.cards(latents, n_top=n_examples)
        note = f"Contexts from the latent store ({cards[0].source if cards else ''})."
    elif texts is not None:
        cards = cards_from_texts(emb, texts, latents, n_examples=n_examples)
        note = "No latent store for this SAE (run `saefeat describe-latents`); contexts found in the task's texts."
    else:
        logger.warning("no latent store for SAE %s and no texts given: the report has no contexts",
                       emb.sae.content_hash)
        cards = [LatentCard(x, float("nan"), float("nan"), float("nan"), 0) for x in latents]
        note = "No latent store and no texts: labels and contexts are missing."
    rows = []
    for card, imp in zip(cards, importance):
        row = {"latent": card.latent, "importance": imp, "label": card.best_label, "density": card.density,
               "mean_act": card.mean_act}
        for i in range(n_examples):
            row[f"example_{i + 1}"] = context_plain(card.top[i]) if i < len(card.top) else ""
        rows.append(row)
    df = pd.DataFrame(rows, columns=["latent", "importance", "label", "density", "mean_act"]
                      + [f"example_{i + 1}" for i in range(n_examples)])
    return LatentReport(title, df, report_html(title, cards, importance, n_examples, note))


def _embedder(obj) -> SAEEmbedder:
    if isinstance(obj, SAEEmbedder):
        return obj
    inner = getattr(obj, "embedder", None)  # an SAEVectorizer
    if isinstance(inner, SAEEmbedder):
        return inner
    raise TypeError(f"expected an SAEEmbedder or SAEVectorizer, got {type(obj).__name__}")


def cards_from_texts(emb: SAEEmbedder, texts: Sequence[str], latents: Sequence[int], n_examples: int = 2,
                     max_stats_docs: int = 256, max_docs: int = 32, n_label: int = 10, before: int = 12,
                     after: int = 4, seed: int = 0) -> list[LatentCard]:
    """Cards of `latents` computed from a sample of `texts`, without a latent store.

    Statistics come from the (usually cached) per-document pass over up to `max_stats_docs` texts (32 when
    the embedder has no cache); the documents where each latent fires most are then re-encoded token by
    token, at most `max_docs` of them and each only up to one window, so the cost stays small whatever the
    corpus.
    """
    texts = check_texts(list(texts), field="texts")
    if emb.cache_root is None:  # without the cache the statistics pass re-encodes everything: keep it small
        max_stats_docs = min(max_stats_docs, 32)
    rng = np.random.default_rng(seed)
    pick = np.arange(len(texts))
    if len(pick) > max_stats_docs:
        pick = np.sort(rng.choice(len(texts), max_stats_docs, replace=False))
    sample = [texts[i] for i in pick]
    stats = emb.encode_stats(sample, "sae", show_progress_bar=False)
    lat = np.asarray(latents, dtype=np.int64)
    count = stats.count.tocsc()[:, lat].toarray()
    total = stats.sum.tocsc()[:, lat].toarray()
    peak = stats.max.tocsc()[:, lat].toarray()
    n_tokens = max(int(stats.n_tokens.sum()), 1)

    chosen = _choose_docs(count, max_docs)
    heads = [_head(emb, sample[i]) for i in chosen]
    acts = emb.encode_tokens_batch(heads) if heads else []
    pieces = [token_pieces(emb.host.tokenizer, h, a.token_ids) for h, a in zip(heads, acts)]
    stacked, offsets = token_rows(acts)
    background = np.bincount(np.concatenate([a.token_ids for a in acts]).astype(np.int64) if acts else
                             np.zeros(0, np.int64), minlength=len(emb.host.tokenizer))
    by_col = stacked.tocsc() if acts else None
    cards = []
    for j, latent in enumerate(lat):
        docs, pos, vals = [], [], []
        if by_col is not None:
            col = by_col[:, latent]
            for d in range(len(acts)):
                seg = col[offsets[d]:offsets[d + 1]].toarray().ravel()
                if seg.size and seg.max() > 0:
                    docs.append(d)
                    pos.append(int(seg.argmax()))
                    vals.append(float(seg.max()))
        order = np.argsort(-np.asarray(vals), kind="stable")[:max(n_examples, n_label)]
        d_arr, p_arr = np.asarray(docs)[order], np.asarray(pos)[order]
        wins = extract_windows(stacked, offsets, pieces, [a.token_ids for a in acts], d_arr, p_arr,
                               np.full(len(order), latent), before, after)
        contexts = [Context(tokens=t, acts=a, peak=pk, act=vals[o], doc=int(pick[chosen[d_arr[i]]]),
                            pos=int(p_arr[i]), token_id=int(acts[d_arr[i]].token_ids[p_arr[i]]), ids=ids)
                    for i, (o, (t, a, pk, ids)) in enumerate(zip(order, wins))]
        label = label_from_tokens([c.token_id for c in contexts], background, emb.host.tokenizer,
                                  context_ids=[t for c in contexts for t in c.ids])
        n_fire = int(count[:, j].sum())
        cards.append(LatentCard(
            latent=int(latent), density=n_fire / n_tokens, mean_act=float(total[:, j].sum()) / max(n_fire, 1),
            max_act=float(peak[:, j].max()) if len(peak) else 0.0, n_fire=n_fire, top=contexts[:n_examples],
            label=label.label if contexts else "", label_tokens=label.tokens,
            source=f"{len(sample)} task documents (first window of {len(heads)} re-encoded)"))
    return cards


def _choose_docs(count: np.ndarray, max_docs: int) -> list[int]:
    """Round-robin over latents, each taking its next document by firing count, until max_docs are chosen."""
    ranked = [list(np.argsort(-count[:, j], kind="stable")) for j in range(count.shape[1])]
    chosen: list[int] = []
    seen: set[int] = set()
    depth = 0
    while len(chosen) < max_docs and depth < count.shape[0]:
        for j, order in enumerate(ranked):
            d = int(order[depth])
            if count[d, j] > 0 and d not in seen and len(chosen) < max_docs:
                chosen.append(d)
                seen.add(d)
        depth += 1
    return chosen


def _head(emb: SAEEmbedder, text: str) -> str:
    """The start of `text` that fits in one window, cut before a token that follows whitespace."""
    enc = emb.host.tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    n = emb.window if emb.max_tokens is None else min(emb.window, emb.max_tokens)
    if len(offsets) <= n:
        return text
    for j in range(n, n // 2, -1):  # the re-tokenised head must end where the document's tokens do
        if offsets[j][0] > offsets[j - 1][1]:
            return text[: offsets[j - 1][1]]
    return text[: offsets[n - 1][1]]
