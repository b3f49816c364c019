"""`saefeat describe-latents` and `saefeat explain`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from saefeat.config import embed_config, load_config
from saefeat.embed.embedder import SAEEmbedder
from saefeat.embed.vectorizers import get_embedder
from saefeat.errors import MissingFileError, SaefeatError
from saefeat.explain.build import build_cards
from saefeat.explain.corpus import default_corpus, file_corpus
from saefeat.explain.render import card_panel
from saefeat.explain.store import LatentStore
from saefeat.explain.tokens import token_pieces

console = Console()


def latent_config(kind: str, overrides: Sequence[str]) -> DictConfig:
    """Config of `describe` or `explain` (`sae=X` is short for embed.sae=X, as in every command)."""
    return load_config(kind, overrides)


def make_embedder(cfg: DictConfig) -> SAEEmbedder:
    return get_embedder(embed_config(cfg))


def describe_latents(cfg: DictConfig) -> LatentStore:
    """Build (or resume) the latent cards of the configured SAE, then optionally add LLM labels."""
    if cfg.labels.llm not in (None, "local", "openai"):  # checked before any expensive work
        raise SaefeatError(f"labels.llm must be null, 'local' or 'openai', got {cfg.labels.llm!r}")
    if cfg.corpus in ("default", "gutenberg"):
        n = cfg.n_docs or 400
        picked = ("gutenberg", "maec") if cfg.corpus == "default" else ("gutenberg",)
        texts, sources = default_corpus(cfg.data_dir, n, cfg.passage_chars, cfg.seed, picked)
        corpus = f"{cfg.corpus} ({n} passages of {cfg.data_dir})"
    else:
        texts, sources = file_corpus(cfg.corpus, cfg.text_field, cfg.n_docs, cfg.seed)
        corpus = str(cfg.corpus)
    emb = make_embedder(cfg)
    store = build_cards(emb, texts, sources, corpus=corpus, n_top=cfg.n_top, n_sample=cfg.n_sample,
                        context_before=cfg.context_before, context_after=cfg.context_after,
                        chunk_docs=cfg.chunk_docs, batch_size=cfg.embed.batch_size, seed=cfg.seed,
                        store_dir=cfg.store_dir, overwrite=cfg.overwrite,
                        show_progress_bar=cfg.embed.show_progress_bar)
    n_fire = store.firing_counts()
    dens = n_fire / max(store.n_tokens, 1)
    live = dens[n_fire > 0]
    console.print(f"latent cards of {emb.sae.describe()} over {corpus}: {store.n_tokens} tokens, "
                  f"{len(live)} of {len(n_fire)} latents fire (median density {np.median(live) if len(live) else 0:.3%}"
                  f"); stored in {store.path}")
    if cfg.labels.llm:
        from saefeat.explain.llm import label_store, make_labeller

        lab = cfg.labels
        rows = label_store(store, emb, make_labeller(lab), None if lab.latents is None else list(lab.latents),
                           lab.max_latents, lab.n_explain, lab.n_holdout, cfg.seed)
        scores = [s for _, _, s in rows if s is not None]
        if scores:
            console.print(f"LLM labels for {len(rows)} latents; mean detection balanced accuracy {np.mean(scores):.3f}")
    return store


def _store_for(cfg: DictConfig) -> LatentStore:
    from saefeat.sae.formats import resolve_sae

    e = embed_config(cfg)
    sae = resolve_sae(e.sae, e.model, "cpu", layer=e.layer)
    return LatentStore.for_sae(sae.content_hash, cfg.store_dir)


def explain(cfg: DictConfig) -> None:
    """`latent=N`: print its card; `text=...`: the latents firing on each token, with their labels."""
    if (cfg.latent is None) == (cfg.text is None):
        raise SaefeatError('give exactly one of latent=N or text="..." (e.g. saefeat explain latent=12)')
    if cfg.latent is not None:
        store = _store_for(cfg)
        if not store.exists or not store.meta.get("docs_done"):
            raise MissingFileError(f"no latent cards for this SAE ({store.path}); build them with "
                                    f"`saefeat describe-latents embed.model={cfg.embed.model} sae={cfg.embed.sae}`")
        if not store.complete:
            console.print(f"[yellow]cards are partial ({store.meta['docs_done']} of {store.meta['n_docs']} "
                          "documents, no labels yet); rerun describe-latents to finish[/]")
        console.print(card_panel(store.card(int(cfg.latent)), cfg.show_top, cfg.show_weak))
        return
    explain_text(make_embedder(cfg), str(cfg.text), cfg.top_latents, cfg.store_dir)


def explain_text(emb: SAEEmbedder, text: str, top_latents: int = 3, store_dir: str | None = None) -> Table:
    """Print (and return) a table: each token with its strongest latents and their labels."""
    ta = emb.encode_tokens(text)
    store = LatentStore.for_sae(emb.sae.content_hash, store_dir)
    acts = ta.acts.tocsr()
    strongest = np.asarray(acts.max(axis=0).todense()).ravel() if acts.shape[0] else np.zeros(emb.d_sae)
    per_token = []
    for i in range(acts.shape[0]):
        a, b = acts.indptr[i], acts.indptr[i + 1]
        order = np.argsort(-acts.data[a:b], kind="stable")[:top_latents]
        per_token.append([(int(acts.indices[a + j]), float(acts.data[a + j])) for j in order])
    shown = sorted({lat for row in per_token for lat, _ in row} | set(np.argsort(-strongest)[:10].tolist()))
    labels = {}
    if store.exists and store.meta.get("docs_done"):
        labels = {c.latent: c.best_label for c in store.cards(shown, n_top=0, n_weak=0)}
    table = Table(title=f"latents per token ({emb.sae.describe()})", show_lines=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("token")
    table.add_column("latents: activation, label")
    pieces = token_pieces(emb.host.tokenizer, text, ta.token_ids)
    for i, (piece, row) in enumerate(zip(pieces, per_token)):
        cells = "; ".join(f"[bold]{lat}[/] {v:.2f} [cyan]{labels.get(lat, '')}[/]" for lat, v in row)
        table.add_row(str(i), repr(piece.strip() or piece), cells or "[dim]-[/]")
    console.print(table)
    summary = Table(title="strongest latents on the whole text")
    for col in ("latent", "max act", "tokens firing", "label"):
        summary.add_column(col)
    fires = np.bincount(acts.indices, minlength=emb.d_sae)
    for lat in np.argsort(-strongest)[:10]:
        if strongest[lat] > 0:
            summary.add_row(str(lat), f"{strongest[lat]:.2f}", str(fires[lat]), labels.get(int(lat), ""))
    console.print(summary)
    if not labels:
        console.print(f"[dim]no latent cards for this SAE yet: `saefeat describe-latents model={emb.model_name}` "
                      "adds labels[/]")
    return table
