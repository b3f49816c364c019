"""Task `tabular`: synthetic table rows conditioned on SAE concepts, scored on real rows the synthesizer never saw.

1. Rows are written as text and encoded with the SAE (a sample of rows: `encode.n_rows`).
2. Concepts become condition columns: k-means clusters in SAE space, named latents, and the class label. With
   `encode.fit_rows=all`, a classifier of the encoded rows fills in the concept columns of the other training rows
   (its agreement with encoding is measured on encoded rows it never saw).
3. An SDV synthesizer is fitted on the training rows plus the concept columns and samples rows per concept.
4. Fidelity, utility (TSTR vs TRTR, both on the rows the synthesizer fitted), conditioning faithfulness, privacy
   (DCR; below `privacy.min_dcr_ratio` the synthetic table is not published) and minority-class augmentation are
   measured against held-out real rows. Child runs `real`, `synthetic` and `augmented` carry the same classifier
   metrics; the parent run carries the synthetic-data metrics, tables and plots.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from saefeat.config import baseline_config, embed_config
from saefeat.data import DataError, read_table
from saefeat.errors import SaefeatError
from saefeat.evaluation.comparison import TaskRun
from saefeat.explain.report import log_latent_report
from saefeat.representations import make_representation
from saefeat.tabular.assign import assign_concepts
from saefeat.tabular.concepts import (
    ClusterConcepts,
    add_concept_columns,
    concept_latent_importance,
    named_latents,
    store_labels,
)
from saefeat.tabular.evaluate import check_disjoint, split_holdout
from saefeat.tabular.experiment import (
    concept_faithfulness,
    concept_frame,
    evaluate_synthetic,
    print_faithfulness,
    print_metrics,
    summary_metrics,
    synthesize,
)
from saefeat.tabular.plots import plot_distributions, plot_faithfulness
from saefeat.tabular.schema import TableSchema, prepare_table
from saefeat.tabular.serialize import RowSerializer
from saefeat.tabular.synth import METHODS

logger = logging.getLogger(__name__)
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
            raise SaefeatError(f"{key} must be a positive number of rows/epochs, got {v}")
    if s.method not in METHODS:
        raise SaefeatError(f"synth.method={s.method!r}; valid: {', '.join(METHODS)}")
    if e.fit_rows not in ("all", "encoded"):
        raise SaefeatError(f"encode.fit_rows must be 'all' or 'encoded', got {e.fit_rows!r}")
    if not 0 < float(e.check_share) < 1:
        raise SaefeatError(f"encode.check_share must be in (0, 1), got {e.check_share}")
    if float(cfg.privacy.min_dcr_ratio) < 0:
        raise SaefeatError(f"privacy.min_dcr_ratio must be >= 0, got {cfg.privacy.min_dcr_ratio}")
    if CLUSTER_COLUMN in schema.types:
        raise DataError(f"{cfg.data.path}: the table already has a column {CLUSTER_COLUMN!r}, which this task adds")


def _sample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    return df if n is None or n >= len(df) else df.sample(n=int(n), random_state=seed)


def _encode(embedder, texts: list[str], cfg: DictConfig, what: str):
    logger.info("encoding %d %s with %s (layer %d)", len(texts), what, cfg.embed.model, embedder.layer)
    return embedder.encode(texts, batch_size=int(cfg.embed.batch_size), show_progress_bar=cfg.embed.show_progress_bar)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the task; returns the summary metrics."""
    t0 = time.time()
    table, schema = load_table(cfg)
    _check_config(cfg, schema)
    seed = int(cfg.seed)
    c = cfg.concepts
    clusters = ClusterConcepts(int(c.n_clusters), int(c.n_signature), str(c.match), CLUSTER_COLUMN, seed)  # checks
    train_idx, hold_idx = split_holdout(table, schema.target, float(cfg.data.holdout), seed)
    check_disjoint(train_idx, hold_idx)
    train_all = table.loc[train_idx]
    train = _sample(train_all, cfg.encode.n_rows, seed)
    holdout = table.loc[hold_idx]
    hold_enc = _sample(holdout, cfg.encode.n_holdout, seed)
    logger.info("%s: %d rows (%d held out); encoding %d training rows and %d held-out rows",
                cfg.data.path, len(table), len(holdout), len(train), len(hold_enc))

    serializer = RowSerializer.for_schema(schema, bool(cfg.serialize.include_target), bool(cfg.serialize.pretty_names))
    embedder = make_representation("sae", embed_config(cfg), baseline_config(cfg)).embedder
    labels = store_labels(embedder.sae.content_hash)
    named = named_latents(OmegaConf.to_container(cfg.concepts.latents) if cfg.concepts.latents else [], labels,
                          embedder.d_sae)
    train_texts = serializer.transform(train)
    X_train = _encode(embedder, train_texts, cfg, "training rows")
    X_hold = _encode(embedder, serializer.transform(hold_enc), cfg, "held-out rows")
    t_encode = time.time() - t0

    concepts, synth_train, synth_schema = add_concept_columns(X_train, train, schema, clusters, named,
                                                              bool(cfg.concepts.label), labels)
    agreement = pd.DataFrame()
    if cfg.encode.fit_rows == "all" and len(train) < len(train_all):
        concept_cols = [c for c in synth_schema.columns if c not in schema.columns]
        rest, agreement = assign_concepts(synth_train, train_all.drop(train.index), schema, concept_cols, seed,
                                          float(cfg.encode.check_share), int(cfg.n_jobs))
        synth_train = pd.concat([synth_train, rest[synth_train.columns]]).loc[train_all.index]
        for r in agreement.itertuples():
            logger.info("concept column %s of %d rows not encoded: a classifier agrees with encoding on %.1f%% of "
                        "%d held-out encoded rows (constant guess %.1f%%)", r.column, r.n_assigned,
                        100 * r.agreement, r.n_checked, 100 * r.majority)
    fitted = table.loc[synth_train.index]  # the real rows the synthesizer sees: TRTR and privacy use the same
    t1 = time.time()
    method = str(cfg.synth.method)
    syn = synthesize(synth_train, synth_schema, schema, concepts, holdout.index, method, int(cfg.synth.epochs), seed,
                     cfg.synth.n_rows, int(cfg.encode.n_per_concept), cfg.augment.n_rows)
    synthetic, extra = syn.synthetic, syn.extra
    t_synth = time.time() - t1

    t2 = time.time()  # faithfulness: encode the rows sampled for each concept
    synth_X = {name: _encode(embedder, serializer.transform(rows), cfg, f"synthetic rows of {name}")
               for name, rows in syn.by_concept.items()}
    faith = concept_faithfulness(concepts, synth_X, X_hold, hold_enc, clusters)
    t_faith = time.time() - t2

    t3 = time.time()  # fidelity, utility, privacy, augmentation on held-out rows
    ev = evaluate_synthetic(fitted, synthetic, extra, holdout, schema, seed, int(cfg.n_boot),
                            OmegaConf.to_container(cfg.classifier), int(cfg.n_jobs),
                            None if cfg.privacy.dcr_subsample is None else int(cfg.privacy.dcr_subsample))
    util, aug = ev["utility"], ev["augmentation"]
    ratio, floor = ev["privacy"]["dcr_ratio"], float(cfg.privacy.min_dcr_ratio)
    published = bool(ratio >= floor)
    counts = {"n_synth_train_rows": len(fitted), "n_encoded_train_rows": len(train), "n_holdout_rows": len(holdout),
              "n_encoded_holdout_rows": len(hold_enc), "synthetic_published": float(published)}
    if len(agreement):
        counts["concept_assignment_agreement"] = float(agreement.agreement.mean())
    summary = summary_metrics(counts, ev["fidelity"], util, faith, ev["privacy"], len(extra), aug,
                              {"time_encode_s": t_encode, "time_synth_s": t_synth, "time_faithfulness_s": t_faith,
                               "time_eval_s": time.time() - t3})

    run_params = {"synth.method": method, "n_train_rows": len(fitted), "n_holdout_rows": len(holdout)}
    with TaskRun(cfg, run_name=f"tabular-{method}-{cfg.embed.model}") as tr:
        with tr.child("real", run_params | {"rows": "real training rows"}) as m:
            m.update(util["trtr"])
        with tr.child("synthetic", run_params | {"rows": f"{method} synthetic rows"}) as m:
            m.update(util["tstr"])
            imp = concept_latent_importance(concepts)  # importance: the latents' firing-rate rise in the concept
            report = log_latent_report(embedder, list(imp), list(imp.values()), texts=train_texts[:300],
                                       title="concept latents")
        with tr.child("augmented", run_params | {"rows": "real + synthetic minority rows"}) as m:
            m.update(aug["augmented"])
        mlflow.log_metrics(summary)
        mlflow.log_table(faith, "faithfulness.json")
        mlflow.log_table(concept_frame(concepts, report), "concepts.json")
        mlflow.log_table(ev["fidelity_columns"], "fidelity_columns.json")
        if len(agreement):
            mlflow.log_table(agreement, "concept_assignment.json")
        if published:
            mlflow.log_table(synthetic.head(500).reset_index(drop=True), "synthetic_sample.json")
        else:  # the privacy guard: no synthetic rows leave the run
            mlflow.set_tag("synthetic_table", f"withheld: DCR ratio {ratio:.3f} < privacy.min_dcr_ratio {floor}")
        mlflow.log_figure(plot_distributions(holdout, synthetic, schema), "real_vs_synthetic.png")
        mlflow.log_figure(plot_faithfulness(faith), "faithfulness.png")
        fit_note = ("every training row (concepts of the rows not encoded predicted by a classifier of the encoded "
                    "ones; its agreement is in concept_assignment.json)" if len(agreement) else "the encoded rows")
        mlflow.log_text(f"encoded {len(train)} of {len(train_idx)} training rows and {len(hold_enc)} of "
                        f"{len(holdout)} held-out rows ({cfg.embed.model}, SAE {cfg.embed.sae}); the synthesizer "
                        f"was fitted on {len(fitted)} rows: {fit_note}", "sampling.txt")
    print_faithfulness(faith)
    if not published:
        logger.warning("privacy guard: synthetic rows sit closer to the training rows than new real rows do (DCR "
                       "ratio %.3f < privacy.min_dcr_ratio %.2f); the synthetic table is not published", ratio, floor)
    print_metrics(summary, f"tabular ({method}, {cfg.embed.model}): synthetic data on held-out real rows")
    logger.info("tabular task finished in %.0f s", time.time() - t0)
    return summary
