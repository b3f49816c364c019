"""The shipped SAEs meet the quality bars on held-out corpus tokens (documents never used in training)."""

from itertools import islice

import pytest

from saefeat.commands.train_sae import train_config
from saefeat.config import load_config
from saefeat.sae.formats import default_sae_path, load_sae
from saefeat.sae.metrics import ce_recovered, reconstruction_metrics

BARS = {"explained_variance": 0.75, "dead_fraction": 0.05, "ce_loss_recovered": 0.80}


def _held_out(host, model, data_dir, n_windows):
    from saefeat.sae.activations import sample_windows

    tc = train_config(load_config("train", [f"model={model}", f"data_dir={data_dir}"]))
    windows = sample_windows(host, tc.sources, tc.seq_len, seed=123, held_out=True, held_out_every=tc.held_out_every)
    return tc, list(islice(windows, n_windows))


@pytest.mark.parametrize("model,n_windows", [("minilm", 120), ("smollm2", 80)])
def test_shipped_sae_meets_the_bars(model, n_windows, data_dir, request):
    host = request.getfixturevalue(model)
    sae = load_sae(default_sae_path(model))
    assert sae.cfg.host == model and sae.d_in == host.d_model
    assert sae.W_enc.dtype.is_floating_point
    tc, windows = _held_out(host, model, data_dir, n_windows)
    assert sae.cfg.layer == tc.layer and sae.d_sae == tc.d_sae and sae.k == tc.k
    m = reconstruction_metrics(sae, host, tc.layer, windows)
    assert m["eval_tokens"] > 10_000
    assert m["explained_variance"] >= BARS["explained_variance"], m
    assert m["dead_fraction"] <= BARS["dead_fraction"], m
    assert m["l0"] == pytest.approx(tc.k, abs=0.01)
    if host.is_causal:
        ce = ce_recovered(sae, host, tc.layer, windows[:16])
        assert ce["ce_clean"] < ce["ce_sae"] < ce["ce_zero_ablation"], ce
        assert ce["ce_loss_recovered"] >= BARS["ce_loss_recovered"], ce


def test_shipped_saes_are_small():
    total = sum(p.stat().st_size for m in ("minilm", "smollm2") for p in default_sae_path(m).iterdir())
    assert total <= 30 * 2**20
