"""The DBR experiment: masked copies from shortcut tokens, a trainer per mode, the choice of L2 and λ on in-domain
data only, and the evaluation of a fitted model (in-domain and out-of-domain accuracy, their gap, reliance).

A trainer hides whether the classifier is a head on frozen features (`HeadTrainer`) or a fine-tuned encoder
(`FineTuneTrainer`): `select_and_fit` and `evaluate` only call its `fit`, `predict` and `reliance`.
Data parts are named `train`, `in_domain` and `ood:<name>`, the same keys in the texts and the labels.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlflow
import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from saefeat.errors import SaefeatError
from saefeat.shortcut.attribution import BiasOnlyModel, shortcut_token_table
from saefeat.shortcut.data import PairedDataset
from saefeat.shortcut.dbr import DBRClassifier, DBRFineTuner
from saefeat.shortcut.detect import ShortcutDetector, TokenActivationStore, latent_positions
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

METHODS = ("erm", "dbr_ig", "dbr_sae")
MODES = ("head", "finetune")
REPRESENTATIONS = ("sae", "dense")


def check_settings(methods: Sequence[str], representations: Sequence[str], mode: str, masking: str,
                   select_on: str, lambdas: Sequence[float]) -> None:
    """Refuse settings the experiment cannot run (a ValueError naming the setting), before any work."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SaefeatError(f"methods must be a non-empty list from {METHODS}; got {list(methods)}")
    bad = [r for r in representations if r not in REPRESENTATIONS]
    if bad or not representations:
        raise SaefeatError(f"the shortcut task compares representations from {REPRESENTATIONS}; "
                         f"got {list(representations)}")
    if mode not in MODES:
        raise SaefeatError(f"mode must be one of {MODES}, got {mode!r}")
    if masking not in MASKINGS:
        raise SaefeatError(f"masking must be one of {MASKINGS}, got {masking!r}")
    if select_on not in SELECT_ON:
        raise SaefeatError(f"select.data must be one of {SELECT_ON}, got {select_on!r}")
    if any(float(v) <= 0 for v in lambdas) or not lambdas:
        raise SaefeatError(f"dbr.lambdas must be positive numbers, got {list(lambdas)}")


# ---- shortcut tokens and masked copies ---------------------------------------------------------------------


@dataclass
class Masks:
    """Shortcut token positions per training text, their weights (for soft masking) and the masked copies."""

    positions: list[list[int]]
    weights: list[list[float]]
    texts: list[str]

    def summary(self, prefix: str) -> dict[str, float]:
        """Share of texts with a masked token and mean shortcut tokens per text, keys prefixed."""
        n = np.array([len(p) for p in self.positions])
        return {f"{prefix}_masked_text_fraction": float((n > 0).mean()),
                f"{prefix}_mean_shortcut_tokens": float(n.mean())}


def ig_masks(texts: list[str], y: np.ndarray, eval_texts: list[str], y_eval: np.ndarray, model: str, *,
             hidden: int = 64, epochs: int = 10, max_tokens: int = 512, n_steps: int = 32, baseline: str = "mean",
             top_k: int = 5, masking: str = "hard", seed: int = 0,
             show_progress_bar: bool = False) -> tuple[Masks, dict[str, float], pd.DataFrame]:
    """DBR's shortcut tokens: the `top_k` IG tokens of a bias-only model (on host `model`) toward the gold label.

    Returns the masks, the bias model's accuracies and IG's mean completeness error, and the token table.
    """
    bias = BiasOnlyModel(model, hidden=hidden, epochs=epochs, max_tokens=max_tokens, seed=seed,
                         device="cpu").fit(texts, y)
    attrs = bias.attribute(texts, y, n_steps=n_steps, baseline=baseline, show_progress_bar=show_progress_bar)
    positions = [a.top(top_k) for a in attrs]
    weights = []
    for a, pos in zip(attrs, positions):
        top = max((a.scores[p] for p in pos), default=1.0)
        weights.append([float(a.scores[p] / top) for p in pos])
    masked = mask_texts(texts, positions, bias.host.tokenizer, masking, weights, seed)
    info = {"bias_model_train_accuracy": float((bias.predict_proba(texts).argmax(1) == y).mean()),
            "bias_model_in_domain_accuracy": float((bias.predict_proba(eval_texts).argmax(1) == y_eval).mean()),
            "ig_mean_abs_delta": float(np.mean([abs(a.delta) for a in attrs]))}
    return Masks(positions, weights, masked), info, shortcut_token_table(attrs, positions)


def sae_masks(detector: ShortcutDetector, embedder: Any, texts: list[str], y: np.ndarray, *, pooling: str = "max",
              masking: str = "hard", seed: int = 0, pairs: PairedDataset | None = None, classes: Sequence[str] = (),
              batch_size: int = 32, show_progress_bar: bool = False) -> Masks:
    """saefeat's extension: the tokens where the shortcut latents found by `detector` (fitted here) fire.

    With an embedding cache, the training texts are read token by token once: that pass also caches their pooled
    features (`pooling`), which the detector ranks latents on, so detection and masking cost one forward pass over
    them (without a cache, only the texts the detector reads are read token by token). pairs:
    counterfactual pairs of training texts (labels as indices into `classes`), sum-pooled so that every edited
    mention counts.
    """
    store = TokenActivationStore(embedder, texts)
    if getattr(embedder, "cache_root", None) is not None:
        store.prefetch(range(len(texts)), show_progress_bar, "training tokens", cache_pooled=True)
    X = embedder.encode(texts, batch_size, show_progress_bar, pooling=pooling)
    features = None
    if pairs is not None and len(pairs):
        features = tuple(embedder.encode(side.texts, batch_size, show_progress_bar, pooling="sum")
                         for side in (pairs.original, pairs.counterfactual))
        features += (pairs.original.y(classes), pairs.counterfactual.y(classes))
    detector.fit(X, y, texts, embedder, pairs=features, store=store)
    positions, weights = latent_positions(store, X, detector.shortcut_latents_, show_progress_bar=show_progress_bar)
    masked = mask_texts(texts, positions, embedder.host.tokenizer, masking, weights, seed)
    return Masks(positions, weights, masked)


# ---- trainers ----------------------------------------------------------------------------------------------


class Trainer(Protocol):
    """What model selection and evaluation need of a mode: fit on training rows, predict a part, reliance."""

    weight_decays: list[float]

    def fit(self, rows: np.ndarray, y: np.ndarray, lam: float, weight_decay: float, method: str | None) -> Any:
        """A model fitted on training `rows` (labels `y[rows]`); `method` names the masked copies (None: ERM)."""

    def predict(self, model: Any, part: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Predicted labels of a data part (or of some of its rows)."""

    def reliance(self, model: Any, method: str) -> float:
        """Mean JSD(p(x) || p(x̃)) over the training texts and their copies masked by `method`."""


class HeadTrainer:
    """Mode `head`: a DBRClassifier on frozen features (`rep.transform`) of each text and of its masked copies."""

    def __init__(self, rep: Any, texts: dict[str, list[str]], masked: dict[str, list[str]],
                 weight_decays: Sequence[float], hidden: int = 0, epochs: int = 300, lr: float = 1e-2, seed: int = 0):
        self.X = {part: rep.transform(t) for part, t in texts.items()}
        self.X_masked = {m: rep.transform(t) for m, t in masked.items()}
        self.weight_decays = [float(w) for w in weight_decays]
        self.hidden, self.epochs, self.lr, self.seed = hidden, epochs, lr, seed

    def fit(self, rows: np.ndarray, y: np.ndarray, lam: float, weight_decay: float,
            method: str | None) -> DBRClassifier:
        Xm = self.X_masked[method][rows] if method else None
        clf = DBRClassifier(lam=lam if method else 0.0, hidden=self.hidden, weight_decay=weight_decay,
                            epochs=self.epochs, lr=self.lr, seed=self.seed)
        return clf.fit(self.X["train"][rows], y[rows], Xm)

    def predict(self, model: DBRClassifier, part: str, rows: np.ndarray | None = None) -> np.ndarray:
        X = self.X[part] if rows is None else self.X[part][rows]
        return model.predict(X)

    def reliance(self, model: DBRClassifier, method: str) -> float:
        return float(model.divergence(self.X["train"], self.X_masked[method]).mean())


class FineTuneTrainer:
    """Mode `finetune`: the host encoder and a head, fine-tuned on texts and their masked copies (CPU or CUDA).

    `settings` are DBRFineTuner's arguments except `lam`; L2 is not searched (weight decay 0). Reliance is
    measured on a seeded sample of `reliance_rows` training texts (all when None): each is a forward pass.
    """

    def __init__(self, texts: dict[str, list[str]], masked: dict[str, list[str]], reliance_rows: int | None = 400,
                 **settings: Any):
        self.texts, self.masked, self.settings = texts, masked, settings
        self.weight_decays = [0.0]
        n = len(texts["train"])
        rows = np.arange(n)
        if reliance_rows is not None and reliance_rows < n:
            rows = np.sort(np.random.default_rng(settings.get("seed", 0)).choice(n, reliance_rows, replace=False))
        self.reliance_rows = rows
        self._train_proba: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # p(x) on those rows, per model

    def fit(self, rows: np.ndarray, y: np.ndarray, lam: float, weight_decay: float,
            method: str | None) -> DBRFineTuner:
        model = DBRFineTuner(**self.settings, lam=lam if method else 0.0)
        masked = [self.masked[method][i] for i in rows] if method else None
        return model.fit([self.texts["train"][i] for i in rows], y[rows], masked)

    def predict(self, model: DBRFineTuner, part: str, rows: np.ndarray | None = None) -> np.ndarray:
        t = self.texts[part] if rows is None else [self.texts[part][i] for i in rows]
        return model.predict(t)

    def reliance(self, model: DBRFineTuner, method: str) -> float:
        rows = self.reliance_rows
        if model not in self._train_proba:
            self._train_proba[model] = model.predict_proba([self.texts["train"][i] for i in rows])
        p = np.log(np.clip(self._train_proba[model], 1e-12, 1))
        q = np.log(np.clip(model.predict_proba([self.masked[method][i] for i in rows]), 1e-12, 1))
        return float(jsd_from_log_probs(torch.as_tensor(p), torch.as_tensor(q)).mean())


# ---- selection and evaluation ------------------------------------------------------------------------------


@dataclass
class Fitted:
    """The model refitted on all training rows, the chosen settings and what selection tried."""

    model: Any
    params: dict[str, float]
    selection: pd.DataFrame


def select_and_fit(trainer: Trainer, y: dict[str, np.ndarray], method: str | None = None,
                   erm_choice: tuple[float, float] | None = None, *, select_on: str = "both",
                   train_slice: float = 0.2, lambdas: Sequence[float] = (1.0,), tolerance: float = 0.01,
                   refit: bool = True, seed: int = 0) -> Fitted:
    """Choose on in-domain selection data, then refit on all training rows (`refit`; else the chosen candidate,
    fitted without the held-out slice, is the model: one fit fewer per method, which fine-tuning needs on a CPU).
    When nothing is held out (`select_on="dev"`) the candidates were fitted on every row and none is refitted.

    ERM (`method` None) takes the weight decay of `trainer.weight_decays` with the best selection accuracy;
    DBR keeps ERM's weight decay and takes the largest λ of `lambdas` whose accuracy is within `tolerance` of
    ERM's (`erm_choice` = (weight decay, selection accuracy)). Selection data (`select_on`): `dev` (the
    in-domain set), `train_slice` (a stratified `train_slice` share of training rows held out) or `both`.
    """
    n = len(y["train"])
    held = stratified_slice(y["train"], train_slice, seed) if select_on != "dev" else np.array([], dtype=np.int64)
    fit_rows = np.setdiff1d(np.arange(n), held)

    def score(model: Any) -> float:
        preds, targets = {}, {}
        if select_on in ("dev", "both"):
            preds["in_domain"], targets["in_domain"] = trainer.predict(model, "in_domain"), y["in_domain"]
        if select_on in ("train_slice", "both"):
            preds["slice"], targets["slice"] = trainer.predict(model, "train", held), y["train"][held]
        return selection_accuracy(lambda p: preds[p], targets, list(preds))

    candidates: dict[float, Any] = {}

    def tried(value: float, lam: float, wd: float) -> float:
        candidates[value] = trainer.fit(fit_rows, y["train"], lam, wd, method)
        return score(candidates[value])

    if method is None:
        scores = {wd: tried(wd, 0.0, wd) for wd in trainer.weight_decays}
        sel = choose_best(scores)
        wd, lam = sel.value, 0.0
        table = pd.DataFrame({"weight_decay": list(scores), "select_accuracy": list(scores.values())})
    else:
        if erm_choice is None:
            raise SaefeatError("DBR's λ is chosen against ERM: pass erm_choice=(weight decay, selection accuracy)")
        wd, reference = erm_choice
        scores = {float(v): tried(float(v), float(v), wd) for v in lambdas}
        sel = choose_largest_within(scores, reference, tolerance)
        lam = sel.value
        table = pd.DataFrame({"lambda": list(scores), "select_accuracy": list(scores.values())})
    params = {"weight_decay": wd, "lambda": lam, "select_accuracy": sel.scores[sel.value]}
    # with nothing held out, the candidate was already fitted on every row: a refit would repeat that fit
    refit = refit and len(held) > 0
    final = trainer.fit(np.arange(n), y["train"], lam, wd, method) if refit else candidates[sel.value]
    return Fitted(final, params, table)


def evaluate(trainer: Trainer, fitted: Fitted, y: dict[str, np.ndarray], ood_names: Sequence[str],
             reliance_on: Iterable[str], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """In-domain and out-of-domain accuracy (per set when there are several, and pooled) with bootstrap 95%
    intervals, their gap, and `reliance_<kind>` for each masking method in `reliance_on`."""
    m = trainer.predict
    out = accuracy_report(y["in_domain"], m(fitted.model, "in_domain"), "in_domain", n_boot, seed)
    ood_pred = {name: m(fitted.model, f"ood:{name}") for name in ood_names}
    if len(ood_names) > 1:
        for name in ood_names:
            out |= accuracy_report(y[f"ood:{name}"], ood_pred[name], f"ood_{name}", n_boot, seed)
    out |= accuracy_report(np.concatenate([y[f"ood:{k}"] for k in ood_names]),
                           np.concatenate([ood_pred[k] for k in ood_names]), "ood", n_boot, seed)
    out["gap"] = out["in_domain_accuracy"] - out["ood_accuracy"]
    for name in reliance_on:  # mean JSD(p(x) || p(x̃)) on training texts: reliance on each kind of shortcut token
        out[f"reliance_{name.removeprefix('dbr_')}"] = trainer.reliance(fitted.model, name)
    return out


def method_gains(results: dict[str, dict[str, float]], methods: Sequence[str],
                 representations: Sequence[str]) -> dict[str, float]:
    """Out-of-domain gain and in-domain change of each DBR method over ERM, per representation.

    `results` is keyed `<method>/<representation>`; representations without an ERM result are skipped.
    """
    out: dict[str, float] = {}
    for rep in representations:
        base = results.get(f"erm/{rep}")
        for method in methods:
            if base and method != "erm":
                r = results[f"{method}/{rep}"]
                out[f"ood_gain_{method}_{rep}"] = r["ood_accuracy"] - base["ood_accuracy"]
                out[f"in_domain_change_{method}_{rep}"] = r["in_domain_accuracy"] - base["in_domain_accuracy"]
    return out


# ---- reporting ---------------------------------------------------------------------------------------------


def print_shortcuts(ig_table: pd.DataFrame | None, detector: ShortcutDetector | None, classes: Sequence[str],
                    console: Console | None = None) -> None:
    """Print the most frequent IG shortcut tokens and the SAE shortcut latents (where each was found)."""
    console = console or Console()
    if ig_table is not None and len(ig_table):
        t = Table(title="IG shortcut tokens (bias-only model), most frequent")
        for col in ("token", "n_examples", "mean_attribution"):
            t.add_column(col)
        for _, r in ig_table.head(15).iterrows():
            t.add_row(str(r.token), str(r.n_examples), f"{r.mean_attribution:.3f}")
        console.print(t)
    if detector is not None:
        t = Table(title=f"SAE shortcut latents (criterion: {detector.criterion_})")
        for col in ("latent", "score", "contribution", "invariance", "surface", "favors", "top tokens"):
            t.add_column(col)
        scores = detector.scores_
        for _, r in scores[scores.is_shortcut].head(len(detector.shortcut_latents_)).iterrows():
            t.add_row(str(r.latent), f"{r.score:.3f}", f"{r.contribution:.3f}", f"{r.invariance:.2f}",
                      f"{r.surface:.2f}", classes[int(r.favored_class)], str(r.top_tokens))
        console.print(t)


def log_masked_examples(texts: Sequence[str], masks: Masks, name: str, n: int = 25) -> None:
    """Log the first `n` texts with a masked token beside their masked copy (`masked_examples_<name>.json`)."""
    rows = [i for i, p in enumerate(masks.positions) if p][:n]
    mlflow.log_table(pd.DataFrame({"original": [texts[i] for i in rows], "masked": [masks.texts[i] for i in rows]}),
                     f"masked_examples_{name}.json")
