import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saefeat.errors import SAEFormatError, SAESiteError
from saefeat.sae import SAE, SAEConfig, formats, load_sae, save_sae
from saefeat.sae.formats import check_compatible, content_hash
from saefeat.sae.sites import hook_name, parse_hook, read_point, same_point

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


# --------------------------------------------------------------------------------- parsers, sites and hashes

def _lens(folder, cfg=None, tensors=None, hook="blocks.3.hook_resid_post"):
    """A SAELens v6 folder as `save_model` writes it, with `cfg` keys and `tensors` added or replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_weights() | (tensors or {}), str(folder / "sae_weights.safetensors"))
    doc = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "architecture": "standard",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": hook, "model_name": "minilm"}}
    (folder / "cfg.json").write_text(json.dumps(doc | (cfg or {})))
    return folder


def _sparsify(folder, cfg=None):
    folder.mkdir(parents=True)
    w = _weights(3)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    doc = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": D_SAE, "k": 4,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    (folder / "cfg.json").write_text(json.dumps(doc | (cfg or {})))
    return folder


def _topk_np(pre, k):
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :k]
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    return out


def test_unknown_tensor_is_refused_by_name(tmp_path):
    _lens(tmp_path / "lens", tensors={"W_mystery": torch.zeros(3)})
    with pytest.raises(SAEFormatError, match=r"'W_mystery'.*sae_weights.safetensors|sae_weights.*'W_mystery'"):
        load_sae(tmp_path / "lens")
    _lens(tmp_path / "relu_thr", tensors={"threshold": torch.rand(D_SAE)})  # a ReLU SAE does not apply one
    with pytest.raises(SAEFormatError, match="'threshold'"):
        load_sae(tmp_path / "relu_thr")
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in _weights().items()},
             threshold=np.zeros(D_SAE, np.float32), extra_bias=np.zeros(D_IN, np.float32))
    with pytest.raises(SAEFormatError, match="'extra_bias'"):
        load_sae(tmp_path)


def test_unknown_config_key_is_refused_by_name(tmp_path):
    _lens(tmp_path / "a", cfg={"mystery_flag": True})
    with pytest.raises(SAEFormatError, match=r"cfg.json: unknown config key 'mystery_flag'"):
        load_sae(tmp_path / "a")
    _lens(tmp_path / "b", cfg={"metadata": {"hook_name": "blocks.3.hook_resid_post", "odd": 1}})
    with pytest.raises(SAEFormatError, match="unknown metadata key 'odd'"):
        load_sae(tmp_path / "b")
    _sparsify(tmp_path / "c" / "layers.3", cfg={"new_trick": 2})
    with pytest.raises(SAEFormatError, match="unknown config key 'new_trick'"):
        load_sae(tmp_path / "c" / "layers.3")
    # provenance and training-only keys are on the allowlist
    _lens(tmp_path / "d", cfg={"l1_coefficient": 5.0, "lr": 3e-4, "metadata": {
        "hook_name": "blocks.3.hook_resid_post", "neuronpedia_id": "x", "training_architecture": "standard"}})
    load_sae(tmp_path / "d")


def test_saelens_rescale_acts_by_decoder_norm_is_folded(tmp_path):
    """TopK with rescale: pre-activations times ||W_dec[i]|| before the top-k, activations divided by it on decode."""
    w = _weights()
    w["W_dec"] = w["W_dec"] / w["W_dec"].norm(dim=-1, keepdim=True) * torch.linspace(0.25, 1.75, D_SAE)[:, None]
    _lens(tmp_path / "s", cfg={"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True}, tensors=w)
    sae = load_sae(tmp_path / "s")
    x = _x(shape=(9, D_IN))
    n = np.linalg.norm(_np(w["W_dec"]), axis=-1)
    want = _topk_np(((_np(x) - _np(w["b_dec"])) @ _np(w["W_enc"]) + _np(w["b_enc"])) * n, 5)
    np.testing.assert_allclose(_np(sae.encode(x)), want, rtol=1e-5, atol=1e-5)
    z = torch.from_numpy(want).float()
    np.testing.assert_allclose(_np(sae.decode(z)), (want / n) @ _np(w["W_dec"]) + _np(w["b_dec"]), atol=1e-5)
    _lens(tmp_path / "j", cfg={"architecture": "jumprelu", "rescale_acts_by_decoder_norm": True},
          tensors={"threshold": torch.rand(D_SAE)})
    with pytest.raises(SAEFormatError, match="rescale_acts_by_decoder_norm"):
        load_sae(tmp_path / "j")


def test_saelens_batchtopk_checkpoint_uses_its_scalar_threshold(tmp_path):
    _lens(tmp_path / "b", cfg={"architecture": "batchtopk", "k": 4.5, "topk_threshold_lr": 0.01},
          tensors={"topk_threshold": torch.tensor(0.35, dtype=torch.float64)})
    sae = load_sae(tmp_path / "b")
    w, x = _weights(), _x()
    pre = (_np(x) - _np(w["b_dec"])) @ _np(w["W_enc"]) + _np(w["b_enc"])
    assert sae.cfg.architecture == "jumprelu"
    np.testing.assert_allclose(_np(sae.encode(x)), np.where(pre > 0.35, pre, 0), rtol=1e-5, atol=1e-5)
    _lens(tmp_path / "none", cfg={"architecture": "batchtopk", "k": 4})
    with pytest.raises(SAEFormatError, match="topk_threshold"):
        load_sae(tmp_path / "none")


def test_saelens_scaling_factor_is_applied_or_refused(tmp_path):
    s = torch.linspace(0.5, 2.0, D_SAE)
    _lens(tmp_path / "f", cfg={"finetuning_scaling_factor": True}, tensors={"scaling_factor": s})
    sae, w, x = load_sae(tmp_path / "f"), _weights(), _x()
    z = sae.encode(x)
    np.testing.assert_allclose(_np(sae.decode(z)), (_np(z) * _np(s)) @ _np(w["W_dec"]) + _np(w["b_dec"]),
                               rtol=1e-5, atol=1e-5)
    _lens(tmp_path / "noflag", tensors={"scaling_factor": s})
    with pytest.raises(SAEFormatError, match="scaling_factor"):
        load_sae(tmp_path / "noflag")
    _lens(tmp_path / "ones", tensors={"scaling_factor": torch.ones(D_SAE)})
    assert torch.equal(load_sae(tmp_path / "ones").W_dec, w["W_dec"])


@pytest.mark.parametrize("cfg, flag", [
    ({"metadata": {"hook_name": "blocks.3.hook_resid_post", "hook_head_index": 2}}, "hook_head_index"),
    ({"reshape_activations": "hook_z"}, "reshape_activations"),
    ({"normalize_activations": "covariance_whitening"}, "covariance_whitening"),
    ({"activation_fn": "tanh-relu"}, "activation_fn"),
    ({"metadata": {"hook_name": "blocks.3.hook_resid_post",
                   "model_from_pretrained_kwargs": {"center_writing_weights": True}}}, "center_writing_weights"),
    ({"hook_layer": 4}, "hook_layer"),
    ({"architecture": "gated"}, "gated"),
])
def test_saelens_flags_saefeat_cannot_apply_are_refused_by_name(tmp_path, cfg, flag):
    _lens(tmp_path, cfg=cfg)
    with pytest.raises(SAEFormatError, match=flag):
        load_sae(tmp_path)


@pytest.mark.parametrize("cfg, flag", [
    ({"activation": "groupmax"}, "groupmax"), ({"transcode": True}, "transcode"),
    ({"skip_connection": True}, "skip_connection"), ({"num_latents": 7}, "num_latents"),
])
def test_sparsify_flags_saefeat_cannot_apply_are_refused_by_name(tmp_path, cfg, flag):
    _sparsify(tmp_path / "layers.3", cfg=cfg)
    with pytest.raises(SAEFormatError, match=flag):
        load_sae(tmp_path / "layers.3")


@pytest.mark.parametrize("hook, site, layer", [
    ("blocks.3.hook_resid_post", "resid_post", 3), ("blocks.3.hook_resid_pre", "resid_pre", 3),
    ("blocks.3.hook_mlp_out", "mlp_out", 3), ("blocks.3.hook_attn_out", "attn_out", 3),
    ("blocks.3.attn.hook_z", "attn_z", 3), ("blocks.3.hook_resid_mid", "resid_mid", 3),
    ("blocks.3.ln2.hook_normalized", "ln2_normalized", 3), ("layers.3", "resid_post", 3),
    ("layers.3.mlp", "mlp_out", 3), ("layers.3.self_attn", "attn_out", 3), ("h.3", "resid_post", 3),
    ("model.layers.12", "resid_post", 12), ("gpt_neox.layers.2.attention", "attn_out", 2),
    ("my_sae", "unknown", None), (None, "unknown", None),
])
def test_hook_names_map_to_sites(hook, site, layer):
    assert parse_hook(hook) == (site, layer)


@pytest.mark.parametrize("folder, site", [("layers.3", "resid_post"), ("layers.3.mlp", "mlp_out"),
                                          ("layers.3.self_attn", "attn_out"), ("h.3", "resid_post")])
def test_sparsify_folder_names_give_site_and_layer(tmp_path, folder, site):
    sae = load_sae(_sparsify(tmp_path / folder))
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.hook_name) == (site, 3, folder)


@pytest.mark.parametrize("repo, site, hook", [
    ("gemma-scope-2b-pt-res", "resid_post", "blocks.5.hook_resid_post"),
    ("gemma-scope-2b-pt-mlp-canonical", "mlp_out", "blocks.5.hook_mlp_out"),
    ("models--google--gemma-scope-2b-pt-att", "attn_z", "blocks.5.attn.hook_z"),
])
def test_gemmascope_path_gives_site_and_layer(tmp_path, repo, site, hook):
    folder = tmp_path / repo / "layer_5" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in _weights().items()},
             threshold=np.zeros(D_SAE, np.float32))
    sae = load_sae(folder / "params.npz")
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.hook_name) == (site, 5, hook)


def test_read_point_and_hook_names():
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu", layer=3, hook_name="blocks.3.hook_resid_post")
    assert read_point(cfg) == (3, "output") and hook_name(*read_point(cfg)) == cfg.hook_name
    pre = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu", layer=3, site="resid_pre",
                    hook_name="blocks.3.hook_resid_pre")
    assert read_point(pre) == (3, "input") and hook_name(3, "input") == "blocks.3.hook_resid_pre"
    assert same_point((3, "input"), (2, "output")) and not same_point((3, "input"), (3, "output"))
    assert read_point(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu", layer=0, site="resid_pre")) == (0, "input")
    for site, hook in [("mlp_out", "blocks.3.hook_mlp_out"), ("attn_z", "blocks.3.attn.hook_z"),
                       ("unknown", "my_sae")]:
        with pytest.raises(SAESiteError, match=rf"{hook}.*site '{site}'.*residual stream"):
            read_point(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu", layer=3, site=site, hook_name=hook))
    no_layer = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu")
    with pytest.raises(SAESiteError, match="does not record its layer"):
        read_point(no_layer)
    assert read_point(no_layer, layer=2) == (2, "output")
    with pytest.raises(SAESiteError, match="layer 4 was requested"):
        read_point(cfg, layer=4)


def test_check_compatible_refuses_width_layer_and_site():
    def sae(**kw):
        return SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="relu", host="m", **kw))

    with pytest.raises(ValueError, match=rf"d_in={D_IN}.*d_model=8"):
        check_compatible(sae(layer=3), "m", 8, 3)
    check_compatible(sae(layer=3), "m", D_IN, 3)
    with pytest.raises(SAESiteError, match="trained on layer 3"):
        check_compatible(sae(layer=3), "m", D_IN, 2)
    pre = sae(layer=3, site="resid_pre", hook_name="blocks.3.hook_resid_pre")
    check_compatible(pre, "m", D_IN, 2, "output")  # block 3's input is block 2's output
    check_compatible(pre, "m", D_IN, 3, "input")
    with pytest.raises(SAESiteError, match="blocks.3.hook_resid_pre"):
        check_compatible(pre, "m", D_IN, 3, "output")
    with pytest.raises(SAESiteError, match="mlp_out"):
        check_compatible(sae(layer=3, site="mlp_out"), "m", D_IN, 3)


def test_saelens_site_layer_and_context_size(tmp_path):
    _lens(tmp_path / "a", hook="blocks.3.hook_resid_pre", cfg={"metadata": {
        "hook_name": "blocks.3.hook_resid_pre", "context_size": 128, "prepend_bos": True}})
    a = load_sae(tmp_path / "a")
    assert (a.cfg.site, a.cfg.layer, a.cfg.context_size) == ("resid_pre", 3, 127)  # BOS is not a content token
    _lens(tmp_path / "b", cfg={"metadata": {"hook_name": "blocks.1.hook_resid_post", "context_size": 64,
                                            "prepend_bos": False}})
    assert load_sae(tmp_path / "b").cfg.context_size == 64


def test_saefeat_files_record_site_and_context_size(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=4, layer=2, site="resid_pre",
                        hook_name="blocks.2.hook_resid_pre", context_size=200))
    sae.load_state_dict(_weights())
    save_sae(sae, tmp_path / "new")
    doc = json.loads((tmp_path / "new" / "saefeat.json").read_text())
    assert (doc["site"], doc["context_size"]) == ("resid_pre", 200)
    back = load_sae(tmp_path / "new")
    assert (back.cfg.site, back.cfg.context_size) == ("resid_pre", 200)
    # a file written before sites were recorded: resid_post, and the recipe's training window
    for key in ("site", "context_size", "format_version"):
        doc.pop(key)
    doc |= {"hook_name": "blocks.2.hook_resid_post", "recipe": {"train": {"seq_len": 256}}}
    (tmp_path / "new" / "saefeat.json").write_text(json.dumps(doc))
    old = load_sae(tmp_path / "new")
    assert (old.cfg.site, old.cfg.context_size) == ("resid_post", 256)
    (tmp_path / "new" / "saefeat.json").write_text(json.dumps(doc | {"format_version": 99}))
    with pytest.raises(SAEFormatError, match="format_version"):
        load_sae(tmp_path / "new")


def test_content_hash_covers_the_config(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=4, layer=1))
    sae.load_state_dict(_weights())
    save_sae(sae, tmp_path / "s")
    first = load_sae(tmp_path / "s").content_hash
    assert first == sae.content_hash == content_hash(tmp_path / "s")
    meta = tmp_path / "s" / "saefeat.json"
    meta.write_text(meta.read_text().replace('"k": 4', '"k": 5'))  # the weights file is untouched
    assert load_sae(tmp_path / "s").content_hash != first
    _lens(tmp_path / "l")
    lens_hash = load_sae(tmp_path / "l").content_hash
    _lens(tmp_path / "l", cfg={"apply_b_dec_to_input": False})
    assert load_sae(tmp_path / "l").content_hash != lens_hash


def test_save_sae_swaps_weights_and_metadata_together(tmp_path, monkeypatch):
    from saefeat.sae.formats import native

    target = tmp_path / "s"
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="topk", k=4, layer=1))
    sae.load_state_dict(_weights())
    save_sae(sae, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    sae.cfg.k = 6

    def crash(tensors, filename):  # dies after writing the new weights, before the metadata
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_sae(sae, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folder left behind
    monkeypatch.undo()
    save_sae(sae, target)
    assert load_sae(target).k == 6
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        save_sae(sae, target)  # a folder holding other files is never replaced


def test_defaults_dir_is_the_shipped_weights():
    assert Path(formats.__file__).resolve().parents[2] / "weights" == formats.DEFAULTS_DIR
    assert (formats.DEFAULTS_DIR / "minilm" / formats.SAEFEAT_META).is_file()
