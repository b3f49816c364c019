"""Choosing steering settings on a selection half of the prompts, apart from the half every reported number comes
from: the candidate grid, the prompt split and the rule that picks one setting per fluency budget."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from saefeat.errors import SaefeatError

logger = logging.getLogger(__name__)

VECTOR_METHODS = ("diff_in_means", "sdcv", "ssv")


@dataclass(frozen=True)
class ClampSetting:
    """Clamp the top `n_latents` latents of ranking `rank_by` to -value x their mean toxic activation."""

    value: float
    where: str
    n_latents: int
    rank_by: str

    @property
    def name(self) -> str:
        return f"clamp:{self.rank_by}:n{self.n_latents}:{self.where}:-{self.value:g}"


@dataclass(frozen=True)
class VectorSetting:
    """Add alpha x a steering vector (`method`: one of VECTOR_METHODS) at every position."""

    method: str
    alpha: float

    @property
    def name(self) -> str:
        return f"{self.method}:{self.alpha:g}"


def split_prompts(prompts: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """A seeded split into (selection, evaluation) prompts, each in the original order; `fraction` goes to
    selection."""
    if not 0 < float(fraction) < 1:
        raise SaefeatError(f"steering.selection.fraction must be in (0, 1), got {fraction}")
    n_sel = round(len(prompts) * float(fraction))
    if n_sel < 1 or n_sel >= len(prompts):
        raise SaefeatError(f"{len(prompts)} prompts cannot be split into selection and evaluation halves at "
                           f"fraction {fraction}; use more prompts (steering.n_prompts)")
    sel = set(np.random.default_rng(seed).permutation(len(prompts))[:n_sel].tolist())
    return [p for i, p in enumerate(prompts) if i in sel], [p for i, p in enumerate(prompts) if i not in sel]


def clamp_grid(values: Sequence[float], where: Sequence[str], n_latents: Sequence[int],
               rank_by: Sequence[str]) -> list[ClampSetting]:
    """Every combination of the clamp settings tried on the selection half."""
    return [ClampSetting(float(v), str(w), int(n), str(r))
            for r, n, w, v in itertools.product(rank_by, n_latents, where, values)]


def vector_grid(methods: Sequence[str], alphas: Sequence[float]) -> list[VectorSetting]:
    bad = [m for m in methods if m not in VECTOR_METHODS]
    if bad:
        raise SaefeatError(f"unknown steering vector method(s) {bad}; valid: {', '.join(VECTOR_METHODS)}")
    return [VectorSetting(str(m), float(a)) for m in methods for a in alphas]


def fluency_cost(table: pd.DataFrame) -> pd.Series:
    """The larger of two relative perplexity increases against the unsteered row: of the continuations (under
    the unsteered model) and of held-out text under the steered model (NaN when not measured counts as 0)."""
    cols = [c for c in ("ppl_change", "capability_ppl_change") if c in table]
    return table[cols].fillna(0.0).max(axis=1)


def choose(table: pd.DataFrame, candidates: Sequence[str], budget: float, scorer: str) -> str | None:
    """The rule: among `candidates` (rows of the selection table) whose fluency cost is at most `budget`, the one
    with the lowest mean toxicity by `scorer`; None when none is within budget."""
    col = f"{scorer}_mean"
    if col not in table:
        raise SaefeatError(f"steering.selection.scorer={scorer!r} did not score the selection half; "
                           f"scored: {sorted(c[:-5] for c in table if c.endswith('_mean'))}")
    rows = table.loc[list(candidates)]
    ok = rows[fluency_cost(rows) <= float(budget)]
    if ok.empty:
        return None
    return str(ok[col].idxmin())


def select_settings(table: pd.DataFrame, clamps: Sequence[ClampSetting], vectors: Sequence[VectorSetting],
                    budgets: Mapping[str, float], vector_budget: str, scorer: str) -> dict[str, str]:
    """{condition name: selection-table row} for the evaluation: one clamp setting per tier (its budget) and one
    strength per vector method (the `vector_budget` tier's budget). A tier or method with nothing within budget
    is left out, with a warning."""
    chosen: dict[str, str] = {}
    for tier, budget in budgets.items():
        pick = choose(table, [c.name for c in clamps], budget, scorer)
        if pick is None:
            logger.warning("steering tier %s: no clamp setting within a fluency cost of %.2f on the selection half",
                           tier, budget)
        else:
            chosen[tier] = pick
    for method in dict.fromkeys(v.method for v in vectors):
        pick = choose(table, [v.name for v in vectors if v.method == method], budgets[vector_budget], scorer)
        if pick is None:
            logger.warning("steering %s: no strength within a fluency cost of %.2f on the selection half", method,
                           budgets[vector_budget])
        else:
            chosen[method] = pick
    return chosen
