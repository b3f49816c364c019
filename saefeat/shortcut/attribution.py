"""Shortcut tokens as DBR finds them: Integrated Gradients on a bias-only model.

The bias-only model reads nothing but the host's static input embeddings of the tokens, averaged (no context,
no word order), so whatever it learns is a lexical cue. Integrated Gradients (captum) attributes its
log-probability of the gold label to each token, against a baseline text (by default the average training
text; or one where every token is the mask token); the tokens with the largest positive attribution in an
example are that example's shortcut tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients
from torch import nn
from tqdm.auto import tqdm

from saefeat.errors import SaefeatError
from saefeat.hosts import HostModel, get_host
from saefeat.shortcut.masking import mask_token_id, normalize_token


class BagOfEmbeddings(nn.Module):
    """Mean of frozen token embeddings, standardized, then an MLP (or a linear layer when hidden=0)."""

    def __init__(self, embeddings: torch.Tensor, n_classes: int, hidden: int = 64):
        super().__init__()
        d = embeddings.shape[1]
        self.embed = nn.Embedding.from_pretrained(embeddings.detach().float().clone(), freeze=True)
        self.register_buffer("mu", torch.zeros(d))
        self.register_buffer("sigma", torch.ones(d))
        self.head = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)) if hidden \
            else nn.Linear(d, n_classes)

    def from_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Logits from the mean token embedding of each text (B, d)."""
        return self.head((mean - self.mu) / self.sigma)

    def forward_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits from token embeddings (B, T, d) and a 0/1 mask of real tokens (B, T)."""
        m = mask.to(embeds.dtype).unsqueeze(-1)
        return self.from_mean((embeds * m).sum(1) / m.sum(1).clamp_min(1.0))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_embeds(self.embed(ids), mask)


@dataclass
class TokenAttribution:
    """IG attributions of one text: a score per token toward `target`, and IG's completeness error `delta`."""

    tokens: list[str]
    token_ids: list[int]
    scores: np.ndarray
    target: int
    delta: float

    def top(self, k: int, min_score: float = 0.0) -> list[int]:
        """Positions of the k highest-scoring tokens with a score above min_score."""
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [int(i) for i in order if self.scores[i] > min_score]


class BiasOnlyModel:
    """A context-free bag-of-embeddings classifier over a host's input embeddings, and IG on it.

    Args:
        model: host alias or path (its tokenizer and input embedding matrix are used).
        hidden: width of the MLP (0 = logistic regression on the mean embedding).
        epochs, lr, weight_decay, batch_size: Adam training on cross-entropy.
        max_tokens: tokens read per text (the model is context-free, so a cut loses only the tail's cues).
    """

    def __init__(self, model: str = "minilm", hidden: int = 64, epochs: int = 20, lr: float = 1e-2,
                 weight_decay: float = 1e-4, batch_size: int = 64, max_tokens: int = 512, seed: int = 0,
                 device: str | None = "cpu"):
        self.model, self.hidden, self.epochs, self.lr = model, hidden, epochs, lr
        self.weight_decay, self.batch_size, self.max_tokens, self.seed = weight_decay, batch_size, max_tokens, seed
        self.device = device

    @property
    def host(self) -> HostModel:
        return get_host(self.model, self.device)

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        ids = self.host.tokenize(list(texts))
        if any(len(x) == 0 for x in ids):
            empty = [i for i, x in enumerate(ids) if not x]
            raise SaefeatError(f"texts at rows {empty[:10]} have no tokens; the bias-only model needs at least one")
        return [x[: self.max_tokens] for x in ids]

    @torch.no_grad()
    def _means(self, ids: list[list[int]]) -> torch.Tensor:
        """Mean token embedding of each text (the only thing the model reads), (n, d)."""
        E = self.net_.embed.weight if hasattr(self, "net_") else self._weights()
        return torch.stack([E[torch.as_tensor(x)].mean(0) for x in ids])

    def _weights(self) -> torch.Tensor:
        return self.host.model.get_input_embeddings().weight.detach().float().cpu()

    def fit(self, texts: Sequence[str], y: Sequence[int]) -> BiasOnlyModel:
        y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
        self.n_classes_ = int(y_t.max()) + 1
        torch.manual_seed(self.seed)
        net = BagOfEmbeddings(self._weights(), self.n_classes_, self.hidden)
        means = torch.stack([net.embed.weight[torch.as_tensor(x)].mean(0) for x in self._ids(texts)])
        net.mu.copy_(means.mean(0))  # standardize with training statistics
        net.sigma.copy_(means.std(0).clamp_min(1e-6))
        opt = torch.optim.Adam(net.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(means), generator=gen).split(self.batch_size):
                loss = nn.functional.cross_entropy(net.from_mean(means[idx]), y_t[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net_ = net.eval()
        return self

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return torch.softmax(self.net_.from_mean(self._means(self._ids(texts))), -1).numpy()

    def attribute(self, texts: Sequence[str], targets: Sequence[int] | None = None, n_steps: int = 32,
                  baseline: str = "mean", batch_size: int = 256,
                  show_progress_bar: bool = False) -> list[TokenAttribution]:
        """IG attribution of log p(target | text) to each token (targets default to the predicted class).

        baseline: "mask" puts the mask (or unk) token's embedding at every position, "mean" the mean token
        embedding of the training texts (an average text: its standardized input is zero), "zero" a zero vector.
        Per text, the scores sum to log p(target|x) - log p(target|baseline) up to `delta`.

        The model reads the tokens only through their mean embedding, so along IG's straight path every
        token sees the same gradient, 1/T times the gradient at the mean: captum integrates that gradient
        once per text (on the mean, `multiply_by_inputs=False`) and each token's attribution is
        (e_t - baseline) . integral / T, exactly IG on the token embeddings at a fraction of the cost.
        """
        net = self.net_
        ids = self._ids(texts)
        if targets is None:
            targets = self.predict_proba(texts).argmax(1)
        targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
        E = net.embed.weight
        if baseline == "mask":
            base = E[mask_token_id(self.host.tokenizer)]
        elif baseline == "zero":
            base = torch.zeros(E.shape[1])
        elif baseline == "mean":
            base = net.mu.clone()
        else:
            raise SaefeatError(f"baseline must be 'mask', 'mean' or 'zero', got {baseline!r}")

        def log_prob(mean: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(net.from_mean(mean), -1)

        ig = IntegratedGradients(log_prob, multiply_by_inputs=False)
        means = self._means(ids)
        out: list[TokenAttribution] = []
        tok = self.host.tokenizer
        for s in tqdm(range(0, len(ids), batch_size), desc="integrated gradients", disable=not show_progress_bar):
            m, t = means[s:s + batch_size], targets[s:s + batch_size]
            b = base.expand_as(m)
            grad = ig.attribute(m, baselines=b, target=t, n_steps=n_steps, method="gausslegendre").detach()
            with torch.no_grad():
                gain = log_prob(m).gather(1, t[:, None])[:, 0] - log_prob(b).gather(1, t[:, None])[:, 0]
                for i, x in enumerate(ids[s:s + batch_size]):
                    scores = ((E[torch.as_tensor(x)] - base) @ grad[i]) / len(x)
                    out.append(TokenAttribution(tok.convert_ids_to_tokens(x), list(x), scores.numpy(),
                                                int(t[i]), float(scores.sum() - gain[i])))
        return out


def shortcut_token_table(attributions: Sequence[TokenAttribution], positions: Sequence[Sequence[int]],
                         top: int = 50) -> pd.DataFrame:
    """The tokens chosen as shortcuts most often, with how often and their mean attribution."""
    rows: dict[str, list[float]] = {}
    for attr, pos in zip(attributions, positions):
        for p in pos:
            rows.setdefault(normalize_token(attr.tokens[p]), []).append(float(attr.scores[p]))
    df = pd.DataFrame([(t, len(v), float(np.mean(v))) for t, v in rows.items()],
                      columns=["token", "n_examples", "mean_attribution"])
    return df.sort_values(["n_examples", "mean_attribution"], ascending=False).head(top).reset_index(drop=True)
