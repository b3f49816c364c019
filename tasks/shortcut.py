"""Shortcut features: find them with SAE latents and train them away with DBR (arXiv 2502.18353).

`saefeat run task=shortcut` (CAD sentiment by default):
1. IG shortcut tokens: a bias-only model (bag of the host's static token embeddings) is trained on the
   training texts; Integrated Gradients toward the gold label picks each example's top tokens.
2. SAE shortcut latents: a linear model on SAE features ranks latents; those whose evidence survives
   counterfactual edits (CAD training pairs) or that fire on a few label-correlated tokens are shortcuts, and
   the tokens where they fire are each example's shortcut tokens.
3. Masked copies x̃ (hard or soft masking) of the training texts, and for each representation (sae, dense)
   and method (erm, dbr_ig, dbr_sae) a classifier trained with CE + λ·JSD(p(x) || p(x̃)); the head's L2 and
   λ are chosen on in-domain data only. Child runs `<method>/<representation>` report in-domain accuracy,
   out-of-domain (counterfactual) accuracy, their gap and the reliance on each kind of masked token.
"""

from __future__ import annotations

import logging
import time

import matplotlib

matplotlib.use("Agg")
import mlflow
from omegaconf import DictConfig

from saefeat.config import baseline_config, embed_config
from saefeat.errors import SaefeatError
from saefeat.evaluation.comparison import TaskRun
from saefeat.explain.report import latent_report
from saefeat.representations import make_representation
from saefeat.shortcut.data import load_benchmark
from saefeat.shortcut.detect import ShortcutDetector
from saefeat.shortcut.experiment import (
    FineTuneTrainer,
    HeadTrainer,
    Masks,
    check_settings,
    evaluate,
    ig_masks,
    log_masked_examples,
    method_gains,
    print_shortcuts,
    sae_masks,
    select_and_fit,
)

logger = logging.getLogger(__name__)

def check_config(cfg: DictConfig) -> None:
    """Every choice of the config is checked before data or models are loaded."""
    check_settings(list(cfg.methods), list(cfg.representations), cfg.mode, cfg.masking, cfg.select.data,
                   lambda_grid(cfg))
    rr = cfg.finetune.reliance_rows
    if rr is not None and int(rr) < 1:
        raise SaefeatError(f"finetune.reliance_rows must be a positive number of texts or null (all), got {rr}")


def lambda_grid(cfg: DictConfig) -> list[float]:
    """The λ values of the mode in use: `dbr.lambdas` for heads, `finetune.lambdas` for fine-tuning."""
    return [float(v) for v in (cfg.finetune.lambdas if cfg.mode == "finetune" else cfg.dbr.lambdas)]


def run(cfg: DictConfig) -> dict:
    """`saefeat run task=shortcut`: one parent run, a child run per method x representation."""
    t0 = time.time()
    check_config(cfg)
    seed, n_boot, masking = int(cfg.seed), int(cfg.bootstrap), str(cfg.masking)
    bench = load_benchmark(str(cfg.benchmark), cfg.data_dir, dict(cfg.paths), use_pairs=bool(cfg.detect.use_pairs))
    bench.sample(cfg.max_train, cfg.max_eval, seed)
    classes, (texts, y) = bench.classes, bench.parts()
    methods, reps = list(cfg.methods), list(cfg.representations)
    s = cfg.select
    refit = cfg.mode == "head" or bool(cfg.finetune.refit)
    selection = {"select_on": str(s.data), "train_slice": float(s.train_slice), "tolerance": float(s.tolerance),
                 "lambdas": lambda_grid(cfg), "refit": refit, "seed": seed}
    logger.info("shortcut/%s: %d training texts, in-domain %d, out-of-domain %s", bench.name, len(bench.train),
                len(bench.in_domain), {k: len(v) for k, v in bench.ood.items()})
    results: dict[str, dict[str, float]] = {}
    with TaskRun(cfg, run_name=f"shortcut-{bench.name}-{cfg.embed.model}") as task:
        mlflow.log_params({"n_train": len(bench.train), "n_in_domain": len(bench.in_domain),
                           **{f"n_ood_{k}": len(v) for k, v in bench.ood.items()}, "classes": ",".join(classes)})
        built = {name: make_representation(name, embed_config(cfg), baseline_config(cfg)) for name in reps}
        masks: dict[str, Masks] = {}
        ig_table, det = None, None
        if "dbr_ig" in methods:
            t, c = time.time(), cfg.ig
            masks["dbr_ig"], info, ig_table = ig_masks(
                texts["train"], y["train"], texts["in_domain"], y["in_domain"], cfg.embed.model, hidden=int(c.hidden),
                epochs=int(c.epochs), max_tokens=int(c.max_tokens), n_steps=int(c.n_steps),
                baseline=str(c.baseline), top_k=int(c.top_k), masking=masking, seed=seed,
                show_progress_bar=bool(cfg.embed.show_progress_bar))
            mlflow.log_metrics(info | masks["dbr_ig"].summary("ig") | {"ig_seconds": time.time() - t})
            mlflow.log_table(ig_table, "ig_shortcut_tokens.json")
            log_masked_examples(texts["train"], masks["dbr_ig"], "ig")
        sae_rep = built.get("sae") or make_representation("sae", embed_config(cfg), baseline_config(cfg))
        if "dbr_sae" in methods:
            t, d, e = time.time(), cfg.detect, cfg.embed
            det = ShortcutDetector(n_candidates=int(d.n_candidates), n_latents=int(d.n_latents),
                                   criterion=str(d.criterion), min_invariance=float(d.min_invariance),
                                   min_surface=float(d.min_surface), contexts_per_latent=int(d.contexts_per_latent),
                                   seed=seed, show_progress_bar=bool(cfg.embed.show_progress_bar))
            masks["dbr_sae"] = sae_masks(det, sae_rep.embedder, bench.train.texts, y["train"],
                                         pooling=str(e.pooling), masking=masking, seed=seed,
                                         pairs=bench.pairs, classes=classes, batch_size=int(e.batch_size),
                                         show_progress_bar=bool(e.show_progress_bar))
            mlflow.log_metrics(masks["dbr_sae"].summary("sae") | {"detect_seconds": time.time() - t,
                                                                   "n_shortcut_latents": len(det.shortcut_latents_)})
            mlflow.log_table(det.scores_, "shortcut_latents.json")
            log_masked_examples(texts["train"], masks["dbr_sae"], "sae")
        print_shortcuts(ig_table, det, classes)
        report = None  # the shortcut latents' report, carried by every SAE child
        if det is not None and det.shortcut_latents_:
            chosen = det.scores_[det.scores_.latent.isin(det.shortcut_latents_)].head(int(cfg.explain_top))
            report = latent_report(sae_rep, chosen.latent.tolist(), chosen.score.tolist(), texts=texts["train"],
                                   title="shortcut latents")
        masked_texts = {m: k.texts for m, k in masks.items()}
        for rep_name in reps:
            t_rep = time.time()
            logger.info("shortcut: %s features of %d texts and %d masked copies", rep_name,
                        sum(map(len, texts.values())), sum(map(len, masked_texts.values())))
            if cfg.mode == "head":
                h = cfg.head
                trainer = HeadTrainer(built[rep_name], texts, masked_texts, h.weight_decays, hidden=int(h.hidden),
                                      epochs=int(h.epochs), lr=float(h.lr), seed=seed)
            else:
                f = cfg.finetune
                rr = f.reliance_rows
                trainer = FineTuneTrainer(
                    texts, masked_texts, reliance_rows=None if rr is None else int(rr), model=cfg.embed.model,
                    representation=rep_name, sae=str(cfg.embed.sae),
                    layer=cfg.embed.layer, lr=float(f.lr), head_lr=float(f.head_lr), epochs=int(f.epochs),
                    batch_size=int(f.batch_size), max_tokens=int(f.max_tokens), max_steps=f.max_steps,
                    device=cfg.embed.device, seed=seed, show_progress_bar=bool(cfg.embed.show_progress_bar))
            embed_seconds = time.time() - t_rep
            t_m = time.time()
            erm = select_and_fit(trainer, y, None, None, **selection)
            erm_choice = (erm.params["weight_decay"], erm.params["select_accuracy"])
            for method in methods:
                if method != "erm":
                    t_m = time.time()
                fitted = erm if method == "erm" else select_and_fit(trainer, y, method, erm_choice, **selection)
                child = f"{method}/{rep_name}"
                with task.child(rep_name, {"mode": cfg.mode, "masking": cfg.masking, "refit": refit, **fitted.params},
                                method=method) as metrics:
                    metrics.update(evaluate(trainer, fitted, y, list(bench.ood), masks, n_boot, seed))
                    # fit_seconds: selection and fit; embed_seconds: this representation's features (shared)
                    metrics |= {"fit_seconds": time.time() - t_m, "embed_seconds": embed_seconds}
                    mlflow.log_table(fitted.selection, "selection.json")
                    if report is not None and rep_name == "sae":
                        report.log()
                results[child] = dict(metrics) | {"lambda": float(fitted.params["lambda"])}
        if gains := method_gains(results, methods, reps):
            mlflow.log_metrics(gains)
    logger.info("shortcut task finished in %.0f s", time.time() - t0)
    return results
