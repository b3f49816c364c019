"""The SAE probing suite on tiny real samples (the quick sizes): each probe's scoring piece, then the command end
to end. Every test reads the same texts through one embedding cache, so each is encoded once per side."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from saefeat.commands.probe import load_data, probe_config, probe_sae, run_probe
from saefeat.embed.config import EmbedConfig
from saefeat.embed.vectorizers import get_embedder
from saefeat.evaluation.metrics import roc_auc
from saefeat.evaluation.probes import (
    BASELINES,
    LEXICAL,
    Side,
    core_probe,
    paired_gaps,
    probe_sides,
    retrieval_probe,
    toxicity_probe,
)
from saefeat.retrieval.evaluation import BM25, per_query_scores, to_run
from saefeat.retrieval.index import SAEIndex
from tests.helpers import random_sae


@pytest.fixture(scope="module")
def _data(tmp_path_factory, data_dir):
    overrides = ["quick=true", f"data_dir={data_dir}", "embed.show_progress_bar=false", "bootstrap=50", "n_jobs=1"]
    cfg = probe_config(overrides)
    return tmp_path_factory.mktemp("probe-cache"), overrides, cfg, load_data(cfg)


@pytest.fixture
def shared(_data, monkeypatch):
    """The quick config and its data, with one embedding cache for every test of this file (not the per-test one
    of conftest: each text is encoded once per side here)."""
    cache, overrides, cfg, data = _data
    monkeypatch.setenv("SAEFEAT_CACHE", str(cache))
    return overrides, cfg, data


def _sides(cfg, **changes):
    from saefeat.config import baseline_config, embed_config

    pen = cfg.probe_penalty
    return probe_sides(embed_config(cfg, **changes), baseline_config(cfg), "sae", pen.sae, pen.baselines)


def test_quick_sizes_yield_to_explicit_overrides(data_dir):
    cfg = probe_config(["quick=true", f"data_dir={data_dir}", "toxicity.max_comments=77"])
    assert cfg.toxicity.max_comments == 77 and cfg.sentiment.max_pairs == cfg.quick_sizes.sentiment.max_pairs
    full = probe_config([f"data_dir={data_dir}"])  # no quick: the defaults
    assert full.sentiment.max_pairs is None and len(full.sentiment.C) > 1 and len(full.toxicity.C) > 1
    from saefeat.config import ConfigError

    for bad in ("sentiment.C=[]", "toxicity.C=-1", "sentiment.C=[0.1,abc]", "probe_penalty.sae=l3",
                "probe_penalty.baselines=[]"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            probe_config([f"data_dir={data_dir}", bad])

    with pytest.raises(ConfigError, match="unknown.*valid: core"):
        probe_config([f"data_dir={data_dir}", "probes=[core,nope]"])
    with pytest.raises(ConfigError, match="scores an SAE"):
        probe_config([f"data_dir={data_dir}", "sae=null"])


def test_sides_read_the_sae_layer_and_the_last_block(shared):
    _, cfg, _ = shared
    sides = _sides(cfg)
    assert [s.name for s in sides] == ["sae", *BASELINES]
    sae, _, last, _ = (get_embedder(s.embed) for s in sides)
    assert sae.layer == sae.sae.cfg.layer == 5 and sae.sae is not None  # the shipped minilm SAE: the final block
    assert last.sae is None and last.layer == last.host.n_layers - 1


def test_paired_gaps_are_the_difference_with_an_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    good, bad = y + rng.normal(0, 0.5, 200), rng.normal(0, 1, 200)
    gaps = paired_gaps(roc_auc, y, {"sae": good, "dense": bad}, "roc_auc", n_boot=200)
    g = gaps["dense"]
    assert set(gaps) == {"dense"}
    assert g["roc_auc"] == pytest.approx(roc_auc(y, good) - roc_auc(y, bad))
    assert 0 < g["roc_auc_lo"] < g["roc_auc"] < g["roc_auc_hi"]


def test_toxicity_probe_scores_real_and_random_saes(shared, tmp_path):
    """Both run through the filter; a random SAE of the same width, k and layer is a strong probing baseline (on
    the 120 quick comments it scores about as well as the trained one), so the trained SAE must show its training
    where random features cannot: it reconstructs the activations."""
    _, cfg, data = shared
    t, d = cfg.toxicity, data["comments"]
    sae_side = _sides(cfg)[0]
    real_sae = get_embedder(sae_side.embed).sae
    rand = random_sae(tmp_path / "random", d_sae=real_sae.d_sae, k=real_sae.k, layer=real_sae.cfg.layer)
    rand_side = Side("sae", "sae", sae_side.embed.replace(sae=str(rand)), sae_side.baselines)
    kw = {"calib_fraction": float(t.calib_fraction), "val_fraction": float(t.val_fraction),
          "toxic_rate": float(t.toxic_rate), "n_boot": 50}
    real = toxicity_probe(d["texts"], d["y"], [sae_side], **kw).metrics["sae"]
    random = toxicity_probe(d["texts"], d["y"], [rand_side], **kw).metrics["sae"]
    for m in (real, random):
        assert 0.7 < m["roc_auc"] <= 1 and m["roc_auc_lo"] <= m["roc_auc"] <= m["roc_auc_hi"] and 0 < m["pr_auc"] <= 1
    texts = [d["texts"][i] for i in range(30)]
    ev = {name: core_probe(get_embedder(side.embed), get_embedder(side.embed).reader.token_ids(texts)).metrics[
        "sae"]["explained_variance"] for name, side in (("real", sae_side), ("random", rand_side))}
    assert ev["real"] > 0.6 and ev["random"] < 0.2, ev  # comments: shorter than the training windows


def test_retrieval_probe_ndcg_equals_a_direct_computation(shared):
    _, cfg, data = shared
    sides, beir = _sides(cfg), data["scifact"]
    result = retrieval_probe(beir, sides, n_boot=50)
    index = SAEIndex.build(beir.texts, sides[0].embed, ids=beir.doc_ids, dense=None)
    ndcg = []
    for qid, query in beir.queries.items():
        ranked = [index.ids[r] for r in index.rank(index.encode([query])[0], None, 10)[0]]
        gains = [beir.qrels[qid].get(d, 0) for d in ranked]
        dcg = sum(g / np.log2(i + 2) for i, g in enumerate(gains))
        ideal = sorted(beir.qrels[qid].values(), reverse=True)[:10]
        ndcg.append(dcg / sum(g / np.log2(i + 2) for i, g in enumerate(ideal)))
    m = result.metrics
    assert 0 < m["sae"]["ndcg_at_10"] <= 1
    assert m["sae"]["ndcg_at_10"] == pytest.approx(np.mean(ndcg), abs=1e-4)
    assert set(m) == {"sae", *BASELINES, LEXICAL} and 0 < m["sae"]["hybrid_ndcg_at_10"] <= 1
    assert result.gaps["dense"]["ndcg_at_10"] == pytest.approx(m["sae"]["ndcg_at_10"] - m["dense"]["ndcg_at_10"])
    rows = result.rows("scifact")
    assert rows["scifact: hybrid_ndcg_at_10"]["sentence"] == m["sentence"]["ndcg_at_10"]
    bm25_rows, bm25_scores = BM25().fit(beir.texts).search(list(beir.queries.values()), 100)
    bm25 = per_query_scores(beir.qrels, to_run(list(beir.queries), beir.doc_ids, bm25_rows, bm25_scores))
    assert m[LEXICAL]["ndcg_at_10"] == pytest.approx(np.mean(bm25["ndcg_at_10"]), abs=1e-9)
    assert rows["scifact: hybrid_ndcg_at_10"]["sae-bm25"] == pytest.approx(
        m["sae"]["hybrid_ndcg_at_10"] - m[LEXICAL]["ndcg_at_10"])


def test_sentiment_probe_is_cross_fitted_on_originals_only(shared):
    """Every pair is scored once, out of fold, by a probe fitted on the other folds' originals: the accuracies
    equal a direct computation with the same folds, the C each fold picks by inner CV is from the grid, and no
    counterfactual is ever fitted on (a probe fitted on them as well scores them higher)."""
    _, cfg, data = shared
    sides = _sides(cfg)
    sent = run_probe("sentiment", cfg, data, sides)
    (texts, y), (cf_texts, y_cf) = data["sentiment"]["originals"], data["sentiment"]["counterfactuals"]
    assert len(texts) == len(cf_texts) == cfg.sentiment.max_pairs and (y != y_cf).all()  # each edit flips its label
    assert np.mean([m["in_domain_accuracy"] for m in sent.metrics.values()]) > 0.6  # 60 reviews: above chance
    assert sent.extra["n_pairs"] == len(texts) and all(sent.extra[f"{s.name}/C"] in cfg.sentiment.C for s in sides)
    assert sent.extra["sae/l1"] == 1 and sent.extra["dense/l1"] == 0  # the configured penalties: sparse SAE probe
    from sklearn.model_selection import StratifiedKFold

    from saefeat.evaluation.probes import linear_probe

    rep = sides[1].transformer()  # dense
    X, Xc = rep.fit_transform(texts), rep.transform(cf_texts)
    p, pc, pc_leaky = np.empty_like(y), np.empty_like(y), np.empty_like(y)
    for tr, te in StratifiedKFold(int(cfg.sentiment.n_folds), shuffle=True, random_state=int(cfg.seed)).split(X, y):
        clf = linear_probe(X[tr], y[tr], tuple(cfg.sentiment.C), sides[1].penalty, seed=int(cfg.seed))
        p[te], pc[te] = clf.predict(X[te]), clf.predict(Xc[te])
        leaky = linear_probe(np.vstack([X[tr], Xc[tr]]), np.concatenate([y[tr], y_cf[tr]]), 1.0)
        pc_leaky[te] = leaky.predict(Xc[te])
    m = sent.metrics["dense"]
    assert m["in_domain_accuracy"] == pytest.approx(np.mean(p == y))
    assert m["counterfactual_accuracy"] == pytest.approx(np.mean(pc == y_cf))
    assert np.mean(pc_leaky == y_cf) > m["counterfactual_accuracy"]


def test_property_probe_gives_sensible_values(shared):
    _, cfg, data = shared
    sides = _sides(cfg)
    props = run_probe("properties", cfg, data, sides)
    for name, m in props.metrics.items():
        assert 0 < m["mean_ap"] <= 1, name
        assert m["mean_ap_lo"] <= m["mean_ap"] <= m["mean_ap_hi"]
    assert props.gaps["dense"]["mean_ap"] == pytest.approx(props.metrics["sae"]["mean_ap"]
                                                           - props.metrics["dense"]["mean_ap"])
    assert props.extra["n_property_draws"] == 4 * cfg.properties.draws  # obscene, insult, positive, negative


def test_core_probe_real_sae_reconstructs_better_than_a_random_one(shared, tmp_path):
    _, cfg, data = shared
    emb = get_embedder(_sides(cfg)[0].embed)
    windows = [ids[:128] for ids in emb.host.tokenize(data["comments"]["texts"][:24])]
    real = core_probe(emb, windows).metrics["sae"]
    random = get_embedder(EmbedConfig(cache=False, sae=str(random_sae(tmp_path / "r", d_sae=4096, k=32))))
    rand = core_probe(random, windows).metrics["sae"]
    assert real["l0"] == pytest.approx(emb.sae.k)
    assert 0 <= real["dead_fraction"] <= 1 and 0 <= real["dense_fraction"] <= 1
    assert real["explained_variance"] > 0.5 > rand["explained_variance"], (real, rand)


def test_probe_sae_end_to_end_logs_a_parent_and_a_child_per_probe(shared):
    overrides, cfg, _ = shared
    table = probe_sae(cfg)
    assert {"toxicity: roc_auc", "scifact: ndcg_at_10", "earnings: cv_roc_auc", "core: l0"} <= set(table.index)
    assert {"sae", "dense", "dense_last", "sentence", "sae-dense"} <= set(table.columns)
    assert np.isnan(table.loc["core: l0", "dense"])  # the SAE's own metrics have no baseline
    assert np.isfinite(table.loc["earnings: cv_roc_auc", ["sae", "dense", "dense_last", "sentence"]]).all()
    runs = mlflow.search_runs(experiment_names=["probe-sae"])
    parent = runs[runs["tags.saefeat.role"] == "parent"]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent.run_id.iloc[0]]
    assert sorted(children["tags.mlflow.runName"]) == sorted(cfg.probes)
    tox = children[children["tags.mlflow.runName"] == "toxicity"].iloc[0]
    assert tox["metrics.sae/roc_auc"] == pytest.approx(table.loc["toxicity: roc_auc", "sae"])
    client = mlflow.tracking.MlflowClient()
    files = {f.path for f in client.list_artifacts(parent.run_id.iloc[0])}
    assert {"probes.json", "sae_gap.png", "config.yaml"} <= files
    assert parent["metrics.wall_seconds"].iloc[0] > 0


def test_cli_runs_the_quick_suite(shared):
    from typer.testing import CliRunner

    from saefeat.cli import app

    overrides, _, _ = shared
    result = CliRunner().invoke(app, ["probe-sae", "--quick", *overrides, "probes=[core]"])
    assert result.exit_code == 0, result.output
    assert "core: explained_variance" in result.output and "1 probe in" in result.output


def test_a_sentence_sae_is_scored_by_the_cosine_of_its_codes(shared, tmp_path):
    """`representation=sae_sentence`: SciFact ranks by the cosine of pooled codes, and `hybrid` fuses them with
    `sentence`; the nDCG equals a direct computation."""
    import dataclasses

    from saefeat.config import baseline_config, embed_config
    from saefeat.embed.vectorizers import SentenceSAEVectorizer, SentenceVectorizer
    from saefeat.errors import SaefeatError
    from saefeat.sae.formats import save_sae
    from saefeat.sae.sentence import train_vector_sae

    _, cfg, data = shared
    emb, _ = SentenceVectorizer(cache_dir=False).encode_chunks(list(data["comments"]["texts"]))
    sae, _ = train_vector_sae(emb, d_sae=64, k=8, host="minilm", epochs=5, batch_size=32, seed=0)
    path = save_sae(sae, tmp_path / "sentence-sae")
    baselines = dataclasses.replace(baseline_config(cfg), sentence_sae=str(path))
    sides = probe_sides(embed_config(cfg), baselines, "sae_sentence")
    assert sides[0].representation == "sae_sentence"
    beir = data["scifact"]
    result = retrieval_probe(beir, sides, n_boot=20)
    vec = SentenceSAEVectorizer(sae=str(path), cache_dir=False)
    D, Q = vec.transform(beir.texts).toarray(), vec.transform(list(beir.queries.values())).toarray()
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    ndcg = []
    for i, qid in enumerate(beir.queries):
        ranked = [beir.doc_ids[r] for r in np.argsort(-(D @ Q[i]))[:10]]
        dcg = sum(beir.qrels[qid].get(d, 0) / np.log2(j + 2) for j, d in enumerate(ranked))
        ideal = sorted(beir.qrels[qid].values(), reverse=True)[:10]
        ndcg.append(dcg / sum(g / np.log2(j + 2) for j, g in enumerate(ideal)))
    assert result.metrics["sae"]["ndcg_at_10"] == pytest.approx(np.mean(ndcg), abs=1e-6)
    assert "hybrid_ndcg_at_10" in result.metrics["sae"] and "sae-sentence" not in result.metrics
    with pytest.raises(SaefeatError, match="sae or sae_sentence"):
        probe_sides(embed_config(cfg), baseline_config(cfg), "dense")
