"""The tabular experiment: synthesize rows for every concept, measure how faithful they are, sum it all up.

`synthesize` fits a conditional synthesizer on the training rows with their concept columns and samples
unconditional rows, rows per concept and minority-class rows; `concept_faithfulness` tests the rows sampled
for each concept with its latents; `summary_metrics` gathers the headline metrics of a run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from saefeat.tabular.concepts import ClusterConcepts, Concept
from saefeat.tabular.evaluate import augmentation, check_disjoint, faithfulness, fidelity, privacy, utility
from saefeat.tabular.schema import TableSchema
from saefeat.tabular.synth import ConditionalSynthesizer


@dataclass
class Synthesis:
    """The fitted synthesizer and what it sampled (rows in the original table's columns, except `by_concept`)."""

    synthesizer: ConditionalSynthesizer
    synthetic: pd.DataFrame                 # unconditional rows
    by_concept: dict[str, pd.DataFrame]     # concept name -> rows sampled for it (condition columns included)
    extra: pd.DataFrame                     # minority-class rows for augmentation


def synthesize(table: pd.DataFrame, table_schema: TableSchema, schema: TableSchema, concepts: Sequence[Concept],
               holdout_index: Sequence, method: str = "gaussian_copula", epochs: int = 300, seed: int = 0,
               n_rows: int | None = None, n_per_concept: int = 100, n_augment: int | None = None) -> Synthesis:
    """Fit on `table` (training rows with their concept columns, typed by `table_schema`) and sample.

    n_rows: unconditional rows (None: as many as training rows). n_per_concept: rows per concept, each checked
    to carry its concept. n_augment: minority-class rows (None: as many as even out the classes, at least 1).
    `schema` is the original table's; the holdout rows must not be among the training rows.
    """
    synth = ConditionalSynthesizer(table_schema, method, epochs, seed)
    synth.fit(table)
    check_disjoint(synth.train_index_, holdout_index)
    synthetic = synth.sample(int(n_rows or len(table)))[schema.columns]
    by_concept = {c.name: synth.sample_concept(c, int(n_per_concept)) for c in concepts}
    for c in concepts:
        if not (by_concept[c.name][c.column].astype(str) == c.value).all():
            raise RuntimeError(f"conditional sampling for {c.name} returned rows of another concept")
    minority = schema.minority
    if n_augment is None:
        counts = table[schema.target].value_counts()
        n_augment = int(counts.max() - counts.get(minority, 0))
    extra = synth.sample_conditions({schema.target: minority}, int(max(n_augment, 1)))[schema.columns]
    return Synthesis(synth, synthetic, by_concept, extra)


def concept_faithfulness(concepts: Sequence[Concept], synthetic_X: Mapping[str, object], real_X,
                         real_rows: pd.DataFrame, clusters: ClusterConcepts) -> pd.DataFrame:
    """`faithfulness` of every concept, with the real members of cluster concepts (by the nearest cluster) and
    of label concepts (by the target of `real_rows`, the rows encoded as `real_X`); adds `assigned_rate` (share
    of a cluster concept's synthetic rows that fall in its cluster) and `share_in_training`."""
    real_clusters = clusters.predict(real_X)
    members = {}
    for c in concepts:
        if c.kind == "cluster":
            members[c.name] = real_clusters == c.value
        elif c.kind == "label":
            members[c.name] = real_rows[c.column].astype(str).to_numpy() == c.value
    faith = faithfulness(concepts, synthetic_X, real_X, members)
    faith["assigned_rate"] = [float(np.mean(clusters.predict(synthetic_X[c.name]) == c.value))
                              if c.kind == "cluster" else np.nan for c in concepts]
    faith["share_in_training"] = [c.stats.get("share", np.nan) for c in concepts]
    return faith


def evaluate_synthetic(train: pd.DataFrame, synthetic: pd.DataFrame, extra: pd.DataFrame, holdout: pd.DataFrame,
                       schema: TableSchema, seed: int = 0, n_boot: int = 1000,
                       params: Mapping[str, object] | None = None, n_jobs: int = -1,
                       dcr_subsample: int | None = 2000) -> dict[str, Any]:
    """Fidelity (and its per-column details), utility, privacy of `synthetic` rows and the augmentation of the
    training rows with the minority-class `extra` rows, all measured on held-out real rows."""
    fid, details = fidelity(train, synthetic, holdout, schema, seed=seed)
    return {"fidelity": fid, "fidelity_columns": details,
            "utility": utility(train, synthetic, holdout, schema, seed, n_boot, params, n_jobs),
            "privacy": privacy(train, synthetic, holdout, schema, n_jobs, dcr_subsample),
            "augmentation": augmentation(train, extra, holdout, schema, seed, n_boot, params, n_jobs)}


def summary_metrics(counts: Mapping[str, float], fidelity: Mapping[str, float],
                    utility: Mapping[str, Mapping[str, float]], faith: pd.DataFrame, privacy: Mapping[str, float],
                    augment_rows: int, augmentation: Mapping[str, Mapping[str, float]],
                    times: Mapping[str, float]) -> dict[str, float]:
    """The run's headline metrics as floats: `counts` (row counts), fidelity, utility (TSTR vs TRTR ROC-AUC),
    faithfulness, privacy, the minority-class F1 gain of `augment_rows` synthetic rows, then `times`."""
    eligible = faith[faith.meets_target.notna()]
    summary = {
        **counts,
        **fidelity,
        "utility_trtr_roc_auc": utility["trtr"]["roc_auc"], "utility_tstr_roc_auc": utility["tstr"]["roc_auc"],
        "utility_ratio": utility["ratio"]["roc_auc"],
        "faithfulness_mean_rate": float(faith.synthetic_rate.mean()),
        "faithfulness_mean_real_member_rate": float(faith.real_member_rate.mean()),
        "faithfulness_mean_base_rate": float(faith.base_rate.mean()),
        "faithfulness_cluster_assigned_rate": float(faith.assigned_rate.mean()),
        "faithfulness_concepts_eligible": len(eligible),
        "faithfulness_concepts_met": int(eligible.meets_target.astype(bool).sum()),
        **privacy,
        "augment_rows": augment_rows,
        "augment_minority_f1_real": augmentation["real"]["minority_f1"],
        "augment_minority_f1_augmented": augmentation["augmented"]["minority_f1"],
        "augment_minority_f1_gain": augmentation["augmented"]["minority_f1"] - augmentation["real"]["minority_f1"],
        **times,
    }
    return {k: float(v) for k, v in summary.items()}


def concept_frame(concepts: Sequence[Concept], report: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per concept (kind, latents, stats, description); with a latent report that has labels, the
    labels of each concept's latents too (`latent_labels`)."""
    frame = pd.DataFrame([{"concept": c.name, "kind": c.kind, "latents": " ".join(f"#{i}" for i in c.latents),
                           **c.stats, "description": c.description} for c in concepts])
    if report is not None and "label" in report:
        names = dict(zip(report["latent"], report["label"].fillna("")))
        frame["latent_labels"] = [" | ".join(f"#{i} {names.get(i, '')}".strip() for i in c.latents)
                                  for c in concepts]
    return frame


def print_metrics(metrics: Mapping[str, float], title: str, console: Console | None = None) -> None:
    """A two-column table of metric values."""
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    (console or Console()).print(t)


def print_faithfulness(faith: pd.DataFrame, console: Console | None = None) -> None:
    """The faithfulness table of `concept_faithfulness`, then each concept's description."""
    console = console or Console()
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
