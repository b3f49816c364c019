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
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import mlflow
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from saefeat.evaluation.comparison import TaskRun, plot_comparison
from saefeat.representations import representation_from_config
from saefeat.shortcut.attribution import BiasOnlyModel, shortcut_token_table
from saefeat.shortcut.data import Benchmark, PairedDataset, load_benchmark
from saefeat.shortcut.dbr import DBRClassifier, DBRFineTuner
from saefeat.shortcut.detect import ShortcutDetector, latent_positions
from saefeat.shortcut.jsd import jsd_from_log_probs
from saefeat.shortcut.masking import MASKINGS, mask_texts
from saefeat.shortcut.selection import (
    SELECT_ON,
    accuracy_report,
    choose_best,
    choose_largest_within,
    selection_accuracy,
    stratified_slice,
)

logger = logging.getLogger(__name__)
console = Console()

METHODS = ("erm", "dbr_ig", "dbr_sae")
MODES = ("head", "finetune")
REPRESENTATIONS = ("sae", "dense")


def check_config(cfg: DictConfig) -> None:
    """Every choice of the config is checked before data or models are loaded."""
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise ValueError(f"methods must be a non-empty list from {METHODS}; got {list(cfg.methods)}")
    bad = [r for r in cfg.representations if r not in REPRESENTATIONS]
    if bad or not cfg.representations:
        raise ValueError(f"the shortcut task compares representations from {REPRESENTATIONS}; "
                         f"got {list(cfg.representations)}")
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if cfg.masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {cfg.masking!r}")
    if cfg.select.data not in SELECT_ON:
        raise ValueError(f"select.data must be one of {SELECT_ON}, got {cfg.select.data!r}")
    if any(float(v) <= 0 for v in cfg.dbr.lambdas) or not cfg.dbr.lambdas:
        raise ValueError(f"dbr.lambdas must be positive numbers, got {list(cfg.dbr.lambdas)}")


def load_data(cfg: DictConfig) -> Benchmark:
    bench = load_benchmark(str(cfg.benchmark), cfg.data_dir, dict(cfg.paths), use_pairs=bool(cfg.detect.use_pairs))
    seed = int(cfg.seed)
    bench.train = bench.train.head(cfg.max_train, seed)
    bench.in_domain = bench.in_domain.head(cfg.max_eval, seed)
    bench.ood = {k: v.head(cfg.max_eval, seed) for k, v in bench.ood.items()}
    if bench.pairs is not None and cfg.max_train is not None:  # keep the pairs of the sampled originals
        keep = set(bench.train.texts)
        idx = [i for i, t in enumerate(bench.pairs.original.texts) if t in keep]
        bench.pairs = PairedDataset(bench.pairs.original.subset(idx), bench.pairs.counterfactual.subset(idx),
                                    [bench.pairs.pair_ids[i] for i in idx])
    return bench


# ---- shortcut tokens ---------------------------------------------------------------------------------------

@dataclass
class Masks:
    """Shortcut token positions per training text, their weights (for soft masking) and the masked copies."""

    positions: list[list[int]]
    weights: list[list[float]]
    texts: list[str]

    def summary(self, prefix: str) -> dict[str, float]:
        n = np.array([len(p) for p in self.positions])
        return {f"{prefix}_masked_text_fraction": float((n > 0).mean()),
                f"{prefix}_mean_shortcut_tokens": float(n.mean())}


def ig_masks(cfg: DictConfig, texts: list[str], y: np.ndarray, eval_texts: list[str],
             y_eval: np.ndarray) -> tuple[Masks, dict[str, float], pd.DataFrame]:
    """DBR's shortcut tokens: the top IG tokens of a bias-only model toward each example's gold label."""
    c = cfg.ig
    bias = BiasOnlyModel(cfg.model.path, hidden=int(c.hidden), epochs=int(c.epochs), max_tokens=int(c.max_tokens),
                         seed=int(cfg.seed), device="cpu").fit(texts, y)
    attrs = bias.attribute(texts, y, n_steps=int(c.n_steps), baseline=str(c.baseline),
                           show_progress_bar=bool(cfg.embed.show_progress_bar))
    positions = [a.top(int(c.top_k)) for a in attrs]
    weights = []
    for a, pos in zip(attrs, positions):
        top = max((a.scores[p] for p in pos), default=1.0)
        weights.append([float(a.scores[p] / top) for p in pos])
    masked = mask_texts(texts, positions, bias.host.tokenizer, str(cfg.masking), weights, int(cfg.seed))
    info = {"bias_model_train_accuracy": float((bias.predict_proba(texts).argmax(1) == y).mean()),
            "bias_model_in_domain_accuracy": float((bias.predict_proba(eval_texts).argmax(1) == y_eval).mean()),
            "ig_mean_abs_delta": float(np.mean([abs(a.delta) for a in attrs]))}
    return Masks(positions, weights, masked), info, shortcut_token_table(attrs, positions)


def sae_masks(cfg: DictConfig, bench: Benchmark, y: np.ndarray, sae_rep, X_train) -> tuple[Masks, ShortcutDetector]:
    """saefeat's extension: tokens where the detected shortcut latents fire."""
    d = cfg.detect
    pairs = None
    if bench.pairs is not None and len(bench.pairs):  # sum pooling: every edited mention counts
        emb, e = sae_rep.embedder, cfg.embed
        pairs = tuple(emb.encode(side.texts, int(e.batch_size), bool(e.show_progress_bar), pooling="sum")
                      for side in (bench.pairs.original, bench.pairs.counterfactual))
        pairs += (bench.pairs.original.y(bench.classes), bench.pairs.counterfactual.y(bench.classes))
    det = ShortcutDetector(n_candidates=int(d.n_candidates), n_latents=int(d.n_latents), criterion=str(d.criterion),
                           min_invariance=float(d.min_invariance), min_surface=float(d.min_surface),
                           contexts_per_latent=int(d.contexts_per_latent), seed=int(cfg.seed),
                           show_progress_bar=bool(cfg.embed.show_progress_bar))
    det.fit(X_train, y, bench.train.texts, sae_rep.embedder, pairs=pairs)
    positions, weights = latent_positions(det.store_, X_train, det.shortcut_latents_,
                                          show_progress_bar=bool(cfg.embed.show_progress_bar))
    masked = mask_texts(bench.train.texts, positions, sae_rep.embedder.host.tokenizer, str(cfg.masking), weights,
                        int(cfg.seed))
    return Masks(positions, weights, masked), det


# ---- training and evaluation -------------------------------------------------------------------------------

class HeadTrainer:
    """Mode `head`: DBRClassifier on frozen features of each text and of its masked copies."""

    def __init__(self, cfg: DictConfig, rep, texts: dict[str, list[str]], masked: dict[str, list[str]]):
        self.cfg = cfg
        self.X = {part: rep.transform(t) for part, t in texts.items()}
        self.X_masked = {m: rep.transform(t) for m, t in masked.items()}
        self.weight_decays = [float(w) for w in cfg.head.weight_decays]

    def fit(self, rows: np.ndarray, y: np.ndarray, lam: float, weight_decay: float, method: str | None):
        h = self.cfg.head
        Xm = self.X_masked[method][rows] if method else None
        clf = DBRClassifier(lam=lam if method else 0.0, hidden=int(h.hidden), weight_decay=weight_decay,
                            epochs=int(h.epochs), lr=float(h.lr), seed=int(self.cfg.seed))
        return clf.fit(self.X["train"][rows], y[rows], Xm)

    def predict(self, model, part: str, rows: np.ndarray | None = None) -> np.ndarray:
        X = self.X[part] if rows is None else self.X[part][rows]
        return model.predict(X)

    def reliance(self, model, method: str) -> float:
        return float(model.divergence(self.X["train"], self.X_masked[method]).mean())


class FineTuneTrainer:
    """Mode `finetune`: the host encoder and a head, fine-tuned on texts and their masked copies (a GPU job)."""

    def __init__(self, cfg: DictConfig, rep_name: str, texts: dict[str, list[str]], masked: dict[str, list[str]]):
        self.cfg, self.rep_name, self.texts, self.masked = cfg, rep_name, texts, masked
        self.weight_decays = [0.0]

    def fit(self, rows: np.ndarray, y: np.ndarray, lam: float, weight_decay: float, method: str | None):
        f = self.cfg.finetune
        model = DBRFineTuner(self.cfg.model.path, self.rep_name, str(self.cfg.sae.path), self.cfg.model.layer,
                             lam=lam if method else 0.0, lr=float(f.lr), head_lr=float(f.head_lr),
                             epochs=int(f.epochs), batch_size=int(f.batch_size), max_tokens=int(f.max_tokens),
                             max_steps=f.max_steps, device=self.cfg.embed.device, seed=int(self.cfg.seed),
                             show_progress_bar=bool(self.cfg.embed.show_progress_bar))
        masked = [self.masked[method][i] for i in rows] if method else None
        return model.fit([self.texts["train"][i] for i in rows], y[rows], masked)

    def predict(self, model, part: str, rows: np.ndarray | None = None) -> np.ndarray:
        t = self.texts[part] if rows is None else [self.texts[part][i] for i in rows]
        return model.predict(t)

    def reliance(self, model, method: str) -> float:
        p = np.log(np.clip(model.predict_proba(self.texts["train"]), 1e-12, 1))
        q = np.log(np.clip(model.predict_proba(self.masked[method]), 1e-12, 1))
        return float(jsd_from_log_probs(torch.as_tensor(p), torch.as_tensor(q)).mean())


@dataclass
class Fitted:
    model: object
    params: dict[str, float]
    selection: pd.DataFrame


def select_and_fit(trainer, y: dict[str, np.ndarray], cfg: DictConfig, method: str | None,
                   erm_choice: tuple[float, float] | None) -> Fitted:
    """Choose (ERM: weight decay; DBR: λ at ERM's weight decay) on in-domain selection data, refit on all."""
    n = len(y["train"])
    on = str(cfg.select.data)
    held = stratified_slice(y["train"], float(cfg.select.train_slice), int(cfg.seed)) if on != "dev" \
        else np.array([], dtype=np.int64)
    fit_rows = np.setdiff1d(np.arange(n), held)

    def score(model) -> float:
        preds, targets = {}, {}
        if on in ("dev", "both"):
            preds["in_domain"], targets["in_domain"] = trainer.predict(model, "in_domain"), y["in_domain"]
        if on in ("train_slice", "both"):
            preds["slice"], targets["slice"] = trainer.predict(model, "train", held), y["train"][held]
        return selection_accuracy(lambda p: preds[p], targets, list(preds))

    if method is None:
        scores = {wd: score(trainer.fit(fit_rows, y["train"], 0.0, wd, None)) for wd in trainer.weight_decays}
        sel = choose_best(scores)
        params = {"weight_decay": sel.value, "lambda": 0.0, "select_accuracy": sel.scores[sel.value]}
        final = trainer.fit(np.arange(n), y["train"], 0.0, sel.value, None)
        table = pd.DataFrame({"weight_decay": list(scores), "select_accuracy": list(scores.values())})
    else:
        wd, reference = erm_choice
        scores = {float(lam): score(trainer.fit(fit_rows, y["train"], float(lam), wd, method))
                  for lam in cfg.dbr.lambdas}
        sel = choose_largest_within(scores, reference, float(cfg.select.tolerance))
        params = {"weight_decay": wd, "lambda": sel.value, "select_accuracy": sel.scores[sel.value]}
        final = trainer.fit(np.arange(n), y["train"], sel.value, wd, method)
        table = pd.DataFrame({"lambda": list(scores), "select_accuracy": list(scores.values())})
    return Fitted(final, params, table)


def evaluate(trainer, fitted: Fitted, y: dict[str, np.ndarray], ood_names: list[str], masks: dict[str, Masks],
             n_boot: int, seed: int) -> dict[str, float]:
    m = trainer.predict
    out = accuracy_report(y["in_domain"], m(fitted.model, "in_domain"), "in_domain", n_boot, seed)
    ood_pred = {name: m(fitted.model, f"ood:{name}") for name in ood_names}
    if len(ood_names) > 1:
        for name in ood_names:
            out |= accuracy_report(y[f"ood:{name}"], ood_pred[name], f"ood_{name}", n_boot, seed)
    out |= accuracy_report(np.concatenate([y[f"ood:{k}"] for k in ood_names]),
                           np.concatenate([ood_pred[k] for k in ood_names]), "ood", n_boot, seed)
    out["gap"] = out["in_domain_accuracy"] - out["ood_accuracy"]
    out["lambda"] = float(fitted.params["lambda"])
    for name in masks:  # mean JSD(p(x) || p(x̃)) on training texts: reliance on each kind of shortcut token
        out[f"reliance_{name.removeprefix('dbr_')}"] = trainer.reliance(fitted.model, name)
    return out


def _print_tokens(ig_table: pd.DataFrame | None, det: ShortcutDetector | None, classes: list[str]) -> None:
    if ig_table is not None and len(ig_table):
        t = Table(title="IG shortcut tokens (bias-only model), most frequent")
        for col in ("token", "n_examples", "mean_attribution"):
            t.add_column(col)
        for _, r in ig_table.head(15).iterrows():
            t.add_row(str(r.token), str(r.n_examples), f"{r.mean_attribution:.3f}")
        console.print(t)
    if det is not None:
        t = Table(title=f"SAE shortcut latents (criterion: {det.criterion_})")
        for col in ("latent", "score", "contribution", "invariance", "surface", "favors", "top tokens"):
            t.add_column(col)
        for _, r in det.scores_[det.scores_.is_shortcut].head(len(det.shortcut_latents_)).iterrows():
            t.add_row(str(r.latent), f"{r.score:.3f}", f"{r.contribution:.3f}", f"{r.invariance:.2f}",
                      f"{r.surface:.2f}", classes[int(r.favored_class)], str(r.top_tokens))
        console.print(t)


def _log_examples(texts: list[str], masks: Masks, name: str, n: int = 25) -> None:
    rows = [i for i, p in enumerate(masks.positions) if p][:n]
    mlflow.log_table(pd.DataFrame({"original": [texts[i] for i in rows], "masked": [masks.texts[i] for i in rows]}),
                     f"masked_examples_{name}.json")


def run(cfg: DictConfig) -> dict:
    """`saefeat run task=shortcut`: one parent run, a child run per method x representation."""
    t0 = time.time()
    check_config(cfg)
    bench = load_data(cfg)
    classes = bench.classes
    y = {"train": bench.train.y(classes), "in_domain": bench.in_domain.y(classes)}
    texts = {"train": bench.train.texts, "in_domain": bench.in_domain.texts}
    for name, ds in bench.ood.items():
        y[f"ood:{name}"], texts[f"ood:{name}"] = ds.y(classes), ds.texts
    ood_names = list(bench.ood)
    methods, reps = list(cfg.methods), list(cfg.representations)
    seed, n_boot = int(cfg.seed), int(cfg.bootstrap)
    logger.info("shortcut/%s: %d training texts, in-domain %d, out-of-domain %s", bench.name, len(bench.train),
                len(bench.in_domain), {k: len(v) for k, v in bench.ood.items()})
    results: dict[str, dict[str, float]] = {}
    with TaskRun(cfg, run_name=f"shortcut-{bench.name}-{cfg.model.path}") as task:
        mlflow.log_params({"n_train": len(bench.train), "n_in_domain": len(bench.in_domain),
                           **{f"n_ood_{k}": len(v) for k, v in bench.ood.items()}, "classes": ",".join(classes)})
        built = {name: representation_from_config(name, cfg) for name in reps}
        masks: dict[str, Masks] = {}
        ig_table, det = None, None
        if "dbr_ig" in methods:
            t = time.time()
            masks["dbr_ig"], info, ig_table = ig_masks(cfg, texts["train"], y["train"], texts["in_domain"],
                                                       y["in_domain"])
            mlflow.log_metrics(info | masks["dbr_ig"].summary("ig") | {"ig_seconds": time.time() - t})
            mlflow.log_table(ig_table, "ig_shortcut_tokens.json")
            _log_examples(texts["train"], masks["dbr_ig"], "ig")
        sae_rep = built["sae"] if "sae" in built else representation_from_config("sae", cfg)
        X_sae_train = None
        if "dbr_sae" in methods:
            t = time.time()
            X_sae_train = sae_rep.transform(texts["train"])
            masks["dbr_sae"], det = sae_masks(cfg, bench, y["train"], sae_rep, X_sae_train)
            mlflow.log_metrics(masks["dbr_sae"].summary("sae") | {"detect_seconds": time.time() - t,
                                                                   "n_shortcut_latents": len(det.shortcut_latents_)})
            mlflow.log_table(det.scores_, "shortcut_latents.json")
            _log_examples(texts["train"], masks["dbr_sae"], "sae")
        _print_tokens(ig_table, det, classes)
        masked_texts = {m: k.texts for m, k in masks.items()}
        for rep_name in reps:
            t_rep = time.time()
            logger.info("shortcut: %s features of %d texts and %d masked copies", rep_name,
                        sum(map(len, texts.values())), sum(map(len, masked_texts.values())))
            trainer = HeadTrainer(cfg, built[rep_name], texts, masked_texts) if cfg.mode == "head" \
                else FineTuneTrainer(cfg, rep_name, texts, masked_texts)
            mlflow.log_metric(f"{rep_name}_features_seconds", time.time() - t_rep)
            t_m = time.time()
            erm = select_and_fit(trainer, y, cfg, None, None)
            erm_choice = (erm.params["weight_decay"], erm.params["select_accuracy"])
            for method in methods:
                if method != "erm":
                    t_m = time.time()
                fitted = erm if method == "erm" else select_and_fit(trainer, y, cfg, method, erm_choice)
                child = f"{method}/{rep_name}"
                with task.representation(child, {"method": method, "representation": rep_name, "mode": cfg.mode,
                                                 "masking": cfg.masking, **fitted.params}) as metrics:
                    metrics.update(evaluate(trainer, fitted, y, ood_names, masks, n_boot, seed))
                    metrics["seconds"] = time.time() - t_m  # selection and fit (features excluded)
                    mlflow.log_table(fitted.selection, "selection.json")
                    if method == "dbr_sae" and rep_name == "sae" and det is not None and det.shortcut_latents_:
                        _latent_report(sae_rep, det, texts["train"], int(cfg.explain_top))
                results[child] = dict(metrics)
        table = task.table()
        mlflow.log_figure(plot_comparison(table, ["in_domain_accuracy", "ood_accuracy"]), "accuracy.png")
        for rep_name in reps:
            base = results.get(f"erm/{rep_name}")
            for method in methods:
                if base and method != "erm":
                    r = results[f"{method}/{rep_name}"]
                    mlflow.log_metrics({
                        f"ood_gain_{method}_{rep_name}": r["ood_accuracy"] - base["ood_accuracy"],
                        f"in_domain_change_{method}_{rep_name}": r["in_domain_accuracy"] - base["in_domain_accuracy"]})
        mlflow.log_metric("seconds", time.time() - t0)
    logger.info("shortcut task finished in %.0f s", time.time() - t0)
    return results


def _latent_report(sae_rep, det: ShortcutDetector, texts: list[str], top: int) -> None:
    try:
        from saefeat.explain.report import log_latent_report
    except ImportError:  # the explain package is optional here
        logger.warning("saefeat.explain is not available: shortcut latents are logged as a table only")
        return
    chosen = det.scores_[det.scores_.latent.isin(det.shortcut_latents_)].head(top)
    log_latent_report(sae_rep, chosen.latent.tolist(), chosen.score.tolist(), texts=texts, title="shortcut latents")

