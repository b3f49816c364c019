"""The detox experiment: score a toxicity filter at its threshold, build the steering conditions (clamp settings,
steering vectors, banned words), the independent scorers, and the metrics and printout of the steering tables."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.text import Text

from saefeat.detox.baselines import bad_words_ids
from saefeat.detox.evaluate import Condition, ProfanityCheckScorer, TfidfToxicityScorer
from saefeat.detox.latents import RANK_RULES
from saefeat.detox.selection import VECTOR_METHODS, ClampSetting, VectorSetting
from saefeat.detox.steering import SAELatentClamp, VectorSteering
from saefeat.errors import SaefeatError
from saefeat.evaluation.comparison import print_table
from saefeat.evaluation.metrics import classification_report

logger = logging.getLogger(__name__)

STEERING_COUNTS = ("n_latent_docs", "n_prompts", "n_nontoxic_prompts", "ssv_latents", "max_new_tokens", "batch_size")
SCORERS = ("tfidf", "profanity")
VECTOR_DESCRIPTIONS = {"diff_in_means": "mean clean - mean toxic residual",
                       "sdcv": "mean clean - mean toxic SAE reconstruction (SDCV)",
                       "ssv": "vector learned in the span of the top toxic latents' decoder rows (SAE-SSV)"}


def check_settings(representations: Sequence[str], valid_representations: Sequence[str], filter_target: str,
                   filter_target_value: float, calib_fraction: float, val_fraction: float, toxic_rate: float,
                   steering: Mapping[str, Any]) -> None:
    """Refuse settings the experiment cannot run (a ValueError naming the setting), before any model is loaded.

    `steering` holds the steering settings as plain values (the `selection` section and the counts of
    STEERING_COUNTS).
    """
    bad = [r for r in representations if r not in valid_representations]
    if bad:
        raise SaefeatError(f"representations: unknown {bad}; valid: {', '.join(valid_representations)}")
    if filter_target not in ("precision", "recall"):
        raise SaefeatError(f"filter.target must be 'precision' or 'recall', got {filter_target!r}")
    if not 0 < float(filter_target_value) <= 1:
        raise SaefeatError(f"filter.target_value must be in (0, 1], got {filter_target_value}")
    if not (calib_fraction > 0 and val_fraction > 0 and calib_fraction + val_fraction < 1):
        raise SaefeatError("split.calib_fraction and split.val_fraction must be positive and sum to less than 1")
    if not 0 < float(toxic_rate) < 1:
        raise SaefeatError(f"split.toxic_rate must be in (0, 1), got {toxic_rate}")
    sel = steering["selection"]
    budgets = sel["budgets"]
    if not budgets:
        raise SaefeatError("steering.selection.budgets: give at least one tier (name: largest fluency cost)")
    for name, value in budgets.items():
        if not isinstance(value, int | float) or value < 0:
            raise SaefeatError(f"steering.selection.budgets.{name} must be a number >= 0 (a relative perplexity "
                               f"increase), got {value!r}")
    if sel["vector_budget"] not in budgets:
        raise SaefeatError(f"steering.selection.vector_budget={sel['vector_budget']!r} is not a tier of "
                           f"steering.selection.budgets ({', '.join(budgets)})")
    if not 0 < float(sel["fraction"]) < 1:
        raise SaefeatError(f"steering.selection.fraction must be in (0, 1), got {sel['fraction']}")
    if sel["scorer"] not in SCORERS:
        raise SaefeatError(f"steering.selection.scorer must be one of {', '.join(SCORERS)}, got {sel['scorer']!r}")
    checks = {"clamp_values": lambda v: isinstance(v, int | float) and v >= 0,
              "where": lambda v: v in ("all", "active"),
              "n_latents": lambda v: isinstance(v, int) and v >= 1,
              "rank_by": lambda v: v in RANK_RULES,
              "vector_methods": lambda v: v in VECTOR_METHODS,
              "alphas": lambda v: isinstance(v, int | float) and v > 0}
    for key, ok in checks.items():
        values = list(sel[key])
        bad = [v for v in values if not ok(v)]
        if not values or bad:
            raise SaefeatError(f"steering.selection.{key}: {'empty' if not values else f'bad value(s) {bad}'}; "
                               f"{_GRID_HELP[key]}")
    for key in STEERING_COUNTS:
        if int(steering[key]) < 1:
            raise SaefeatError(f"steering.{key} must be at least 1, got {steering[key]}")


_GRID_HELP = {"clamp_values": "clamp values >= 0 (x mean toxic activation)", "where": "all or active",
              "n_latents": "counts >= 1", "rank_by": f"one of {', '.join(RANK_RULES)}",
              "vector_methods": f"one of {', '.join(VECTOR_METHODS)}", "alphas": "strengths > 0"}


def filter_report(y_true: np.ndarray, scores: np.ndarray, threshold: float, n_boot: int = 1000,
                  seed: int = 0) -> dict[str, float]:
    """`classification_report` of a filter that flags scores >= `threshold`, with its precision, recall and
    threshold (precision is NaN when nothing is flagged)."""
    y_true = np.asarray(y_true)
    flagged = (np.asarray(scores) >= threshold).astype(int)
    out = classification_report(y_true, scores, flagged, n_boot=n_boot, seed=seed)
    out["precision"] = float(y_true[flagged == 1].mean()) if flagged.any() else float("nan")
    out["recall"] = float(flagged[y_true == 1].mean())
    out["threshold"] = threshold
    return out


def toxic_texts(texts: Sequence[str], labels: Sequence[int], n: int = 500) -> list[str]:
    """The first `n` texts labelled toxic (1): where a latent report looks for contexts of toxic latents."""
    return [t for t, label in zip(texts, labels) if label == 1][:n]


def clamp_condition(name: str, embedder: Any, ranking: pd.DataFrame, setting: ClampSetting) -> Condition:
    """Clamp the top `setting.n_latents` latents of `ranking` (columns `latent`, mean toxic activation
    `act_toxic`) to -value x that activation, at all or active positions."""
    top = ranking.head(setting.n_latents)
    values = (-setting.value * top.act_toxic.to_numpy()).tolist()
    clamp = SAELatentClamp(embedder.sae, top.latent.tolist(), value=values, where=setting.where)
    return Condition(name, clamp, description=f"clamp the top {len(top)} latents ({setting.rank_by} ranking) to "
                                              f"-{setting.value:g} x mean toxic activation ({setting.where} positions)",
                     params={"setting": setting.name})


def vector_condition(name: str, vector: VectorSteering, setting: VectorSetting) -> Condition:
    """Add `setting.alpha` x `vector` (built at alpha 1) at every position of its layer."""
    steering = VectorSteering(vector.vector, vector.layer, setting.alpha)
    return Condition(name, steering, description=f"add {setting.alpha:g} x {VECTOR_DESCRIPTIONS[setting.method]} at "
                                                 f"layer {vector.layer}", params={"setting": setting.name})


def banned_words_condition(words: Sequence[str], tokenizer: Any) -> Condition:
    """Ban `words` at decode time, as the steered host's `tokenizer` writes them."""
    return Condition("banned_words", bad_words_ids=bad_words_ids(tokenizer, words),
                     description=f"{len(words)} words banned at decode time")


def toxicity_scorers(texts: Sequence[str], labels: Sequence[int]) -> list:
    """Scorers that share nothing with the SAE: alt-profanity-check where installed, and TF-IDF + logistic
    regression fitted on the labelled texts."""
    scorers: list = []
    if ProfanityCheckScorer.available():
        scorers.append(ProfanityCheckScorer())
    else:
        logger.warning("alt-profanity-check is not installed (pip install 'saefeat[detox]'); its scores are skipped")
    scorers.append(TfidfToxicityScorer().fit(texts, labels))
    return scorers


def steering_metrics(table: pd.DataFrame, prefix: str = "steer") -> dict[str, float]:
    """`<prefix>_<condition>_<column>` for every finite value of a steering table (intervals and text left out)."""
    return {f"{prefix}_{cond}_{col}": float(v) for cond, row in table.drop(columns="description").iterrows()
            for col, v in row.items() if not col.endswith(("_lo", "_hi")) and np.isfinite(v)}


def print_steering(table: pd.DataFrame, examples: pd.DataFrame, conditions: Sequence[str], title: str,
                   console: Console | None = None) -> None:
    """The steering table (without relative share changes), then the example continuations of each condition
    with the first scorer's toxicity in brackets."""
    console = console or Console(width=max(Console().width, 200))
    shown = [c for c in table.columns if c != "description" and not c.endswith("_share_change")]
    print_table(table[shown], title, console)
    score = {c: next((k for k in examples.columns if k.startswith(f"{c}_")), None) for c in conditions}
    width = max(map(len, conditions))
    console.print("[bold]detox: example continuations[/] (toxicity by the first scorer in brackets)")
    for _, row in examples.iterrows():
        console.print(Text(f"prompt: {row['prompt']}", style="bold"))
        for c in conditions:
            tox = f"[{row[score[c]]:.2f}]" if score[c] else ""
            console.print(Text(f"  {c:<{width}} {tox} {row[c]!r}"))
