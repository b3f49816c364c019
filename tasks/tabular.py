"""Task `tabular`: synthetic table rows conditioned on SAE concepts, scored on real rows the synthesizer never saw.

1. Rows are written as text and encoded with the SAE (a sample of rows: `encode.n_rows`).
2. Concepts become condition columns: k-means clusters in SAE space, named latents, and the class label.
3. An SDV synthesizer is fitted on the encoded training rows plus the concept columns and samples rows per concept.
4. Fidelity, utility (TSTR vs TRTR), conditioning faithfulness, privacy (DCR) and minority-class augmentation are
   measured against held-out real rows. Child runs `real`, `synthetic` and `augmented` carry the same classifier
   metrics; the parent run carries the synthetic-data metrics, tables and plots.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from saefeat.data import DataError, read_table
from saefeat.evaluation.comparison import TaskRun
from saefeat.representations import representation_from_config
from saefeat.tabular.concepts import ClusterConcepts, Concept, label_concepts, latent_concept, resolve_latents
from saefeat.tabular.evaluate import (
    augmentation,
    check_disjoint,
    faithfulness,
    fidelity,
    privacy,
    split_holdout,
    utility,
)
from saefeat.tabular.plots import plot_distributions, plot_faithfulness
from saefeat.tabular.schema import TableSchema, prepare_table
from saefeat.tabular.serialize import RowSerializer
from saefeat.tabular.synth import METHODS, ConditionalSynthesizer

logger = logging.getLogger(__name__)
console = Console()
CLUSTER_COLUMN = "sae_concept"


def load_table(cfg: DictConfig) -> tuple[pd.DataFrame, TableSchema]:
    """The validated table and its schema from `cfg.data` (errors name the file and column)."""
    d = cfg.data
    df = read_table(d.path)
    return prepare_table(df, str(d.target), columns=None if d.columns is None else list(d.columns),
                         categorical=list(d.categorical), numerical=list(d.numerical),
                         na_values=[str(v) for v in d.na_values], missing=str(d.missing), source=str(d.path))


def _check_config(cfg: DictConfig, schema: TableSchema) -> None:
    e, s = cfg.encode, cfg.synth
    for key, v in (("encode.n_rows", e.n_rows), ("encode.n_holdout", e.n_holdout),
                   ("encode.n_per_concept", e.n_per_concept), ("synth.n_rows", s.n_rows),
                   ("augment.n_rows", cfg.augment.n_rows), ("synth.epochs", s.epochs)):
        if v is not None and int(v) < 1:
            raise ValueError(f"{key} must be a positive number of rows/epochs, got {v}")
    if s.method not in METHODS:
        raise ValueError(f"synth.method={s.method!r}; valid: {', '.join(METHODS)}")
    if CLUSTER_COLUMN in schema.types:
        raise DataError(f"{cfg.data.path}: the table already has a column {CLUSTER_COLUMN!r}, which this task adds")


def _sample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    return df if n is None or n >= len(df) else df.sample(n=int(n), random_state=seed)


def _store_labels(embedder) -> dict[int, str] | None:
    """Latent labels from the explanation store of this SAE, where `saefeat describe-latents` built one."""
    try:
        from saefeat.explain.store import LatentStore
    except ImportError:
        return None
    store = LatentStore.for_sae(embedder.sae.content_hash)
    if not (store.exists and store.meta.get("docs_done")):
        return None
    cards = store.cards(list(range(store.d_sae)), n_top=0, n_weak=0)
    return {c.latent: c.best_label for c in cards if c.best_label}


def _named_latents(cfg: DictConfig, labels: dict[int, str] | None, d_sae: int) -> list[list[int]]:
    """Latent ids of each named concept in `concepts.latents` (ids or labels), checked before any encoding."""
    specs = OmegaConf.to_container(cfg.concepts.latents) if cfg.concepts.latents else []
    needs_labels = any(isinstance(s, str) and not s.strip().lstrip("#").isdigit()
                       for spec in specs for s in (spec if isinstance(spec, list) else [spec]))
    if needs_labels and not labels:
        raise ValueError("concepts.latents names latents by label, but this SAE has no latent store with labels; "
                         "run `saefeat describe-latents` first or give latent ids")
    out = [resolve_latents(spec, labels) for spec in specs]
    if len({tuple(ids) for ids in out}) < len(out):
        raise ValueError(f"concepts.latents names the same latent set twice: {out}")
    bad = [i for ids in out for i in ids if not 0 <= i < d_sae]
    if bad:
        raise ValueError(f"concepts.latents: latent id(s) {bad} out of range; the SAE has {d_sae} latents")
    return out


def _encode(embedder, texts: list[str], cfg: DictConfig, what: str):
    logger.info("encoding %d %s with %s (layer %d)", len(texts), what, cfg.model.path, embedder.layer)
    return embedder.encode(texts, batch_size=int(cfg.embed.batch_size), show_progress_bar=cfg.embed.show_progress_bar)


def print_metrics(metrics: dict[str, float], title: str) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(t)


def print_faithfulness(faith: pd.DataFrame) -> None:
    t = Table(title="conditioning faithfulness: share of rows whose concept latents fire")
    for col in ("concept", "synthetic", "real members", "base rate", "assigned", "meets target"):
        t.add_column(col, justify="left" if col == "concept" else "right", no_wrap=col == "concept")
    for r in faith.itertuples():
        assigned = "" if pd.isna(r.assigned_rate) else f"{r.assigned_rate:.2f}"
        target = "-" if r.meets_target is None else ("yes" if r.meets_target else "no")
        t.add_row(r.concept, f"{r.synthetic_rate:.2f}", f"{r.real_member_rate:.2f}",
                  f"{r.base_rate:.2f}", assigned, target)
    console.print(t)
    for r in faith.itertuples():
        console.print(f"  {r.concept}: {r.description}", soft_wrap=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the task; returns the summary metrics."""
    t0 = time.time()
    table, schema = load_table(cfg)
    _check_config(cfg, schema)
    seed = int(cfg.seed)
    n_sig, match = int(cfg.concepts.n_signature), str(cfg.concepts.match)
    clusters = ClusterConcepts(int(cfg.concepts.n_clusters), n_sig, match, CLUSTER_COLUMN, seed)  # checks settings
    train_idx, hold_idx = split_holdout(table, schema.target, float(cfg.data.holdout), seed)
    check_disjoint(train_idx, hold_idx)
    train = _sample(table.loc[train_idx], cfg.encode.n_rows, seed)
    holdout = table.loc[hold_idx]
    hold_enc = _sample(holdout, cfg.encode.n_holdout, seed)
    logger.info("%s: %d rows (%d held out); encoding %d training rows (the synthesizer's) and %d held-out rows",
                cfg.data.path, len(table), len(holdout), len(train), len(hold_enc))

    text_cols = schema.columns if cfg.serialize.include_target else schema.features
    serializer = RowSerializer(text_cols, [c for c in schema.numerical if c in text_cols],
                               [c for c in schema.integers if c in text_cols], bool(cfg.serialize.pretty_names))
    embedder = representation_from_config("sae", cfg).embedder
    labels = _store_labels(embedder)
    named = _named_latents(cfg, labels, embedder.d_sae)
    train_texts = serializer.transform(train)
    X_train = _encode(embedder, train_texts, cfg, "training rows")
    X_hold = _encode(embedder, serializer.transform(hold_enc), cfg, "held-out rows")
    t_encode = time.time() - t0

    # concepts -> condition columns
    clusters.fit(X_train, train, schema, labels)
    concepts: list[Concept] = list(clusters.concepts_)
    synth_train = train.copy()
    synth_train[CLUSTER_COLUMN] = clusters.labels_
    synth_schema = schema.with_column(CLUSTER_COLUMN)
    for ids in named:
        concept, values = latent_concept(X_train, ids, match=match, labels=labels)
        synth_train[concept.column] = values
        synth_schema = synth_schema.with_column(concept.column)
        concepts.append(concept)
    if cfg.concepts.label:
        concepts += label_concepts(X_train, train[schema.target].to_numpy(), schema.target, n_sig, match, labels)

    # synthesis
    t1 = time.time()
    synth = ConditionalSynthesizer(synth_schema, str(cfg.synth.method), int(cfg.synth.epochs), seed)
    synth.fit(synth_train)
    check_disjoint(synth.train_index_, holdout.index)
    synthetic = synth.sample(int(cfg.synth.n_rows or len(train)))[schema.columns]
    by_concept = {c.name: synth.sample_concept(c, int(cfg.encode.n_per_concept)) for c in concepts}
    for c in concepts:
        if not (by_concept[c.name][c.column].astype(str) == c.value).all():
            raise RuntimeError(f"conditional sampling for {c.name} returned rows of another concept")
    minority = schema.minority
    n_aug = cfg.augment.n_rows
    if n_aug is None:
        counts = train[schema.target].value_counts()
        n_aug = int(counts.max() - counts.get(minority, 0))
    extra = synth.sample_conditions({schema.target: minority}, int(max(n_aug, 1)))[schema.columns]
    t_synth = time.time() - t1

    # faithfulness: encode the rows sampled for each concept
    t2 = time.time()
    synth_X = {name: _encode(embedder, serializer.transform(rows), cfg, f"synthetic rows of {name}")
               for name, rows in by_concept.items()}
    hold_clusters = clusters.predict(X_hold)
    members = {}
    for c in concepts:
        if c.kind == "cluster":
            members[c.name] = hold_clusters == c.value
        elif c.kind == "label":
            members[c.name] = hold_enc[c.column].astype(str).to_numpy() == c.value
    faith = faithfulness(concepts, synth_X, X_hold, members)
    faith["assigned_rate"] = [float(np.mean(clusters.predict(synth_X[c.name]) == c.value))
                              if c.kind == "cluster" else np.nan for c in concepts]
    faith["share_in_training"] = [c.stats.get("share", np.nan) for c in concepts]
    t_faith = time.time() - t2

    # fidelity, utility, privacy, augmentation on held-out rows
    t3 = time.time()
    params = OmegaConf.to_container(cfg.classifier)
    n_boot = int(cfg.n_boot)
    fid, fid_details = fidelity(train, synthetic, holdout, schema, seed=seed)
    n_jobs = int(cfg.n_jobs)
    util = utility(train, synthetic, holdout, schema, seed, n_boot, params, n_jobs)
    priv = privacy(train, synthetic, holdout, schema, n_jobs)
    aug = augmentation(train, extra, holdout, schema, seed, n_boot, params, n_jobs)
    t_eval = time.time() - t3

    eligible = faith[faith.meets_target.notna()]
    summary: dict[str, float] = {
        "n_synth_train_rows": len(train), "n_holdout_rows": len(holdout), "n_encoded_holdout_rows": len(hold_enc),
        **fid,
        "utility_trtr_roc_auc": util["trtr"]["roc_auc"], "utility_tstr_roc_auc": util["tstr"]["roc_auc"],
        "utility_ratio": util["ratio"]["roc_auc"],
        "faithfulness_mean_rate": float(faith.synthetic_rate.mean()),
        "faithfulness_mean_real_member_rate": float(faith.real_member_rate.mean()),
        "faithfulness_mean_base_rate": float(faith.base_rate.mean()),
        "faithfulness_cluster_assigned_rate": float(faith.assigned_rate.mean()),
        "faithfulness_concepts_eligible": len(eligible),
        "faithfulness_concepts_met": int(eligible.meets_target.astype(bool).sum()),
        **priv,
        "augment_rows": len(extra),
        "augment_minority_f1_real": aug["real"]["minority_f1"],
        "augment_minority_f1_augmented": aug["augmented"]["minority_f1"],
        "augment_minority_f1_gain": aug["augmented"]["minority_f1"] - aug["real"]["minority_f1"],
        "time_encode_s": t_encode, "time_synth_s": t_synth, "time_faithfulness_s": t_faith, "time_eval_s": t_eval,
    }
    summary = {k: float(v) for k, v in summary.items()}

    method = str(cfg.synth.method)
    run_params = {"synth.method": method, "n_train_rows": len(train), "n_holdout_rows": len(holdout)}
    concept_table = pd.DataFrame([{"concept": c.name, "kind": c.kind, "latents": " ".join(f"#{i}" for i in c.latents),
                                   **c.stats, "description": c.description} for c in concepts])
    with TaskRun(cfg, run_name=f"tabular-{method}-{cfg.model.path}") as tr:
        with tr.representation("real", run_params | {"rows": "real training rows"}) as m:
            m.update(util["trtr"])
        with tr.representation("synthetic", run_params | {"rows": f"{method} synthetic rows"}) as m:
            m.update(util["tstr"])
            report = _log_concept_latents(embedder, concepts, train_texts)
        with tr.representation("augmented", run_params | {"rows": "real + synthetic minority rows"}) as m:
            m.update(aug["augmented"])
        mlflow.log_metrics(summary)
        if report is not None and "label" in report:
            names = dict(zip(report["latent"], report["label"].fillna("")))
            concept_table["latent_labels"] = [" | ".join(f"#{i} {names.get(i, '')}".strip() for i in c.latents)
                                              for c in concepts]
        mlflow.log_table(faith, "faithfulness.json")
        mlflow.log_table(concept_table, "concepts.json")
        mlflow.log_table(fid_details, "fidelity_columns.json")
        mlflow.log_table(synthetic.head(500).reset_index(drop=True), "synthetic_sample.json")
        mlflow.log_figure(plot_distributions(holdout, synthetic, schema), "real_vs_synthetic.png")
        mlflow.log_figure(plot_faithfulness(faith), "faithfulness.png")
        mlflow.log_text(f"encoded {len(train)} of {len(train_idx)} training rows and {len(hold_enc)} of "
                        f"{len(holdout)} held-out rows ({cfg.model.path}, SAE {cfg.sae.path}); the synthesizer "
                        f"was fitted on the encoded training rows only", "sampling.txt")
    print_faithfulness(faith)
    print_metrics(summary, f"tabular ({method}, {cfg.model.path}): synthetic data on held-out real rows")
    logger.info("tabular task finished in %.0f s", time.time() - t0)
    return summary


def _log_concept_latents(embedder, concepts: list[Concept], texts: list[str]) -> pd.DataFrame | None:
    """Latent report of the latents that test each concept (importance: their firing-rate rise in the concept)."""
    try:
        from saefeat.explain.report import log_latent_report
    except ImportError:
        logger.warning("saefeat.explain is not available: no latent report logged")
        return None
    latents: dict[int, float] = {}
    for c in concepts:
        rise = c.stats.get("shows_inside", 1.0) - c.stats.get("shows_outside", c.stats.get("share", 0.0))
        for i in c.latents:
            latents[i] = max(latents.get(i, -1.0), float(rise))
    return log_latent_report(embedder, list(latents), list(latents.values()), texts=texts[:300],
                             title="concept latents")
