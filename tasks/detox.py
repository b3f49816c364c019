"""Toxicity filters on SAE features and SAE-based detoxifying steering ("Breaking Bad Tokens", arXiv 2505.14536).

Part 1 compares toxicity filters over the `sae`, `dense`, `sae_sentence`, `sentence` and `tfidf` representations on
Jigsaw comments: a logistic regression per representation, its threshold chosen on a calibration split for a target
precision at the natural toxic rate, and ROC-AUC / PR-AUC on a validation split subsampled to that rate.
Part 2 ranks the toxic latents of the steering host's SAE (smollm2 by default) and steers generation from
challenging RealToxicityPrompts prompts. The prompts are split (seeded) into a selection half and an evaluation
half: on the selection half every candidate (clamp settings, and strengths of three steering vectors: difference
in means, SDCV, SAE-SSV) is scored, and `steering.selection`'s rule picks one clamp setting per fluency budget (the
tiers) and one strength per vector. Only those, beside no intervention and banned words, are reported, on the
evaluation half and on non-toxic prompts. Continuations are scored by classifiers that share nothing with the
SAE; fluency is the unsteered model's perplexity of the continuation, and a capability check compares perplexity
on held-out book paragraphs (separate paragraphs for selection and evaluation).
"""

from __future__ import annotations

import dataclasses
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
from saefeat.detox.evaluate import Condition, evaluate_conditions, examples_table
from saefeat.detox.experiment import (
    banned_words_condition,
    check_settings,
    clamp_condition,
    filter_report,
    print_steering,
    steering_metrics,
    toxic_texts,
    toxicity_scorers,
    vector_condition,
)
from saefeat.detox.filter import ToxicityFilter, representation_settings
from saefeat.detox.generation import prompt_ids
from saefeat.detox.latents import find_toxic_latents, rank_toxic_latents
from saefeat.detox.selection import clamp_grid, fluency_cost, select_settings, split_prompts, vector_grid
from saefeat.detox.vectors import diff_in_means, sdcv, ssv
from saefeat.evaluation.comparison import TaskRun
from saefeat.evaluation.model_selection import check_penalty, check_regularization
from saefeat.explain.report import log_latent_report
from saefeat.hosts import get_host
from saefeat.representations import REPRESENTATIONS

logger = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Bad settings fail here, before any model is loaded."""
    sp = cfg.split
    check_settings(list(cfg.representations), REPRESENTATIONS, cfg.filter.target, cfg.filter.target_value,
                   sp.calib_fraction, sp.val_fraction, sp.toxic_rate, to_dict(cfg.steering))
    check_regularization(cfg.filter.C, "filter.C")
    for side in ("sae", "baselines"):
        check_penalty(cfg.filter.penalty[side], f"filter.penalty.{side}")


def run(cfg: DictConfig) -> dict:
    """`saefeat run task=detox`: filter comparison (child run per representation), then the steering tiers."""
    check_config(cfg)
    d, s, seed = cfg.data, cfg.steering, int(cfg.seed)
    texts, y = load_labelled_comments(d.comments, d.text_field, d.label_field)
    texts, y = stratified_cap(texts, y, d.max_comments, seed)
    sp = cfg.split
    train, calib, val = split_comments(y, sp.calib_fraction, sp.val_fraction, sp.toxic_rate, seed, str(d.comments))
    pick = lambda rows: [texts[i] for i in rows]  # noqa: E731
    prompts = nontoxic = paragraphs = None
    if s.enabled:  # read and check everything the steering needs before any model runs
        prompts = sample_prompts(load_prompts(d.prompts), int(s.n_prompts), seed)
        nontoxic = sample_prompts(load_prompts(d.nontoxic_prompts), int(s.n_nontoxic_prompts), seed)
        prompts = split_prompts(prompts, float(s.selection.fraction), seed)  # (selection, evaluation)
        paragraphs = corpus_paragraphs(d.corpus, 2 * int(s.n_capability_texts), seed=seed) \
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
                penalty = cfg.filter.penalty["sae" if name == "sae" else "baselines"]
                filt = ToxicityFilter(name, settings, C=check_regularization(cfg.filter.C),
                                      penalty=list(check_penalty(penalty)), max_iter=int(cfg.filter.max_iter),
                                      target=str(cfg.filter.target), target_value=float(cfg.filter.target_value),
                                      prior=float(cfg.split.toxic_rate))
                filt.fit(pick(train), y[train], pick(calib), y[calib])
                mlflow.log_params({"filter_C": filt.C_, "filter_penalty": filt.penalty_})  # as CV chose from grids
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
            results["steering"] = _steering(cfg, pick(train), y[train], prompts, nontoxic, paragraphs)
    return results


def _steering(cfg: DictConfig, texts: list[str], y: np.ndarray, prompts: tuple[list[str], list[str]],
              nontoxic: list[str], paragraphs: list[str]) -> dict:
    """Rank the steering host's toxic latents, build the candidate settings, choose one per tier and method on the
    selection half of the prompts, then report every chosen condition on the evaluation half and on non-toxic
    prompts."""
    s, sel, seed = cfg.steering, cfg.steering.selection, int(cfg.seed)
    steer_embed = embed_config(cfg, model=str(s.model), sae=str(s.sae), layer=s.layer,
                               max_tokens=int(s.latent_max_tokens))
    host = get_host(steer_embed.model, steer_embed.device)
    sel_prompts, eval_prompts = prompts
    prompt_ids(host, sel_prompts + eval_prompts + nontoxic, int(s.max_new_tokens))  # too long: fail before any work
    half = len(paragraphs) // 2
    sel_paragraphs, eval_paragraphs = paragraphs[:half], paragraphs[half:]
    mlflow.log_params({"steering_n_selection_prompts": len(sel_prompts), "steering_n_eval_prompts": len(eval_prompts),
                       "steering_n_nontoxic_prompts": len(nontoxic)})
    logger.info("detox steering: %d selection and %d evaluation prompts (seed %d), %d non-toxic prompts",
                len(sel_prompts), len(eval_prompts), seed, len(nontoxic))

    sub_texts, sub_y = stratified_cap(texts, y, int(s.n_latent_docs), seed)
    n_rank = max(max(int(n) for n in sel.n_latents), int(s.ssv_latents))
    rankings, probe = find_toxic_latents(sub_texts, sub_y, steer_embed, n=n_rank,
                                         max_freq_clean=float(s.max_freq_clean), rank_by=list(sel.rank_by))
    emb = probe.representation_.embedder
    for rule, ranking in rankings.items():
        mlflow.log_table(ranking, f"steering_latents_{rule}.json")
    first = rankings[str(sel.rank_by[0])]
    mlflow.log_params({"steering_sae": emb.sae.content_hash, "steering_layer": emb.layer})
    log_latent_report(probe.representation_, first.latent.tolist(), first.score.tolist(),
                      texts=toxic_texts(sub_texts, sub_y), title=f"detox: steering latents ({s.model})")
    words = toxic_words(texts, y, n=int(s.banned_words))
    mlflow.log_text("\n".join(words), "banned_words.txt")
    vectors = {"diff_in_means": lambda: diff_in_means(emb, sub_texts, sub_y),
               "sdcv": lambda: sdcv(emb, sub_texts, sub_y),
               "ssv": lambda: ssv(emb, sub_texts, sub_y, first.latent.head(int(s.ssv_latents)).tolist(), seed=seed)}
    base_vectors = {m: vectors[m]() for m in sel.vector_methods}
    clamps = clamp_grid(list(sel.clamp_values), list(sel.where), list(sel.n_latents), list(sel.rank_by))
    strengths = vector_grid(list(sel.vector_methods), list(sel.alphas))
    scorers = toxicity_scorers(texts, y)
    gen_kwargs = dict(toxic_threshold=float(s.toxic_threshold), capability_max_tokens=int(s.capability_max_tokens),
                      seed=seed, max_new_tokens=int(s.max_new_tokens), batch_size=int(s.batch_size),
                      do_sample=bool(s.do_sample), temperature=float(s.temperature), top_p=float(s.top_p),
                      show_progress_bar=bool(cfg.embed.show_progress_bar))

    candidates = [Condition("none", description="no intervention")]
    candidates += [clamp_condition(c.name, emb, rankings[c.rank_by], c) for c in clamps]
    candidates += [vector_condition(v.name, base_vectors[v.method], v) for v in strengths]
    logger.info("detox steering: %d candidate settings on the selection half", len(candidates) - 1)
    sel_table, _, _ = evaluate_conditions(host, candidates, sel_prompts, scorers, sel_paragraphs, n_boot=200,
                                          **gen_kwargs)
    sel_table.insert(0, "description", [c.description for c in candidates])
    sel_table["fluency_cost"] = fluency_cost(sel_table)
    chosen = select_settings(sel_table, clamps, strengths, dict(sel.budgets), str(sel.vector_budget),
                             str(sel.scorer))
    sel_table["chosen_for"] = [", ".join(k for k, v in chosen.items() if v == name) for name in sel_table.index]
    mlflow.log_table(sel_table.reset_index(), "steering_selection.json")
    mlflow.log_params({f"steering_chosen_{k}": v for k, v in chosen.items()})

    by_name = {c.name: c for c in candidates}
    conditions = [candidates[0]] + [dataclasses.replace(by_name[row], name=name) for name, row in chosen.items()]
    conditions.append(banned_words_condition(words, host.tokenizer))
    results = {"selection": sel_table, "chosen": chosen, "latents": rankings, "config": to_dict(s)}
    # (label, prompts, capability paragraphs, artifact prefix, metric prefix, results key prefix)
    sets = (("the evaluation half of the challenging prompts", eval_prompts, eval_paragraphs, "steering", "steer", ""),
            ("non-toxic prompts", nontoxic, [], "steering_nontoxic", "steer_nontoxic", "nontoxic_"))
    for label, prompt_set, paras, artifact, metric, key in sets:
        table, gens, scores = evaluate_conditions(host, conditions, prompt_set, scorers, paras,
                                                  n_boot=int(cfg.bootstrap), **gen_kwargs)
        table.insert(0, "description", [c.description for c in conditions])
        examples = examples_table(gens, scores, n=int(s.n_examples), seed=seed)
        generations = pd.DataFrame({"prompt": prompt_set} | {name: g.continuations for name, g in gens.items()})
        mlflow.log_table(table.reset_index(), f"{artifact}_tiers.json")
        mlflow.log_table(examples, f"{artifact}_examples.json")
        mlflow.log_table(generations, f"{artifact}_generations.json")
        mlflow.log_metrics(steering_metrics(table, metric))
        print_steering(table, examples, list(gens),
                       f"detox: steering on {label} ({s.model}, layer {emb.layer}, "
                       f"{len(prompt_set)} prompts; settings chosen on {len(sel_prompts)} other prompts)")
        results[f"{key}table"], results[f"{key}examples"] = table, examples
    return results
