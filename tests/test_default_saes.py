"""The shipped SAEs meet the quality bars on held-out corpus tokens (documents never used in training)."""

from itertools import islice

import numpy as np
import pytest
import torch

from saefeat.commands.train_sae import train_config
from saefeat.config import load_config
from saefeat.sae.formats import default_sae_path, load_sae
from saefeat.sae.metrics import ce_recovered, reconstruction_metrics

# Bars that guard against a worse SAE, below the shipped ones' figures. Dead latents: minilm's 16k SAE (k=48) has
# 0.1% that never fire over the suite's 1M held-out tokens (issue 17's target is 1%), but 3.0% over the 100k here,
# where rare latents look dead.
BARS = {"explained_variance": 0.75, "dead_fraction": 0.05, "ce_loss_recovered": 0.80,
        "sentence_explained_variance": 0.6}
# The shipped SAE's recipe: minilm's comes from the activation-store trainer, smollm2's from `saefeat train-sae`.
STORE_RECIPES = {"minilm": "minilm-topk48-16k"}


def _recipe(model: str, layer: int | None = None) -> tuple[int, int, int]:
    """(layer, d_sae, k) of the recipe the shipped SAE was trained with (minilm's layer-3 SAE: the in-memory
    trainer's minilm recipe)."""
    from saefeat.config import read_config

    if model in STORE_RECIPES and layer is None:
        t = read_config("train", "store", f"{STORE_RECIPES[model]}.yaml").train
        return int(t.layer), int(t.d_sae), int(t.k)
    tc = train_config(load_config("train", [f"model={model}"]))
    return tc.layer, tc.d_sae, tc.k


def _held_out(host, model, data_dir, n_windows):
    from saefeat.sae.activations import sample_windows

    tc = train_config(load_config("train", [f"model={model}", f"data_dir={data_dir}"]))
    windows = sample_windows(host, tc.sources, tc.seq_len, seed=123, held_out=True, held_out_every=tc.held_out_every)
    return tc, list(islice(windows, n_windows))


# minilm: 400 windows (about 100k tokens), since a latent of a 16k SAE fires once in ~16k tokens on average and
# fewer tokens would count rare latents as dead
@pytest.mark.parametrize("model,layer,n_windows", [("minilm", None, 400), ("minilm", 3, 400), ("smollm2", None, 80)])
def test_shipped_sae_meets_the_bars(model, layer, n_windows, data_dir, request):
    host = request.getfixturevalue(model)
    sae = load_sae(default_sae_path(model, layer))
    assert sae.cfg.host == model and sae.d_in == host.d_model
    assert sae.W_enc.dtype.is_floating_point
    tc, windows = _held_out(host, model, data_dir, n_windows)
    assert (sae.cfg.layer, sae.d_sae, sae.k) == _recipe(model, layer)
    m = reconstruction_metrics(sae, host, sae.cfg.layer, windows)
    assert m["eval_tokens"] > 10_000
    assert m["explained_variance"] >= BARS["explained_variance"], m
    assert m["dead_fraction"] <= BARS["dead_fraction"], m
    assert m["l0"] == pytest.approx(sae.k, abs=0.01)
    if host.is_causal:
        ce = ce_recovered(sae, host, sae.cfg.layer, windows[:16])
        assert ce["ce_clean"] < ce["ce_sae"] < ce["ce_zero_ablation"], ce
        assert ce["ce_loss_recovered"] >= BARS["ce_loss_recovered"], ce


def test_sae_default_is_the_one_shipped_for_the_layer_read(minilm):
    """`sae=default` with `embed.layer=N` reads the SAE shipped for that layer, at that layer; a layer nothing ships
    for is refused with the shipped layers named, before any weights load."""
    from saefeat.embed.vectorizers import get_embedder
    from saefeat.errors import MissingFileError
    from saefeat.sae.formats import shipped_sae_layers

    layers = shipped_sae_layers("minilm")
    assert set(layers) == {3, 5} and layers[5] == default_sae_path("minilm")
    for layer in (3, 5):
        emb = get_embedder(model="minilm", sae="default", layer=layer, cache=False)
        assert emb.layer == layer and emb.sae.cfg.layer == layer
        assert emb.sae.content_hash == load_sae(layers[layer]).content_hash
        X = emb.encode(["The committee rejected the proposal."], show_progress_bar=False)
        assert X.shape == (1, emb.sae.d_sae) and X.nnz > 0
    with pytest.raises(MissingFileError, match=r"at layer 1; shipped at layers \[3, 5\]"):
        get_embedder(model="minilm", sae="default", layer=1, cache=False)


def test_shipped_saes_are_small():
    """At most 80 MiB of SAE weights in all, over every host (issue 17), and the latent cards beside them at most
    40 MiB."""
    root = default_sae_path("minilm").parent.parent
    weights = sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    cards = sum(p.stat().st_size for p in root.rglob("latent_cards/*.sqlite"))
    assert {p.parent.parent.name for p in root.rglob("latent_cards/*.sqlite")} == {"minilm", "smollm2"}
    assert 0 < weights <= 80 * 2**20 and cards <= 40 * 2**20


def test_shipped_sentence_sae_reconstructs_held_out_embeddings(minilm, data_dir):
    """The SAE shipped for `sae_sentence` (minilm's sentence embeddings) reconstructs the model's embeddings of
    held-out windows and of short spans cut from them (texts of documents it never trained on), and
    `sentence_sae=default` reads it."""
    from saefeat.embed.vectorizers import SentenceSAEVectorizer, SentenceVectorizer
    from saefeat.sae.formats import default_sentence_sae_path
    from saefeat.sae.sentence import SITE, vector_metrics

    sae = load_sae(default_sentence_sae_path("minilm"))
    assert sae.cfg.site == SITE and sae.cfg.host == "minilm" and sae.d_in == minilm.d_model
    _, windows = _held_out(minilm, "minilm", data_dir, 120)
    texts = [minilm.tokenizer.decode(w) for w in windows[:60]]
    texts += [minilm.tokenizer.decode(w[10:10 + 16 + 2 * i]) for i, w in enumerate(windows[60:])]  # 16-134 tokens
    exact = {"precision": "fp32", "backend": "torch"}  # the same vectors on any CPU (auto may run int8 or bf16)
    st = SentenceVectorizer(cache_dir=False, **exact)
    emb, owner = st.encode_chunks(texts)
    assert np.array_equal(owner, np.arange(len(texts)))
    m = vector_metrics(sae, emb)
    assert m["explained_variance"] >= BARS["sentence_explained_variance"], m
    assert m["l0"] == pytest.approx(sae.k, abs=0.01)
    X = SentenceSAEVectorizer(cache_dir=False, **exact).transform(texts[60:])
    codes = sae.encode(torch.from_numpy(emb[60:])).numpy()
    np.testing.assert_allclose(X.toarray(), codes, atol=1e-4)  # one chunk each: max pooling is the code itself
