"""Scoring steered generations: toxicity by independent scorers, fluency and a capability check."""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from saefeat.detox.filter import ToxicityFilter
from saefeat.detox.generation import Generations, generate
from saefeat.detox.steering import Intervention, steer
from saefeat.errors import SaefeatError
from saefeat.evaluation.metrics import bootstrap
from saefeat.hosts import HostModel

logger = logging.getLogger(__name__)


class ProfanityCheckScorer:
    """Probability of offensive language from `alt-profanity-check` (a linear SVM shipped in its wheel)."""

    name = "profanity"

    @staticmethod
    def available() -> bool:
        return importlib.util.find_spec("profanity_check") is not None

    def __init__(self):
        if not self.available():
            raise ImportError("alt-profanity-check is not installed: pip install 'saefeat[detox]'")
        from profanity_check import predict_prob

        self._predict = predict_prob

    def score(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        return np.asarray(self._predict(texts), dtype=float) if texts else np.zeros(0)


class TfidfToxicityScorer:
    """A TF-IDF + logistic regression toxicity classifier, fitted on labelled comments (e.g. Jigsaw)."""

    name = "tfidf"

    def __init__(self, C: float = 1.0):
        self.C = C

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> TfidfToxicityScorer:
        self.filter_ = ToxicityFilter("tfidf", C=self.C).fit(texts, labels)
        return self

    def score(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        return self.filter_.predict_proba(texts)[:, 1] if texts else np.zeros(0)


@torch.no_grad()
def continuation_nll(host: HostModel, prompt_ids: Sequence[list[int]], continuation_ids: Sequence[list[int]],
                     batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Summed negative log-likelihood and token count of each continuation given its prompt.

    Runs `host.model` as it is (inside `steer(...)` the steered model, outside it the plain one).
    """
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, continuation_ids)]
    nll, count = np.zeros(len(seqs)), np.array([len(c) for c in continuation_ids])
    order = [i for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if count[i] > 0]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, att = host.pad_batch([seqs[i] for i in batch])
        logits = host.model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        tok_nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        for r, i in enumerate(batch):
            p = len(prompt_ids[i])
            nll[i] = float(tok_nll[r, p - 1:p - 1 + count[i]].sum())
    return nll, count


def perplexity(nll: np.ndarray, count: np.ndarray) -> float:
    """exp(total NLL / total tokens)."""
    total = int(np.sum(count))
    return math.exp(float(np.sum(nll)) / total) if total else float("nan")


def text_perplexity(host: HostModel, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 8) -> float:
    """Perplexity of `host.model` on texts (each cut to `max_tokens` tokens), read after a BOS token."""
    ids = [x[:max_tokens] for x in host.tokenize(list(texts))]
    bos = [host.wrap([])[0] for _ in ids]
    return perplexity(*continuation_nll(host, bos, ids, batch_size))


@dataclass
class Condition:
    """One row of the steering table: an intervention on the residual stream and/or banned words."""

    name: str
    intervention: Intervention | None = None
    bad_words_ids: list[list[int]] | None = None
    description: str = ""
    params: dict = field(default_factory=dict)


def evaluate_conditions(host: HostModel, conditions: Sequence[Condition], prompts: Sequence[str], scorers: Sequence,
                        capability_texts: Sequence[str] = (), toxic_threshold: float = 0.5,
                        capability_max_tokens: int = 128, n_boot: int = 1000, seed: int = 0,
                        **gen_kwargs) -> tuple[pd.DataFrame, dict[str, Generations], dict[str, dict[str, np.ndarray]]]:
    """Generate under each condition and score the continuations.

    Per condition: mean toxicity per scorer (with a bootstrap 95% interval over prompts) and the share of
    continuations at or above `toxic_threshold`; `ppl`, the perplexity of the continuations under the
    unsteered model (fluency); `capability_ppl`, the steered model's perplexity on held-out text; `changed`, the
    share of continuations that differ from the first condition's (the unsteered baseline); and the relative
    change of each score against that first condition.
    Returns (table indexed by condition, generations, scores[condition][scorer]).
    """
    if not conditions:
        raise SaefeatError("no conditions to evaluate")
    rows: dict[str, dict[str, float]] = {}
    gens: dict[str, Generations] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    capability_cache: dict[int, float] = {}
    for cond in conditions:
        with steer(host, cond.intervention):
            g = generate(host, prompts, bad_words_ids=cond.bad_words_ids, seed=seed,
                         desc=f"generate [{cond.name}]", **gen_kwargs)
            cap = float("nan")
            if capability_texts:
                key = id(cond.intervention)  # decode-time bans leave the model itself unchanged
                if key not in capability_cache:
                    capability_cache[key] = text_perplexity(host, capability_texts, capability_max_tokens)
                cap = capability_cache[key]
        gens[cond.name] = g
        row: dict[str, float] = {}
        scores[cond.name] = {}
        for scorer in scorers:
            s = scorer.score(g.continuations)
            scores[cond.name][scorer.name] = s
            stats = bootstrap({f"{scorer.name}_mean": lambda y, a, b: float(np.mean(a))}, s, s, s, n_boot, seed)
            row |= stats
            row[f"{scorer.name}_share"] = float(np.mean(s >= toxic_threshold))
        row["ppl"] = perplexity(*continuation_nll(host, g.prompt_ids, g.continuation_ids))
        row["capability_ppl"] = cap
        row["mean_tokens"] = float(np.mean([len(c) for c in g.continuation_ids]))
        base_ids = gens[conditions[0].name].continuation_ids
        row["changed"] = float(np.mean([a != b for a, b in zip(g.continuation_ids, base_ids)]))
        rows[cond.name] = row
        logger.info("%s: %s", cond.name, {k: round(v, 4) for k, v in row.items() if not k.endswith(("_lo", "_hi"))})
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("condition")
    base = table.iloc[0]
    for col in [c for c in table.columns if c.endswith("_mean")] + ["ppl", "capability_ppl"]:
        table[f"{col}_change"] = table[col] / base[col] - 1
    return table, gens, scores


def examples_table(gens: dict[str, Generations], scores: dict[str, dict[str, np.ndarray]], n: int = 8,
                   scorer: str | None = None, seed: int = 0) -> pd.DataFrame:
    """Prompts with the continuation under each condition: half the prompts whose unsteered continuation
    scored most toxic, half drawn at random from the rest."""
    names = list(gens)
    base = names[0]
    n_prompts = len(gens[base].prompts)
    scorer = scorer or next(iter(scores[base]), None)
    ranked = np.argsort(-scores[base][scorer], kind="stable") if scorer is not None else np.arange(n_prompts)
    top = [int(i) for i in ranked[: n // 2]]
    rest = [i for i in range(n_prompts) if i not in set(top)]
    rng = np.random.default_rng(seed)
    pick = top + sorted(rng.choice(rest, min(n - len(top), len(rest)), replace=False).tolist())
    rows = []
    for i in pick:
        row = {"prompt": gens[base].prompts[i]}
        for name in names:
            row[name] = gens[name].continuations[i]
            if scorer is not None:
                row[f"{name}_{scorer}"] = round(float(scores[name][scorer][i]), 3)
        rows.append(row)
    return pd.DataFrame(rows)
