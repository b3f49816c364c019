"""Batched generation of continuations with a causal host model (left padding, greedy or seeded sampling)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from saefeat.data import check_texts
from saefeat.errors import SaefeatError
from saefeat.hosts import HostModel


@dataclass
class Generations:
    """Prompts and their continuations; `prompt_ids` start with the BOS token the model saw."""

    prompts: list[str]
    continuations: list[str]
    prompt_ids: list[list[int]]
    continuation_ids: list[list[int]]


def prompt_ids(host: HostModel, prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
    """Token ids of each prompt behind a BOS token; a prompt that cannot fit in the context is an error."""
    if not host.is_causal:
        raise SaefeatError(f"host {host.name!r} is not a causal language model; generation needs one (e.g. smollm2)")
    if isinstance(prompts, str):
        raise SaefeatError("expected a list of prompts, got a single string")
    if max_new_tokens < 1:
        raise SaefeatError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    texts = check_texts(list(prompts), source="prompts", field="prompt")
    ids = [host.wrap(x)[0] for x in host.tokenize(texts)]
    too_long = [(i, len(x)) for i, x in enumerate(ids) if len(x) + max_new_tokens > host.max_length]
    if too_long:
        i, n = too_long[0]
        raise SaefeatError(f"prompt {i} has {n} tokens (with BOS); with max_new_tokens={max_new_tokens} it does not "
                         f"fit the {host.max_length}-token context of {host.name!r} "
                         f"({len(too_long)} prompt(s) too long, e.g. rows {[j for j, _ in too_long[:10]]})")
    return ids


@torch.no_grad()
def generate(host: HostModel, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             bad_words_ids: list[list[int]] | None = None, show_progress_bar: bool = True,
             desc: str = "generate") -> Generations:
    """Continue each prompt by up to `max_new_tokens` tokens (stopping at EOS), in length-sorted batches.

    Prompts are left-padded so that every row's continuation starts at the same column. Sampling is seeded
    per batch (`seed` + batch number), so two runs with the same settings draw the same tokens.
    Any active `steer(...)` hooks apply.
    """
    from transformers import GenerationConfig

    ids = prompt_ids(host, prompts, max_new_tokens)
    tok = host.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                              top_k=None, pad_token_id=pad, eos_token_id=eos, bad_words_ids=bad_words_ids or None)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: dict[int, list[int]] = {}
    stop = {t for t in (eos, pad) if t is not None}
    with tqdm(total=len(ids), desc=desc, unit="prompt", disable=not show_progress_bar) as bar:
        for b, start in enumerate(range(0, len(order), batch_size)):
            batch = order[start:start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]):] = 1
            if do_sample:
                torch.manual_seed(seed + b)
            gen = host.model.generate(input_ids=input_ids.to(host.device), attention_mask=mask.to(host.device),
                                      generation_config=config)
            for r, i in enumerate(batch):
                cont = gen[r, width:].tolist()
                cut = next((j for j, t in enumerate(cont) if t in stop), len(cont))
                out[i] = cont[:cut]
            bar.update(len(batch))
    cont_ids = [out[i] for i in range(len(ids))]
    return Generations(list(prompts), [tok.decode(c, skip_special_tokens=True) for c in cont_ids], ids, cont_ids)
