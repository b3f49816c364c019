"""The detox experiment: score a toxicity filter at its threshold, build the steering conditions (clamping tiers
and the two baselines), the independent scorers, and the metrics and printout of the steering table."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.text import Text

from saefeat.detox.baselines import bad_words_ids, diff_in_means
from saefeat.detox.evaluate import Condition, ProfanityCheckScorer, TfidfToxicityScorer
from saefeat.detox.steering import SAELatentClamp
from saefeat.errors import SaefeatError
from saefeat.evaluation.comparison import print_table
from saefeat.evaluation.metrics import classification_report

logger = logging.getLogger(__name__)

STEERING_COUNTS = ("n_latent_docs", "n_latents", "n_prompts", "max_new_tokens", "batch_size")


def check_settings(representations: Sequence[str], valid_representations: Sequence[str], filter_target: str,
                   filter_target_value: float, calib_fraction: float, val_fraction: float, toxic_rate: float,
                   steering: Mapping[str, Any]) -> None:
    """Refuse settings the experiment cannot run (a ValueError naming the setting), before any model is loaded.

    `steering` holds the steering settings as plain values (tiers, where and the counts of STEERING_COUNTS).
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
    for name, value in steering["tiers"].items():
        if not isinstance(value, int | float) or value < 0:
            raise SaefeatError(f"steering.tiers.{name} must be a number >= 0 (clamp to -value x mean activation)")
    if steering["where"] not in ("all", "active"):
        raise SaefeatError(f"steering.where must be 'all' or 'active', got {steering['where']!r}")
    for key in STEERING_COUNTS:
        if int(steering[key]) < 1:
            raise SaefeatError(f"steering.{key} must be at least 1, got {steering[key]}")


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


def steering_conditions(embedder: Any, ranking: pd.DataFrame, tiers: Mapping[str, float], where: str,
                        texts: Sequence[str], labels: Sequence[int], diff_means_alpha: float,
                        banned_words: Sequence[str], tokenizer: Any) -> list[Condition]:
    """The steering table's rows: no intervention, one clamping tier per `tiers` entry, and the baselines.

    ranking: the toxic latents (`latent`, mean activation on toxic text `act_toxic`); tier `name: k` clamps
    each to -k x that activation (`where`: all or active positions). The difference-in-means vector is taken
    on `texts`/`labels` at the embedder's layer; `banned_words` are banned at decode time (as `tokenizer`
    writes them, the steered host's).
    """
    latents, ref = ranking.latent.tolist(), ranking.act_toxic.to_numpy()
    conditions = [Condition("none", description="no intervention")]
    for tier, mult in tiers.items():
        clamp = SAELatentClamp(embedder.sae, latents, value=(-float(mult) * ref).tolist(), where=where)
        conditions.append(Condition(tier, clamp, description=f"clamp {len(latents)} latents to -{mult} x mean toxic "
                                                             f"activation ({where} positions)"))
    conditions.append(Condition("diff_in_means", diff_in_means(embedder, texts, labels, diff_means_alpha),
                                description=f"add {diff_means_alpha} x (mean clean - mean toxic) at layer "
                                            f"{embedder.layer}"))
    conditions.append(Condition("banned_words", bad_words_ids=bad_words_ids(tokenizer, banned_words),
                                description=f"{len(banned_words)} words banned at decode time"))
    return conditions


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


def steering_metrics(table: pd.DataFrame) -> dict[str, float]:
    """`steer_<condition>_<column>` for every finite value of the steering table (intervals and text left out)."""
    return {f"steer_{cond}_{col}": float(v) for cond, row in table.drop(columns="description").iterrows()
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
