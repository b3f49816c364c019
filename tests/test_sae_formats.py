import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saefeat.sae import SAE, SAEConfig, load_sae, save_sae

D_IN, D_SAE = 16, 48


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g) * 0.5,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g) * 0.1,
    }


def _x(seed=1, shape=(3, 5, D_IN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _np(t):
    return t.detach().numpy().astype(np.float64)


def test_saelens_relu_v6_encodes_by_formula(tmp_path):
    w = _weights()
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"model_name": "m", "hook_name": "blocks.2.hook_resid_post"}}))
    sae = load_sae(tmp_path)
    assert sae.cfg.source_format == "saelens" and sae.cfg.layer == 2 and sae.cfg.architecture == "relu"
    x = _x()
    want = np.maximum((_np(x) - _np(w["b_dec"])) @ _np(w["W_enc"]) + _np(w["b_enc"]), 0)
    np.testing.assert_allclose(_np(sae.encode(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(sae.decode(sae.encode(x))), want @ _np(w["W_dec"]) + _np(w["b_dec"]),
                               rtol=1e-4, atol=1e-4)


def test_saelens_old_jumprelu_and_topk(tmp_path):
    w = _weights() | {"threshold": torch.rand(D_SAE)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "relu",
        "apply_b_dec_to_input": False, "hook_name": "blocks.7.hook_resid_post", "hook_layer": 7, "model_name": "m"}))
    sae = load_sae(tmp_path)
    x = _x()
    pre = _np(x) @ _np(w["W_enc"]) + _np(w["b_enc"])
    want = np.where(pre > _np(w["threshold"]), np.maximum(pre, 0), 0)
    np.testing.assert_allclose(_np(sae.encode(x)), want, rtol=1e-5, atol=1e-5)

    topk_dir = tmp_path / "topk"
    topk_dir.mkdir()
    save_file(_weights(), str(topk_dir / "sae_weights.safetensors"))
    (topk_dir / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
        "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.1.hook_resid_post"}))
    z = load_sae(topk_dir).encode(x)
    assert ((z > 0).sum(-1) <= 5).all() and ((z > 0).sum(-1) == 5).any()


def test_sparsify_layout_encodes_by_formula(tmp_path):
    w = _weights(3)
    folder = tmp_path / "layers.4"
    folder.mkdir()
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 3, "normalize_decoder": True,
                                                 "num_latents": 0, "k": 4, "d_in": D_IN}))
    with pytest.raises(ValueError, match="layers.4"):
        load_sae(tmp_path)  # the parent folder: names the sub-folder to pass
    sae = load_sae(folder)
    assert sae.cfg.source_format == "sparsify" and sae.cfg.layer == 4 and sae.k == 4
    x = _x(shape=(7, D_IN))
    pre = np.maximum((_np(x) - _np(w["b_dec"])) @ _np(w["W_enc"]) + _np(w["b_enc"]), 0)
    want = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :4]
    np.put_along_axis(want, top, np.take_along_axis(pre, top, 1), 1)
    np.testing.assert_allclose(_np(sae.encode(x)), want, rtol=1e-5, atol=1e-5)
    vals, idx = sae.encode_topk(x)
    np.testing.assert_allclose(_np(sae.decode_topk(vals, idx)), _np(sae.decode(sae.encode(x))), rtol=1e-4, atol=1e-4)


def test_gemmascope_npz(tmp_path):
    w = {k: v.numpy() for k, v in _weights(5).items()} | {"threshold": np.full(D_SAE, 0.3, np.float32)}
    np.savez(tmp_path / "params.npz", **w)
    sae = load_sae(tmp_path)
    x = _x()
    pre = _np(x) @ w["W_enc"] + w["b_enc"]
    np.testing.assert_allclose(_np(sae.encode(x)), np.where(pre > 0.3, pre, 0), rtol=1e-5, atol=1e-5)


def test_pickles_are_never_loaded(tmp_path):
    torch.save(_weights(), tmp_path / "sae.pt")
    with pytest.raises(ValueError, match="pickled"):
        load_sae(tmp_path)


def test_saefeat_roundtrip_and_batchtopk(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="batchtopk", k=6, host="minilm", layer=1))
    sae.load_state_dict(_weights() | {"threshold": torch.zeros(D_SAE)})
    save_sae(sae, tmp_path / "s", meta={"recipe": {"lr": 1}})
    back = load_sae(tmp_path / "s")
    assert back.cfg.extra["recipe"] == {"lr": 1} and back.content_hash
    x = _x()
    assert torch.equal(back.encode(x), sae.encode(x))  # no threshold learnt: per-token top-k
    assert ((back.encode(x) > 0).sum(-1) <= 6).all()


def test_wrong_width_sae_is_refused(tmp_path, minilm):
    from saefeat.embed.embedder import SAEEmbedder

    sae = SAE(SAEConfig(d_in=576, d_sae=64, architecture="topk", k=4, host="smollm2", layer=3))
    save_sae(sae, tmp_path / "wide")
    with pytest.raises(ValueError, match=r"d_in=576.*minilm.*d_model=384"):
        SAEEmbedder("minilm", sae=tmp_path / "wide")


@pytest.mark.parametrize("architecture", ["topk", "relu", "jumprelu"])
def test_encode_sparse_in_chunks_matches_dense_encode(monkeypatch, architecture):
    """The CPU path encodes rows chunk by chunk; every chunk's rows must land at their own row ids."""
    import saefeat.sae.model as model

    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=5 if architecture == "topk" else None))
    with torch.no_grad():
        for name, value in _weights(7).items():
            getattr(sae, name).copy_(value)
        if architecture == "jumprelu":
            sae.threshold.fill_(0.4)
    monkeypatch.setattr(model, "_CPU_CHUNK_ELEMENTS", 7 * D_SAE)  # 7 rows per chunk: 50 rows make 8 chunks
    x = _x(seed=3, shape=(50, D_IN))
    with torch.no_grad():
        rows, cols, vals = sae.encode_sparse(x)
        want = sae.encode(x)
    got = torch.zeros_like(want)
    got[rows, cols] = vals
    assert rows.max() >= 43  # the last chunk's rows are really there
    torch.testing.assert_close(got, want)
    assert bool((vals > 0).all())


def test_frozen_encoder_weights_are_cast_once_under_autocast():
    """Autocast recasts weights that do not require grad on every call; the SAE casts them once, same result."""
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=5))
    with torch.no_grad():
        for name, value in _weights(3).items():
            getattr(sae, name).copy_(value)
    sae.requires_grad_(False)
    x = _x(seed=4, shape=(7, D_IN))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        got = sae.pre_acts(x)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc))  # autocast's own casts
        cast = sae._encoder_cast[1]
        sae.pre_acts(x)
        assert sae._encoder_cast[1] is cast
        sae.W_enc.mul_(2)  # an in-place change is seen
        assert torch.equal(sae.pre_acts(x), torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc))
    assert sae.pre_acts(x).dtype == torch.float32  # outside autocast: the fp32 weights themselves
