"""Optional language-model labels for latents, scored by detection as in EleutherAI's auto-interp.

A labeller reads a latent's top contexts (peak token marked) and writes a short label. Detection
scoring then shows the labeller the label and held-out contexts, some where the latent fires and some
where it does not, and asks which ones it fires on; the score is the balanced accuracy of the answers.
Labellers: a local causal LM (`LocalLM`, e.g. smollm2) or any OpenAI-compatible chat endpoint
(`OpenAICompatible`, plain HTTP through the standard library). Neither is ever needed to run a task.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from saefeat.embed.embedder import SAEEmbedder
from saefeat.errors import SaefeatError
from saefeat.explain.cards import Context, LatentCard
from saefeat.explain.render import context_plain
from saefeat.explain.store import LatentStore

logger = logging.getLogger(__name__)


class Labeller(Protocol):
    def complete(self, prompt: str, max_tokens: int = 32) -> str: ...


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} refused", headers, fp)


class OpenAICompatible:
    """Chat completions from an OpenAI-compatible server (OpenAI, vLLM, llama.cpp, Ollama, ...)."""

    def __init__(self, endpoint: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60):
        if not model:
            raise SaefeatError("labels.model must name the model served at the endpoint")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.timeout = model, timeout
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        url = urllib.parse.urlsplit(self.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise SaefeatError(f"labels.endpoint must be an http(s) URL, got {endpoint!r}")
        if self.api_key and url.scheme == "http" and not _loopback(url.hostname):
            raise SaefeatError(f"refusing to send ${api_key_env} over plain http to {url.hostname}; use an https "
                               "endpoint (plain http is allowed for a server on this machine only)")
        # the key goes to the configured endpoint only: redirects are not followed
        self._opener = urllib.request.build_opener(_NoRedirect)

    def complete(self, prompt: str, max_tokens: int = 32) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read())
        except (urllib.error.URLError, TimeoutError) as e:
            raise ConnectionError(f"labeller endpoint {self.url} failed: {e}") from e
        try:
            return str(reply["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError) as e:
            raise SaefeatError(f"unexpected reply from {self.url}: {str(reply)[:200]}") from e


class LocalLM:
    """Greedy chat completions from a local causal LM host (default: the offline smollm2)."""

    def __init__(self, model: str = "smollm2", device: str | None = None):
        from saefeat.hosts import get_host

        self.host = get_host(model, device)
        if not self.host.is_causal:
            raise SaefeatError(f"{model} is not a causal LM and cannot write labels")

    @torch.no_grad()
    def complete(self, prompt: str, max_tokens: int = 32) -> str:
        tok = self.host.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = prompt
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.host.device)
        out = self.host.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                       do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def make_labeller(cfg) -> Labeller:
    """The labeller named by a `labels` config section (llm: local | openai)."""
    if cfg.llm == "local":
        return LocalLM(cfg.local_model)
    if cfg.llm == "openai":
        return OpenAICompatible(cfg.endpoint, cfg.model, cfg.api_key_env)
    raise SaefeatError(f"labels.llm must be null, 'local' or 'openai', got {cfg.llm!r}")


def explain_prompt(contexts: Sequence[Context]) -> str:
    lines = "\n".join(f"{i + 1}. {context_plain(c).replace('«', '<<').replace('»', '>>')}"
                      for i, c in enumerate(contexts))
    return ("Each excerpt below is text where one hidden feature of a language model activates; the token where "
            "it activates most is marked <<like this>>. What do the marked tokens and their contexts have in "
            "common? Reply with a label of at most six words and nothing else.\n\n" + lines + "\n\nLabel:")


def detection_prompt(label: str, text: str) -> str:
    return (f'A hidden feature of a language model is described as: "{label}".\n'
            f"Does this feature activate anywhere in the following text?\n\nText: {text}\n\n"
            "Answer with yes or no.")


def clean_label(reply: str) -> str:
    line = reply.strip().splitlines()[0] if reply.strip() else ""
    return line.removeprefix("Label:").strip().strip('"').strip()[:80]


def detection_score(labeller: Labeller, label: str, positives: Sequence[str], negatives: Sequence[str]) -> float:
    """Balanced accuracy of the labeller's yes/no answers on firing (positive) and non-firing texts."""
    texts = list(positives) + list(negatives)
    if not positives or not negatives:
        raise SaefeatError("detection scoring needs both firing and non-firing contexts")
    truth = [1] * len(positives) + [0] * len(negatives)
    pred = [int(labeller.complete(detection_prompt(label, t), max_tokens=3).strip().lower().startswith("y"))
            for t in texts]
    return float(balanced_accuracy_score(truth, pred))


def negative_contexts(emb: SAEEmbedder, store: LatentStore, latents: Sequence[int], n: int, width: int,
                      seed: int = 0, max_docs: int = 24) -> dict[int, list[str]]:
    """Per latent, up to n windows of reference text (width tokens) where the latent does not fire at all.

    A sample of the store's documents is re-encoded, so "does not fire" is measured, not assumed.
    """
    from saefeat.explain.tokens import token_pieces

    docs = store.docs()
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(list(docs), min(max_docs, len(docs)), replace=False).tolist())
    texts = [docs[i] for i in ids]
    acts = emb.encode_tokens_batch(texts)
    pieces = [token_pieces(emb.host.tokenizer, t, a.token_ids) for t, a in zip(texts, acts)]
    out: dict[int, list[str]] = {}
    for lat in latents:
        found: list[str] = []
        for d in rng.permutation(len(texts)):
            col = acts[d].acts[:, lat].toarray().ravel()
            if len(col) < width:
                continue
            start = int(rng.integers(0, len(col) - width + 1))
            if not col[start:start + width].any():
                found.append(" ".join("".join(pieces[d][start:start + width]).split()))
            if len(found) == n:
                break
        out[int(lat)] = found
    return out


def label_card(labeller: Labeller, card: LatentCard, negatives: Sequence[str], n_explain: int = 8,
               n_holdout: int = 10) -> tuple[int, str, float | None] | None:
    """(latent, label, detection score): labelled from the top contexts, scored on held-out ones (the
    card's random firing sample against `negatives`, texts where the latent does not fire)."""
    if not card.top:
        return None
    label = clean_label(labeller.complete(explain_prompt(card.top[:n_explain])))
    held_out = [context_plain(c).replace("«", "").replace("»", "") for c in card.weak[:n_holdout]]
    neg = list(negatives)[:n_holdout]
    score = detection_score(labeller, label, held_out, neg) if held_out and neg else None
    return card.latent, label, score


def label_store(store: LatentStore, emb: SAEEmbedder, labeller: Labeller, latents: Sequence[int] | None = None,
                max_latents: int = 20, n_explain: int = 8, n_holdout: int = 10, seed: int = 0) -> list[tuple]:
    """LLM labels and detection scores for latents of a built store, saved to it latent by latent."""
    if latents is None:
        live = np.flatnonzero(store.firing_counts() > 0)
        rng = np.random.default_rng(seed)
        latents = sorted(rng.choice(live, min(max_latents, len(live)), replace=False).tolist())
    cards = store.cards(list(latents))
    width = max((len(c.top[0].tokens) for c in cards if c.top), default=16)
    negatives = negative_contexts(emb, store, [c.latent for c in cards], n_holdout, width, seed)
    results = []
    for card in tqdm(cards, desc="LLM labels", unit="latent"):
        row = label_card(labeller, card, negatives.get(card.latent, []), n_explain, n_holdout)
        if row is not None:
            store.set_llm_label(*row)
            results.append(row)
    return results
