"""Toxicity filters on SAE features and SAE-based detoxifying steering ("Breaking Bad Tokens", arXiv 2505.14536).

Part 1 compares toxicity filters over the `sae`, `dense`, `sentence` and `tfidf` representations on Jigsaw
comments: a logistic regression per representation, its threshold chosen on a calibration split for a target
precision at the natural toxic rate, and ROC-AUC / PR-AUC on a validation split subsampled to that rate.
Part 2 ranks the toxic latents of the steering host's SAE (smollm2 by default) and generates continuations of
challenging RealToxicityPrompts prompts under three clamping tiers and three baselines (none, a
difference-in-means vector at the same layer, banned words at decode time); continuations are scored by
classifiers that share nothing with the SAE, fluency is the unsteered model's perplexity of the continuation,
and a capability check compares perplexity on held-out book paragraphs.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from saefeat.config import baseline_config, embed_config, to_dict
from saefeat.detox.baselines import toxic_words
from saefeat.detox.data import (
    corpus_paragraphs,
    load_labelled_comments,
    load_prompts,
    sample_prompts,
    split_comments,
    stratified_cap,
)
from saefeat.detox.evaluate import evaluate_conditions, examples_table
from saefeat.detox.experiment import (
    check_settings,
    filter_report,
    print_steering,
    steering_conditions,
    steering_metrics,
    toxic_texts,
    toxicity_scorers,
)
from saefeat.detox.filter import ToxicityFilter, representation_settings
from saefeat.detox.generation import prompt_ids
from saefeat.detox.latents import find_toxic_latents, rank_toxic_latents
from saefeat.evaluation.comparison import TaskRun
from saefeat.explain.report import log_latent_report
from saefeat.hosts import get_host
from saefeat.representations import REPRESENTATIONS

logger = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Bad settings fail here, before any model is loaded."""
    sp = cfg.split
    check_settings(list(cfg.representations), REPRESENTATIONS, cfg.filter.target, cfg.filter.target_value,
                   sp.calib_fraction, sp.val_fraction, sp.toxic_rate, to_dict(cfg.steering))


def run(cfg: DictConfig) -> dict:
    """`saefeat run task=detox`: filter comparison (child run per representation), then the steering tiers."""
    check_config(cfg)
    d, s, seed = cfg.data, cfg.steering, int(cfg.seed)
    texts, y = load_labelled_comments(d.comments, d.text_field, d.label_field)
    texts, y = stratified_cap(texts, y, d.max_comments, seed)
    sp = cfg.split
    train, calib, val = split_comments(y, sp.calib_fraction, sp.val_fraction, sp.toxic_rate, seed, str(d.comments))
    pick = lambda rows: [texts[i] for i in rows]  # noqa: E731
    prompts = paragraphs = None
    if s.enabled:  # read and check everything the steering needs before any model runs
        prompts = sample_prompts(load_prompts(d.prompts), int(s.n_prompts), seed)
        paragraphs = corpus_paragraphs(d.corpus, int(s.n_capability_texts), seed=seed) \
            if int(s.n_capability_texts) > 0 else []
    logger.info("detox: %d training, %d calibration, %d validation comments (validation toxic rate %.3f)",
                len(train), len(calib), len(val), y[val].mean())
    results: dict = {"filters": {}}
    with TaskRun(cfg) as task:
        mlflow.log_params({"n_train": len(train), "n_calib": len(calib), "n_val": len(val),
                           "val_toxic_rate": round(float(y[val].mean()), 4)})
        settings = representation_settings(embed_config(cfg), baseline_config(cfg))
        for name in cfg.representations:
            with task.child(name) as metrics:
                filt = ToxicityFilter(name, settings, C=float(cfg.filter.C), max_iter=int(cfg.filter.max_iter),
                                      target=str(cfg.filter.target), target_value=float(cfg.filter.target_value),
                                      prior=float(cfg.split.toxic_rate))
                filt.fit(pick(train), y[train], pick(calib), y[calib])
                scores = filt.predict_proba(pick(val))[:, 1]
                metrics.update(filter_report(y[val], scores, filt.threshold_, int(cfg.bootstrap), seed))
                filt.log_model("toxicity_filter")
                if name == "sae":  # the latents that drive the filter: separation scores and the latent report
                    ranking = rank_toxic_latents(filt.transform(pick(train)), y[train], filt.coef_,
                                                 n=int(cfg.explain_top))
                    mlflow.log_table(ranking, "filter_toxic_latents.json")
                    log_latent_report(filt.representation_, ranking.latent.tolist(), ranking.score.tolist(),
                                      texts=toxic_texts(pick(train), y[train]),
                                      title="detox: toxic latents of the filter")
                results["filters"][name] = dict(metrics)
        if s.enabled:
            results["steering"] = _steering(cfg, pick(train), y[train], prompts, paragraphs)
    return results


def _steering(cfg: DictConfig, texts: list[str], y: np.ndarray, prompts: list[str], paragraphs: list[str]) -> dict:
    """Rank the steering host's toxic latents, then generate and score under every tier and baseline."""
    s, e, seed = cfg.steering, cfg.embed, int(cfg.seed)
    steer_embed = embed_config(cfg, model=str(s.model), sae=str(s.sae), layer=s.layer,
                               max_tokens=int(s.latent_max_tokens))
    host = get_host(steer_embed.model, steer_embed.device)
    prompt_ids(host, prompts, int(s.max_new_tokens))  # too-long prompts fail before any work
    sub_texts, sub_y = stratified_cap(texts, y, int(s.n_latent_docs), seed)
    ranking, probe = find_toxic_latents(sub_texts, sub_y, steer_embed, n=int(s.n_latents),
                                        max_freq_clean=float(s.max_freq_clean))
    emb = probe.representation_.embedder
    mlflow.log_table(ranking, "steering_latents.json")
    mlflow.log_params({"steering_sae": emb.sae.content_hash, "steering_layer": emb.layer,
                       "steering_latents": ranking.latent.tolist()})
    log_latent_report(probe.representation_, ranking.latent.tolist(), ranking.score.tolist(),
                      texts=toxic_texts(sub_texts, sub_y), title=f"detox: steering latents ({s.model})")
    words = toxic_words(texts, y, n=int(s.banned_words))
    mlflow.log_text("\n".join(words), "banned_words.txt")
    conditions = steering_conditions(emb, ranking, s.tiers, str(s.where), sub_texts, sub_y, float(s.diff_means_alpha),
                                     words, host.tokenizer)
    scorers = toxicity_scorers(texts, y)

    table, gens, scores = evaluate_conditions(
        host, conditions, prompts, scorers, paragraphs, toxic_threshold=float(s.toxic_threshold),
        capability_max_tokens=int(s.capability_max_tokens), n_boot=int(cfg.bootstrap), seed=seed,
        max_new_tokens=int(s.max_new_tokens), batch_size=int(s.batch_size), do_sample=bool(s.do_sample),
        temperature=float(s.temperature), top_p=float(s.top_p),
        show_progress_bar=bool(e.show_progress_bar))
    table.insert(0, "description", [c.description for c in conditions])
    examples = examples_table(gens, scores, n=int(s.n_examples), seed=seed)
    generations = pd.DataFrame({"prompt": prompts} | {name: g.continuations for name, g in gens.items()})
    mlflow.log_table(table.reset_index(), "steering_tiers.json")
    mlflow.log_table(examples, "steering_examples.json")
    mlflow.log_table(generations, "steering_generations.json")
    mlflow.log_metrics(steering_metrics(table))
    print_steering(table, examples, list(gens),
                   f"detox: steering tiers ({s.model}, layer {emb.layer}, {len(prompts)} prompts)")
    return {"table": table, "examples": examples, "latents": ranking, "config": to_dict(s)}
