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
import time

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from rich.console import Console
from rich.text import Text
from sklearn.model_selection import train_test_split

from saefeat.config import to_dict
from saefeat.data import DataError
from saefeat.detox.baselines import bad_words_ids, diff_in_means, toxic_words
from saefeat.detox.data import corpus_paragraphs, load_labelled_comments, load_prompts, natural_rate_subsample
from saefeat.detox.evaluate import (
    Condition,
    ProfanityCheckScorer,
    TfidfToxicityScorer,
    evaluate_conditions,
    examples_table,
)
from saefeat.detox.filter import ToxicityFilter
from saefeat.detox.generation import prompt_ids
from saefeat.detox.latents import find_toxic_latents, rank_toxic_latents
from saefeat.detox.steering import SAELatentClamp
from saefeat.embed.embedder import get_host
from saefeat.evaluation.comparison import TaskRun, print_table
from saefeat.evaluation.metrics import classification_report
from saefeat.representations import REPRESENTATIONS

logger = logging.getLogger(__name__)


def check_config(cfg: DictConfig) -> None:
    """Bad settings fail here, before any model is loaded."""
    bad = [r for r in cfg.representations if r not in REPRESENTATIONS]
    if bad:
        raise ValueError(f"representations: unknown {bad}; valid: {', '.join(REPRESENTATIONS)}")
    if cfg.filter.target not in ("precision", "recall"):
        raise ValueError(f"filter.target must be 'precision' or 'recall', got {cfg.filter.target!r}")
    if not 0 < float(cfg.filter.target_value) <= 1:
        raise ValueError(f"filter.target_value must be in (0, 1], got {cfg.filter.target_value}")
    sp = cfg.split
    if not (sp.calib_fraction > 0 and sp.val_fraction > 0 and sp.calib_fraction + sp.val_fraction < 1):
        raise ValueError("split.calib_fraction and split.val_fraction must be positive and sum to less than 1")
    if not 0 < float(sp.toxic_rate) < 1:
        raise ValueError(f"split.toxic_rate must be in (0, 1), got {sp.toxic_rate}")
    s = cfg.steering
    for name, value in s.tiers.items():
        if not isinstance(value, int | float) or value < 0:
            raise ValueError(f"steering.tiers.{name} must be a number >= 0 (clamp to -value x mean activation)")
    if s.where not in ("all", "active"):
        raise ValueError(f"steering.where must be 'all' or 'active', got {s.where!r}")
    for key in ("n_latent_docs", "n_latents", "n_prompts", "max_new_tokens", "batch_size"):
        if int(s[key]) < 1:
            raise ValueError(f"steering.{key} must be at least 1, got {s[key]}")


def _rep_params(cfg: DictConfig) -> dict:
    """Settings of the filter representations (what `representation_from_config` reads), JSON-able."""
    e = cfg.embed
    return {"model": cfg.model.path, "sae": cfg.sae.path, "layer": cfg.model.layer, "pooling": e.pooling,
            "dense_pooling": e.dense_pooling, "sentence_model": e.sentence_model, "k": e.k, "sae_k": cfg.sae.k,
            "window": cfg.model.window, "overlap": e.overlap, "max_tokens": e.max_tokens,
            "batch_size": e.batch_size, "device": e.device, "cache_dir": e.cache_dir,
            "show_progress_bar": e.show_progress_bar, "precision": e.precision, "backend": e.backend,
            "tfidf_max_features": e.tfidf_max_features}


def _split(y: np.ndarray, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / calibration / validation rows; validation subsampled to the natural toxic rate."""
    sp, seed = cfg.split, int(cfg.seed)
    idx = np.arange(len(y))
    rest, val = train_test_split(idx, test_size=float(sp.val_fraction), random_state=seed, stratify=y)
    calib_share = float(sp.calib_fraction) / (1 - float(sp.val_fraction))
    train, calib = train_test_split(rest, test_size=calib_share, random_state=seed, stratify=y[rest])
    val = val[natural_rate_subsample(y[val], float(sp.toxic_rate), seed)]
    for name, rows in (("training", train), ("calibration", calib), ("validation", val)):
        if len(np.unique(y[rows])) < 2:
            raise DataError(f"{cfg.data.comments}: the {name} split holds one class only; use more comments")
    return np.sort(train), np.sort(calib), val


def _cap(texts: list[str], y: np.ndarray, n: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    if n is None or n >= len(texts):
        return texts, y
    keep, _ = train_test_split(np.arange(len(texts)), train_size=int(n), random_state=seed, stratify=y)
    keep = np.sort(keep)
    return [texts[i] for i in keep], y[keep]


def run(cfg: DictConfig) -> dict:
    """`saefeat run task=detox`: filter comparison (child run per representation), then the steering tiers."""
    t0 = time.time()
    check_config(cfg)
    d, s, seed = cfg.data, cfg.steering, int(cfg.seed)
    texts, y = load_labelled_comments(d.comments, d.text_field, d.label_field)
    texts, y = _cap(texts, y, d.max_comments, seed)
    train, calib, val = _split(y, cfg)
    pick = lambda rows: [texts[i] for i in rows]  # noqa: E731
    prompts = paragraphs = None
    if s.enabled:  # read and check everything the steering needs before any model runs
        prompts = load_prompts(d.prompts)
        rng = np.random.default_rng(seed)
        prompts = [prompts[i] for i in sorted(rng.choice(len(prompts), min(int(s.n_prompts), len(prompts)),
                                                         replace=False))]
        paragraphs = corpus_paragraphs(d.corpus, int(s.n_capability_texts), seed=seed) \
            if int(s.n_capability_texts) > 0 else []
    logger.info("detox: %d training, %d calibration, %d validation comments (validation toxic rate %.3f)",
                len(train), len(calib), len(val), y[val].mean())
    results: dict = {"filters": {}}
    with TaskRun(cfg) as task:
        mlflow.log_params({"n_train": len(train), "n_calib": len(calib), "n_val": len(val),
                           "val_toxic_rate": round(float(y[val].mean()), 4)})
        for name in cfg.representations:
            with task.representation(name, {"representation": name}) as metrics:
                t_rep = time.time()
                filt = ToxicityFilter(name, _rep_params(cfg), C=float(cfg.filter.C), max_iter=int(cfg.filter.max_iter),
                                      target=str(cfg.filter.target), target_value=float(cfg.filter.target_value),
                                      prior=float(cfg.split.toxic_rate))
                filt.fit(pick(train), y[train], pick(calib), y[calib])
                scores = filt.predict_proba(pick(val))[:, 1]
                flagged = (scores >= filt.threshold_).astype(int)
                metrics.update(classification_report(y[val], scores, flagged, n_boot=int(cfg.bootstrap), seed=seed))
                metrics["precision"] = float(y[val][flagged == 1].mean()) if flagged.any() else float("nan")
                metrics["recall"] = float(flagged[y[val] == 1].mean())
                metrics["threshold"] = filt.threshold_
                metrics["seconds"] = time.time() - t_rep
                filt.log_model("toxicity_filter")
                if name == "sae":
                    _explain_filter(filt, pick(train), y[train], int(cfg.explain_top))
                results["filters"][name] = dict(metrics)
        if s.enabled:
            results["steering"] = _steering(cfg, pick(train), y[train], prompts, paragraphs)
        mlflow.log_metric("wall_seconds", time.time() - t0)
    return results


def _explain_filter(filt: ToxicityFilter, texts: list[str], y: np.ndarray, top: int) -> None:
    """Log the latents that drive the sae filter: separation scores and the latent report."""
    ranking = rank_toxic_latents(filt.transform(texts), y, filt.coef_, n=top)
    mlflow.log_table(ranking, "filter_toxic_latents.json")
    _latent_report(filt, ranking, texts, y, "detox: toxic latents of the filter")


def _latent_report(probe: ToxicityFilter, ranking: pd.DataFrame, texts: list[str], y: np.ndarray, title: str) -> None:
    try:
        from saefeat.explain.report import log_latent_report
    except ImportError:  # explanations are optional for a task run
        logger.warning("saefeat.explain is unavailable; skipping the latent report")
        return
    toxic = [t for t, label in zip(texts, y) if label == 1][:500]  # contexts are looked for in toxic comments
    log_latent_report(probe.representation_, ranking.latent.tolist(), ranking.score.tolist(), texts=toxic,
                      title=title)


def _steering(cfg: DictConfig, texts: list[str], y: np.ndarray, prompts: list[str], paragraphs: list[str]) -> dict:
    """Rank the steering host's toxic latents, then generate and score under every tier and baseline."""
    s, e, seed = cfg.steering, cfg.embed, int(cfg.seed)
    host = get_host(str(s.model), e.device)
    prompt_ids(host, prompts, int(s.max_new_tokens))  # too-long prompts fail before any work
    sub_texts, sub_y = _cap(texts, y, int(s.n_latent_docs), seed)
    embed = {"layer": s.layer, "max_tokens": int(s.latent_max_tokens), "batch_size": e.batch_size,
             "device": e.device, "cache_dir": e.cache_dir, "show_progress_bar": e.show_progress_bar,
             "precision": e.precision, "backend": e.backend}
    ranking, probe = find_toxic_latents(sub_texts, sub_y, model=str(s.model), sae=str(s.sae), n=int(s.n_latents),
                                        max_freq_clean=float(s.max_freq_clean), **embed)
    emb = probe.representation_.embedder
    mlflow.log_table(ranking, "steering_latents.json")
    mlflow.log_params({"steering_sae": emb.sae.content_hash, "steering_layer": emb.layer,
                       "steering_latents": ranking.latent.tolist()})
    _latent_report(probe, ranking, sub_texts, sub_y, f"detox: steering latents ({s.model})")

    latents, ref = ranking.latent.tolist(), ranking.act_toxic.to_numpy()
    conditions = [Condition("none", description="no intervention")]
    for tier, mult in s.tiers.items():
        clamp = SAELatentClamp(emb.sae, latents, value=(-float(mult) * ref).tolist(), where=str(s.where))
        conditions.append(Condition(tier, clamp, description=f"clamp {len(latents)} latents to -{mult} x mean toxic "
                                                             f"activation ({s.where} positions)"))
    conditions.append(Condition("diff_in_means", diff_in_means(emb, sub_texts, sub_y, float(s.diff_means_alpha)),
                                description=f"add {s.diff_means_alpha} x (mean clean - mean toxic) at layer "
                                            f"{emb.layer}"))
    words = toxic_words(texts, y, n=int(s.banned_words))
    mlflow.log_text("\n".join(words), "banned_words.txt")
    conditions.append(Condition("banned_words", bad_words_ids=bad_words_ids(host.tokenizer, words),
                                description=f"{len(words)} words banned at decode time"))

    scorers = []
    if ProfanityCheckScorer.available():
        scorers.append(ProfanityCheckScorer())
    else:
        logger.warning("alt-profanity-check is not installed (pip install 'saefeat[detox]'); its scores are skipped")
    scorers.append(TfidfToxicityScorer().fit(texts, y))

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
    mlflow.log_metrics({f"steer_{cond}_{col}": float(v) for cond, row in table.drop(columns="description").iterrows()
                        for col, v in row.items() if not col.endswith(("_lo", "_hi")) and np.isfinite(v)})
    console = Console(width=max(Console().width, 200))
    shown = [c for c in table.columns if c != "description" and not c.endswith("_share_change")]
    print_table(table[shown], f"detox: steering tiers ({s.model}, layer {emb.layer}, {len(prompts)} prompts)",
                console)
    _print_examples(examples, list(gens), console)
    return {"table": table, "examples": examples, "latents": ranking, "config": to_dict(s)}


def _print_examples(examples: pd.DataFrame, conditions: list[str], console: Console) -> None:
    score = {c: next((k for k in examples.columns if k.startswith(f"{c}_")), None) for c in conditions}
    width = max(map(len, conditions))
    console.print("[bold]detox: example continuations[/] (toxicity by the first scorer in brackets)")
    for _, row in examples.iterrows():
        console.print(Text(f"prompt: {row['prompt']}", style="bold"))
        for c in conditions:
            tox = f"[{row[score[c]]:.2f}]" if score[c] else ""
            console.print(Text(f"  {c:<{width}} {tox} {row[c]!r}"))
