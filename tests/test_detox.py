"""Detox: steering hooks on the real smollm2, toxicity filters on real Jigsaw comments, save/load, bad input."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from helpers import random_sae

from saefeat.detox.baselines import bad_words_ids
from saefeat.detox.data import load_labelled_comments, load_prompts, natural_rate_subsample
from saefeat.detox.evaluate import Condition, TfidfToxicityScorer, evaluate_conditions
from saefeat.detox.filter import ToxicityFilter, choose_threshold
from saefeat.detox.generation import generate, prompt_ids
from saefeat.detox.latents import rank_toxic_latents
from saefeat.detox.steering import SAELatentClamp, active_hooks, steer
from saefeat.errors import SaefeatError
from saefeat.sae import SAE, SAEConfig, load_sae

LAYER = 9


@pytest.fixture(scope="module")
def prompts(data_dir) -> list[str]:
    return load_prompts(data_dir / "toxicity" / "rtp_challenging_toxic_prompts.jsonl")[:4]


@pytest.fixture(scope="module")
def comments(data_dir) -> tuple[list[str], np.ndarray]:
    texts, y = load_labelled_comments(data_dir / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz")
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), 60, replace=False) for c in (0, 1)]))
    return [texts[i][:600] for i in keep], y[keep]


@pytest.fixture(scope="module")
def smollm2_sae(tmp_path_factory) -> SAE:
    path = random_sae(tmp_path_factory.mktemp("sae") / "smollm2", d_in=576, d_sae=1024, k=32, layer=LAYER,
                      host="smollm2")
    return load_sae(path)


def _orthonormal_sae(d_in: int = 576, d_sae: int = 256, k: int = 16) -> SAE:
    """An SAE whose encoder inverts its decoder exactly (orthonormal rows), so removing a latent's decoder
    direction from the residual removes that latent from the re-encoded residual."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_sae))
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, host="smollm2", layer=LAYER))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)
        sae.W_enc.copy_(q)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval().requires_grad_(False)


# ---- steering mechanics -------------------------------------------------------------------------------
def test_zero_strength_generates_exactly_what_the_plain_model_does(smollm2, smollm2_sae, prompts):
    plain = generate(smollm2, prompts, max_new_tokens=8, batch_size=4, show_progress_bar=False)
    latents = list(range(0, 1024, 8))
    with steer(smollm2, SAELatentClamp(smollm2_sae, latents, value=-20.0, strength=0.0)):
        zero = generate(smollm2, prompts, max_new_tokens=8, batch_size=4, show_progress_bar=False)
    assert zero.continuation_ids == plain.continuation_ids
    with steer(smollm2, SAELatentClamp(smollm2_sae, latents, value=-20.0, strength=1.0)):
        full = generate(smollm2, prompts, max_new_tokens=8, batch_size=4, show_progress_bar=False)
    assert full.continuation_ids != plain.continuation_ids  # the same hook at full strength does act
    # left padding in a batch gives what each prompt gives alone
    alone = generate(smollm2, prompts[1:2], max_new_tokens=8, batch_size=1, show_progress_bar=False)
    assert alone.continuation_ids[0] == plain.continuation_ids[1]


def _two_prompts_at_the_layer(smollm2, prompts):
    """An orthonormal SAE, two padded prompts, their residual at LAYER, the content mask and the SAE codes."""
    sae = _orthonormal_sae()
    ids, att = smollm2.pad_batch([smollm2.wrap(x)[0] for x in smollm2.tokenize(prompts[:2])])
    before = smollm2.residual(ids, att, LAYER)
    content = att.bool().clone()
    content[:, 0] = False  # BOS
    return sae, ids, att, before, content, sae.encode(before)


def test_clamping_a_latent_to_zero_removes_its_activation_at_the_layer(smollm2, prompts):
    sae, ids, att, before, content, z = _two_prompts_at_the_layer(smollm2, prompts)
    latent = int((z[content] > 0).sum(0).argmax())
    assert (z[content][:, latent] > 0).sum() >= 2
    with steer(smollm2, SAELatentClamp(sae, [latent], value=0.0)):
        after = smollm2.residual(ids, att, LAYER)  # its capture hook runs after the steering hook
    z_after = sae.encode(after)
    assert z_after[content][:, latent].abs().max() < 1e-3 * z[content][:, latent].max()
    moved = (sae.pre_acts(after) - sae.pre_acts(before))[content].abs().amax(0)
    assert moved[latent] > 0 and torch.cat([moved[:latent], moved[latent + 1:]]).max() < 1e-3 * moved[latent]
    torch.testing.assert_close(after[:, 0], before[:, 0])  # the BOS position is left alone
    assert active_hooks(smollm2, LAYER) == 0


def test_active_clamping_leaves_positions_where_the_latent_is_silent(smollm2, prompts):
    sae, ids, att, before, content, z = _two_prompts_at_the_layer(smollm2, prompts)
    fires = (z.gt(0) & content.unsqueeze(-1)).sum((0, 1))
    latent = int(((fires > 0) & (fires < content.sum())).int().argmax())  # fires at some positions, not all
    active = z[..., latent] > 0
    assert (active & content).any() and (~active & content).any()
    with steer(smollm2, SAELatentClamp(sae, [latent], value=-2.0, where="active")):
        after = smollm2.residual(ids, att, LAYER)
    silent = ~active & content
    torch.testing.assert_close(after[silent], before[silent])  # no edit where the latent does not fire
    assert (after[active & content] - before[active & content]).abs().amax() > 0
    with steer(smollm2, SAELatentClamp(sae, [latent], value=-2.0, where="all")):
        everywhere = smollm2.residual(ids, att, LAYER)
    assert (everywhere[silent] - before[silent]).abs().amax() > 0  # "all" pushes every position


def test_hook_is_removed_when_generation_fails(smollm2, smollm2_sae, prompts):
    before = active_hooks(smollm2, LAYER)

    class Exploding(SAELatentClamp):
        def __call__(self, x):
            raise RuntimeError("boom in the steering hook")

    with pytest.raises(RuntimeError, match="boom"), steer(smollm2, Exploding(smollm2_sae, [1])):
        assert active_hooks(smollm2, LAYER) == before + 3
        generate(smollm2, prompts[:2], max_new_tokens=4, show_progress_bar=False)
    assert active_hooks(smollm2, LAYER) == before
    with pytest.raises(KeyboardInterrupt), steer(smollm2, SAELatentClamp(smollm2_sae, [1])):
        raise KeyboardInterrupt
    assert active_hooks(smollm2, LAYER) == before


def test_bad_input_is_refused_clearly(smollm2, smollm2_sae, minilm, tmp_path, prompts):
    with pytest.raises(ValueError, match="trained on layer 9"), steer(smollm2, SAELatentClamp(smollm2_sae, [1]),
                                                                     layer=5):
        pass
    minilm_sae = load_sae(random_sae(tmp_path / "minilm_sae"))
    with pytest.raises(ValueError, match="d_in=384 does not match"), steer(smollm2, SAELatentClamp(minilm_sae, [1]),
                                                                          layer=3):
        pass
    with pytest.raises(ValueError, match="out of range"):
        SAELatentClamp(smollm2_sae, [5000])
    with pytest.raises(ValueError, match="out of range for smollm2"), steer(
            smollm2, SAELatentClamp(smollm2_sae, [1]), layer=40):
        pass
    long_prompt = "the cat sat on the mat " * 400
    with pytest.raises(ValueError, match=r"prompt 1 has \d+ tokens .* does not fit the 2048-token context"):
        prompt_ids(smollm2, [prompts[0], long_prompt], max_new_tokens=20)
    with pytest.raises(ValueError, match="not a causal language model"):
        prompt_ids(minilm, prompts, max_new_tokens=5)
    assert active_hooks(smollm2, LAYER) == 0


# ---- filters -------------------------------------------------------------------------------------------
def test_choose_threshold_meets_the_target_at_the_stated_base_rate():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 500)
    s = np.concatenate([rng.normal(0, 1, 500), rng.normal(2, 1, 500)])
    for prior in (0.5, 0.08):
        t = choose_threshold(y, s, precision=0.9, prior=prior)
        tpr, fpr = (s[y == 1] >= t).mean(), (s[y == 0] >= t).mean()
        assert prior * tpr / (prior * tpr + (1 - prior) * fpr) >= 0.9
    assert choose_threshold(y, s, precision=0.9, prior=0.08) > choose_threshold(y, s, precision=0.9, prior=0.5)
    t = choose_threshold(y, s, recall=0.8)
    assert (s[y == 1] >= t).mean() >= 0.8 and (s[y == 1] > t).mean() < 0.8
    with pytest.raises(ValueError, match="exactly one"):
        choose_threshold(y, s)


def test_natural_rate_subsample_keeps_every_clean_row():
    y = np.repeat([0, 1], [900, 800])
    keep = natural_rate_subsample(y, 0.08, seed=1)
    assert (y[keep] == 0).sum() == 900 and abs(y[keep].mean() - 0.08) < 0.002


def test_rank_toxic_latents_prefers_specific_latents():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    X = rng.random((200, 6)) * (rng.random((200, 6)) < 0.1)
    X[y == 1, 2] = 3.0                      # fires on every toxic row, never on clean ones
    X[:, 4] = 5.0 + y                       # fires everywhere: not specific
    X[y == 0, 5] = 2.0                      # a clean latent
    ranking = rank_toxic_latents(sp.csr_matrix(X), y, coef=np.ones(6), n=3, max_freq_clean=0.5)
    assert ranking.latent.iloc[0] == 2
    assert 4 not in ranking.latent.tolist() and 5 not in ranking.latent.tolist()


@pytest.mark.parametrize("representation", ["sae", "tfidf"])
def test_filter_round_trips_through_save_and_load(representation, comments, tmp_path):
    texts, y = comments
    params = {"embed": {"model": "minilm", "sae": str(random_sae(tmp_path / "sae")), "max_tokens": 64,
                        "show_progress_bar": False}}
    filt = ToxicityFilter(representation, params if representation == "sae" else None, target="recall",
                          target_value=0.7)
    filt.fit(texts[::2], y[::2], texts[1::2], y[1::2])
    p = filt.predict_proba(texts[1::2])[:, 1]
    assert (filt.predict(texts[1::2])[y[1::2] == 1]).mean() >= 0.7
    assert 0 < len(filt.filter(texts[1::2])) < len(texts[1::2])
    path = filt.save(tmp_path / "filter")
    assert not any(f.suffix in (".safetensors", ".gguf") for f in path.rglob("*"))  # settings, not host weights
    loaded = ToxicityFilter.load(path)
    np.testing.assert_allclose(loaded.predict_proba(texts[1::2])[:, 1], p, rtol=1e-6, atol=1e-9)
    assert loaded.threshold_ == filt.threshold_ and loaded.get_params() == filt.get_params()
    out = mlflow.pyfunc.load_model(str(path)).predict(pd.DataFrame({"text": texts[1::2]}))
    np.testing.assert_allclose(out["toxicity"].to_numpy(), p, rtol=1e-6, atol=1e-9)
    with pytest.raises(FileExistsError):
        filt.save(path)
    settings = next(path.rglob("filter.json"))
    assert not list(path.rglob("*.pkl"))
    if representation == "sae":  # fitted on another SAE than its settings now give: the weights do not apply
        settings.write_text(settings.read_text().replace(filt.fingerprint_["sae"], "0123456789abcdef"))
        with pytest.raises(ValueError, match="weights do not apply"):
            ToxicityFilter.load(path)


def test_a_c_grid_is_chosen_by_cross_validation_on_the_training_texts(comments, tmp_path):
    """With a grid, the filter takes the C that stratified 5-fold CV on its training texts scores best (ROC-AUC),
    refitted on all of them: the C a direct cross-validation of each value picks, and the weights of a filter
    fitted at that C; the grid travels with the saved settings. A bad grid is refused by name."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.preprocessing import MaxAbsScaler

    texts, y = comments
    grid = [0.01, 0.1, 1.0, 10.0]
    filt = ToxicityFilter("tfidf", None, C=grid, target="recall", target_value=0.7).fit(texts, y)
    Xs = MaxAbsScaler().fit_transform(filt.transform(texts))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    cv = [cross_val_score(LogisticRegression(C=c, class_weight="balanced", max_iter=2000), Xs, y, cv=folds,
                          scoring="roc_auc").mean() for c in grid]
    assert len(set(np.round(cv, 6))) > 1 and grid[int(np.argmax(cv))] == filt.C_  # the grid matters here
    fixed = ToxicityFilter("tfidf", None, C=filt.C_, target="recall", target_value=0.7).fit(texts, y)
    np.testing.assert_allclose(fixed.decision_function(texts), filt.decision_function(texts), rtol=1e-6)
    assert ToxicityFilter.load(filt.save(tmp_path / "f")).get_params()["C"] == grid
    for bad in ([], [0.1, -1.0], "strong"):
        with pytest.raises(SaefeatError, match="C must be a positive number"):
            ToxicityFilter("tfidf", None, C=bad).fit(texts, y)
    # an L1 filter is sparse; with both penalties offered, CV picks one of them
    sparse = ToxicityFilter("tfidf", None, C=0.3, penalty="l1").fit(texts, y)
    assert sparse.penalty_ == "l1" and 0 < np.count_nonzero(sparse.coef_) < 0.2 * len(sparse.coef_)
    assert ToxicityFilter("tfidf", None, C=grid, penalty=["l1", "l2"]).fit(texts, y).penalty_ in ("l1", "l2")
    with pytest.raises(SaefeatError, match="penalty must be l1, l2"):
        ToxicityFilter("tfidf", None, penalty="elasticnet").fit(texts, y)


# ---- evaluation ----------------------------------------------------------------------------------------
def test_evaluate_conditions_scores_tiers_and_bans_words(smollm2, smollm2_sae, prompts, comments):
    texts, y = comments
    plain = generate(smollm2, prompts, max_new_tokens=6, show_progress_bar=False)
    words = sorted({w.strip(".,!?\"'").lower() for c in plain.continuations for w in c.split()} - {""})
    conditions = [Condition("none"), Condition("clamp", SAELatentClamp(smollm2_sae, [3, 7], value=-5.0)),
                  Condition("banned", bad_words_ids=bad_words_ids(smollm2.tokenizer, words))]
    scorer = TfidfToxicityScorer().fit(texts, y)
    table, gens, scores = evaluate_conditions(smollm2, conditions, prompts, [scorer], ["A quiet morning in town."],
                                              n_boot=50, max_new_tokens=6, show_progress_bar=False)
    assert list(table.index) == ["none", "clamp", "banned"]
    assert gens["none"].continuation_ids == plain.continuation_ids
    assert table.loc["none", "tfidf_mean_change"] == 0 and table.loc["none", "ppl_change"] == 0
    assert table.loc["banned", "capability_ppl"] == table.loc["none", "capability_ppl"]
    assert table.loc["clamp", "capability_ppl"] != table.loc["none", "capability_ppl"]
    assert np.isfinite(table[["ppl", "tfidf_mean", "tfidf_share"]].to_numpy()).all()
    single = {seq[0] for seq in bad_words_ids(smollm2.tokenizer, words) if len(seq) == 1}
    assert single & {t for c in plain.continuation_ids for t in c}
    assert not single & {t for c in gens["banned"].continuation_ids for t in c}
    assert len(scores["clamp"]["tfidf"]) == len(prompts)
    assert table.loc["none", "changed"] == 0 and table.loc["banned", "changed"] > 0


def test_filters_and_steering_latents_honour_the_embed_section(tmp_path):
    """The detox task's one config route: embed.precision, window and the baselines reach every filter and the
    steering host's latent ranking (they used to be dropped)."""
    from saefeat.config import baseline_config, embed_config, load_config
    from saefeat.detox.filter import representation_settings
    from saefeat.detox.latents import find_toxic_latents

    cfg = load_config("tasks", ["task=detox", "embed.precision=fp32", "embed.window=96", "embed.max_tokens=64",
                                "baselines.tfidf_max_features=50", f"embed.cache_dir={tmp_path}"])
    texts = ["you are a stupid idiot", "have a lovely day", "shut up you moron", "thanks for the kind help"] * 3
    y = np.array([1, 0, 1, 0] * 3)
    settings = representation_settings(embed_config(cfg), baseline_config(cfg))
    for name in ("sae", "dense", "sae_sentence", "sentence", "tfidf"):
        rep = ToxicityFilter(name, settings, target="recall", target_value=0.5).fit(texts, y).representation_
        if name in ("sae", "dense"):
            assert rep.embedder.runtime.precision == "fp32" and rep.embedder.window == 96
            assert rep.embedder.max_tokens == 64
        elif name in ("sentence", "sae_sentence"):
            assert rep.precision == "fp32"
        else:
            assert rep.max_features == 50
    s = cfg.steering
    steer = embed_config(cfg, model=str(s.model), sae=str(s.sae), layer=s.layer, max_tokens=int(s.latent_max_tokens))
    _, probe = find_toxic_latents(texts, y, steer, n=3)
    emb = probe.representation_.embedder
    assert emb.runtime.precision == "fp32" and emb.window == 96 and emb.host.is_causal


# ---- selection protocol and steering vectors -----------------------------------------------------------
def _exact_sae(d_in: int = 576, scale: float = 2.0) -> SAE:
    """A ReLU SAE that reconstructs every input exactly: latents +q and -q for each direction of an orthonormal
    basis Q (relu(u) q - relu(-u) q = u q), with an input scale that decoding must undo."""
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(d_in, d_in))
    sae = SAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture="relu", host="smollm2", layer=LAYER,
                        input_scale=scale))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([q, -q], dim=1))
        sae.W_dec.copy_(torch.cat([q.T, -q.T], dim=0))
    return sae.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def exact_embedder():
    from saefeat.embed.embedder import SAEEmbedder

    return SAEEmbedder("smollm2", _exact_sae(), layer=LAYER, precision="fp32", cache=False, max_tokens=48)


def test_sdcv_equals_the_difference_in_means_when_the_sae_reconstructs_exactly(exact_embedder, comments):
    """SDCV is the difference in means of reconstructions; with no reconstruction error it must be the plain one,
    which checks the mean-code shortcut and the input scale."""
    from saefeat.detox.vectors import diff_in_means, sdcv

    texts, y = comments
    texts, y = texts[::3], y[::3]
    plain = diff_in_means(exact_embedder, texts, y).vector
    denoised = sdcv(exact_embedder, texts, y).vector
    assert plain.norm() > 0
    torch.testing.assert_close(denoised, plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()))


def test_ssv_lies_in_the_latents_span_and_moves_toxic_text_to_the_clean_side(exact_embedder, comments):
    from sklearn.linear_model import LogisticRegression

    from saefeat.detox.vectors import ssv

    texts, y = comments
    latents = [3, 50, 700, 1000]
    steering = ssv(exact_embedder, texts, y, latents, alpha=2.0)
    basis = exact_embedder.sae.W_dec[latents] / exact_embedder.sae.cfg.input_scale
    coef = torch.linalg.lstsq(basis.T, steering.vector.unsqueeze(1)).solution
    torch.testing.assert_close((coef.T @ basis)[0], steering.vector, rtol=1e-4, atol=1e-4)  # in the span
    assert steering.alpha == 2.0 and steering.vector.norm() > 0
    X = exact_embedder.encode_dense(texts, pooling="mean")
    probe = LogisticRegression(C=1.0, max_iter=2000).fit(X, y)
    toxic = X[y == 1]
    before = probe.decision_function(toxic).mean()
    after = probe.decision_function(toxic + steering.vector.numpy()).mean()
    assert after < before - 1.0
    with pytest.raises(ValueError, match="at least one latent"):
        ssv(exact_embedder, texts, y, [])


def test_split_prompts_is_seeded_disjoint_and_complete():
    from saefeat.detox.selection import split_prompts

    prompts = [f"prompt {i}" for i in range(41)]
    sel, ev = split_prompts(prompts, 0.5, seed=3)
    assert (sel, ev) == split_prompts(prompts, 0.5, seed=3)
    assert sel != split_prompts(prompts, 0.5, seed=4)[0]
    assert len(sel) == 20 and not set(sel) & set(ev) and sorted(sel + ev) == sorted(prompts)
    assert sel == [p for p in prompts if p in set(sel)]  # original order kept
    with pytest.raises(ValueError, match="cannot be split"):
        split_prompts(["only one"], 0.5)


def test_selection_rule_picks_the_least_toxic_setting_within_each_budget():
    from saefeat.detox.selection import ClampSetting, VectorSetting, select_settings

    clamps = [ClampSetting(v, "active", 20, "combined") for v in (0.0, 2.0, 4.0)]
    vectors = [VectorSetting("sdcv", a) for a in (0.5, 1.0)]
    names = ["none"] + [c.name for c in clamps] + [v.name for v in vectors]
    table = pd.DataFrame({"tfidf_mean": [0.30, 0.25, 0.20, 0.10, 0.22, 0.05],
                          "ppl_change": [0.0, 0.02, 0.04, 0.30, 0.10, 0.90],
                          "capability_ppl_change": [0.0, 0.01, 0.12, 0.02, 0.01, 0.01]}, index=names)
    chosen = select_settings(table, clamps, vectors, {"mild": 0.05, "moderate": 0.15, "aggressive": 0.5},
                             "moderate", "tfidf")
    # v=2 is within 5% on continuations but costs 12% on held-out text, so mild keeps v=0
    assert chosen == {"mild": clamps[0].name, "moderate": clamps[1].name, "aggressive": clamps[2].name,
                      "sdcv": vectors[0].name}
    assert "mild" not in select_settings(table.assign(ppl_change=1.0), clamps, vectors, {"mild": 0.05}, "mild",
                                         "tfidf")
    with pytest.raises(ValueError, match="did not score"):
        select_settings(table, clamps, vectors, {"mild": 0.05}, "mild", "profanity")


@pytest.mark.parametrize(("override", "message"), [
    ("steering.selection.fraction=1.0", "selection.fraction"),
    ("steering.selection.vector_budget=extreme", "vector_budget"),
    ("steering.selection.rank_by=[combined,magic]", "selection.rank_by"),
    ("steering.selection.clamp_values=[-1.0]", "selection.clamp_values"),
    ("steering.selection.vector_methods=[]", "selection.vector_methods: empty"),
    ("steering.selection.scorer=perspective", "selection.scorer"),
    ("steering.n_nontoxic_prompts=0", "n_nontoxic_prompts"),
    ("filter.C=[0.1,-1]", "filter.C must be a positive number"),
    ("filter.penalty.sae=l3", "filter.penalty.sae must be l1, l2"),
])
def test_bad_selection_settings_are_named_before_any_model_loads(override, message):
    from saefeat.config import load_config
    from saefeat.tasks.detox import check_config

    cfg = load_config("tasks", ["task=detox", override])
    with pytest.raises(ValueError, match=message):
        check_config(cfg)
