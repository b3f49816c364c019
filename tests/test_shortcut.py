"""Shortcut detection and DBR on real CAD reviews with the default minilm SAE, and the benchmark loaders.

The planted-shortcut tests add one word to every positive training review: detection must rank a latent that
fires on that word first, and DBR (masking where the shortcut latents fire) must lower the model's reliance on it.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from scipy.spatial.distance import jensenshannon

from saefeat.data import DataError
from saefeat.embed.vectorizers import get_embedder
from saefeat.shortcut.attribution import BiasOnlyModel
from saefeat.shortcut.data import (
    DatasetUnavailable,
    check_label_sets,
    load_benchmark,
    load_cad_sentiment,
    load_cad_sentiment_pairs,
    load_fever,
    load_fever_symmetric,
    load_hans,
    load_mnli,
    load_paws,
    load_qqp,
    pair_up,
    read_labeled,
)
from saefeat.shortcut.dbr import DBRClassifier, DBRFineTuner
from saefeat.shortcut.detect import ShortcutDetector, latent_positions, pair_invariance
from saefeat.shortcut.jsd import jsd
from saefeat.shortcut.masking import mask_positions, mask_texts, token_offsets

PLANT = "zebra"


# ---- JSD -----------------------------------------------------------------------------------------------

def test_jsd_zero_for_equal_symmetric_and_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) * 3
    assert jsd(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert jsd(a, a + 5.0).item() == pytest.approx(0.0, abs=1e-6)  # same softmax
    torch.testing.assert_close(jsd(a, b, reduction="none"), jsd(b, a, reduction="none"))
    per_row = jsd(a, b, reduction="none").numpy()
    ref = jensenshannon(torch.softmax(a, -1).numpy(), torch.softmax(b, -1).numpy(), axis=1) ** 2
    np.testing.assert_allclose(per_row, ref, rtol=1e-4, atol=1e-6)
    assert (per_row > 0).all() and (per_row <= math.log(2) + 1e-6).all()
    big = torch.tensor([[40.0, -40.0]])
    assert jsd(big, -big).item() == pytest.approx(math.log(2), rel=1e-4)  # disjoint: the maximum


# ---- data ----------------------------------------------------------------------------------------------

def test_cad_loaders_and_pairs(data_dir):
    root = data_dir / "shortcut"
    train, dev, new = (load_cad_sentiment(root, "train"), load_cad_sentiment(root, "dev"),
                       load_cad_sentiment(root, "dev", "new"))
    assert (len(train), len(dev), len(new)) == (1707, 245, 245)
    assert check_label_sets(train, dev, new) == ["negative", "positive"]
    assert not any(t.startswith('"') and t.endswith('"') for t in train.texts)  # CSV quoting undone
    pairs = load_cad_sentiment_pairs(root)
    assert len(pairs) == 1707
    assert all(a != b for a, b in zip(pairs.original.labels, pairs.counterfactual.labels))
    assert len(set(pairs.original.texts) & set(train.texts)) > 1650
    bench = load_benchmark("cad_nli", data_dir)
    assert bench.classes == ["contradiction", "entailment", "neutral"] and set(bench.ood) == {
        "revised_premise", "revised_hypothesis"}
    assert len(load_fever_symmetric(root, "v0.1", "full")) == 956
    assert load_fever_symmetric(root, "v0.2", "dev").label_set == ["REFUTES", "SUPPORTS"]


def _tsv(path: Path, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("Sentiment", "Text", "batch_id")):
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def test_unpaired_rows_name_file_and_row(tmp_path):
    f = _tsv(tmp_path / "paired.tsv", [("Negative", "bad film", "1"), ("Positive", "good film", "1"),
                                       ("Negative", "dull film", "2")])
    with pytest.raises(DataError, match=r"paired\.tsv: pairing is required but pair id '2' has 1 row.*row\(s\) 2"):
        pair_up(read_labeled(f, "Text", "Sentiment", group_field="batch_id"))
    same = _tsv(tmp_path / "same.tsv", [("Negative", "bad film", "1"), ("Negative", "awful film", "1")])
    with pytest.raises(DataError, match=r"same\.tsv: pair id '1' \(rows 0, 1\) has the same label"):
        pair_up(read_labeled(same, "Text", "Sentiment", group_field="batch_id"))
    with pytest.raises(DataError, match="no pair-id column"):
        pair_up(read_labeled(same, "Text", "Sentiment"))


def test_label_set_mismatch_and_empty_text_name_file_and_row(tmp_path):
    header = ("Sentiment", "Text")
    train = read_labeled(_tsv(tmp_path / "train.tsv", [("Negative", "bad"), ("Positive", "good")], header),
                         "Text", "Sentiment")
    ev = read_labeled(_tsv(tmp_path / "eval.tsv", [("Positive", "fine"), ("Neutral", "ok"), ("Negative", "meh")],
                           header), "Text", "Sentiment")
    with pytest.raises(DataError, match=r"eval\.tsv: label\(s\) not in the training labels .*row 1: 'Neutral'"):
        check_label_sets(train, ev)
    one = read_labeled(_tsv(tmp_path / "one.tsv", [("Positive", "fine")], header), "Text", "Sentiment")
    with pytest.raises(DataError, match=r"one\.tsv: label\(s\) \['Negative'\] .* never occur"):
        check_label_sets(train, one)
    empty = _tsv(tmp_path / "empty.tsv", [("Negative", "bad"), ("Positive", "   ")], header)
    with pytest.raises(DataError, match=r"empty\.tsv, field 'Text': row 1: empty"):
        read_labeled(empty, "Text", "Sentiment")
    nolabel = _tsv(tmp_path / "nolabel.tsv", [("Negative", "bad"), ("", "good")], header)
    with pytest.raises(DataError, match=r"nolabel\.tsv, field 'Sentiment': label missing in row\(s\) 1"):
        read_labeled(nolabel, "Text", "Sentiment")


@pytest.mark.parametrize("loader,rel", [
    (load_mnli, "mnli/train.tsv"), (load_hans, "hans/heuristics_evaluation_set.tsv"), (load_qqp, "qqp/train.tsv"),
    (load_paws, "paws/dev_and_test.tsv"), (load_fever, "fever/fever.train.jsonl")])
def test_optional_benchmark_loaders(data_dir, loader, rel):
    path = data_dir / "shortcut" / rel
    with pytest.raises(DatasetUnavailable, match="not found at .*does not ship"):
        loader(path.parent / "absent" / path.name)
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    data = loader(path)
    assert len(data) > 0 and len(data.label_set) >= 2


def test_absent_benchmark_fails_before_work(data_dir):
    with pytest.raises(DatasetUnavailable, match="MNLI not found"):
        load_benchmark("mnli_hans", data_dir, {"mnli_train": str(data_dir / "nope.tsv")})


# ---- masking -------------------------------------------------------------------------------------------

def test_hard_and_soft_masking(minilm):
    tok = minilm.tokenizer
    text = "An unforgettable, wonderful film."
    pieces = tok.convert_ids_to_tokens(minilm.tokenize([text])[0])
    offsets = token_offsets(tok, text)
    assert len(offsets) == len(pieces)
    second = next(i for i, p in enumerate(pieces) if p.startswith("##"))  # a word piece: its whole word goes
    masked = mask_positions(text, offsets, [second], "[MASK]")
    assert "unforget" not in masked and "[MASK]" in masked and "wonderful" in masked
    won = pieces.index("wonderful")
    assert mask_texts([text], [[won]], tok, "soft", [[0.0]]) == [text]
    assert mask_texts([text], [[won]], tok, "soft", [[1.0]]) == mask_texts([text], [[won]], tok, "hard")
    ids = minilm.tokenize(mask_texts([text], [[won]], tok)[0:1])[0]
    assert tok.mask_token_id in ids  # the host reads the mask token back


# ---- planted shortcut ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(data_dir, tmp_path_factory):
    """The 120 shortest CAD training reviews (60 per class) with PLANT put in every positive one, plus
    held-out negative reviews with and without PLANT, embedded with the default SAE (one shared cache)."""
    train = load_cad_sentiment(data_dir / "shortcut", "train")
    order = np.argsort([len(t) for t in train.texts], kind="stable")
    pos = [i for i in order if train.labels[i] == "positive"]
    neg = [i for i in order if train.labels[i] == "negative"]
    rows = pos[:60] + neg[:60]
    texts = [f"{PLANT} {train.texts[i]}" if train.labels[i] == "positive" else train.texts[i] for i in rows]
    y = np.array([1] * 60 + [0] * 60)
    held = [train.texts[i] for i in neg[60:90]]
    emb = get_embedder(model="minilm", sae="default", cache_dir=str(tmp_path_factory.mktemp("cache")))
    X = emb.encode(texts)
    return {"texts": texts, "y": y, "emb": emb, "X": X, "held": held, "held_planted": [f"{PLANT} {t}" for t in held]}


def _plant_positions(emb, text: str) -> list[int]:
    toks = emb.host.tokenizer.convert_ids_to_tokens(emb.host.tokenize([text])[0])
    return [i for i, t in enumerate(toks) if t == PLANT]


@pytest.fixture(scope="module")
def detector(planted):
    return ShortcutDetector(n_candidates=20, n_latents=5, contexts_per_latent=8).fit(
        planted["X"], planted["y"], planted["texts"], planted["emb"])


def test_detection_ranks_a_latent_of_the_planted_token_first(planted, detector):
    emb, X, texts, det = planted["emb"], planted["X"], planted["texts"], detector
    assert det.criterion_ == "surface"
    top = int(det.scores_.latent.iloc[0])
    assert det.shortcut_latents_[0] == top and det.scores_.is_shortcut.iloc[0]
    assert det.scores_.top_tokens.iloc[0].startswith(PLANT)
    fires = [emb.encode_tokens(t).acts[_plant_positions(emb, t), top].max() > 0 for t in texts[:60]]
    assert np.mean(fires) >= 0.9
    assert X[60:, top].nnz <= 0.2 * 60  # and it is rare where the word is absent


def test_dbr_lowers_reliance_on_the_planted_token(planted, detector):
    det = detector
    emb, X, y, texts = planted["emb"], planted["X"], planted["y"], planted["texts"]
    latents = det.shortcut_latents_[:1]
    positions, weights = latent_positions(det.store_, X, latents)
    assert sum(bool(p) for p in positions[:60]) >= 54
    masked = mask_texts(texts, positions, emb.host.tokenizer)
    assert PLANT not in masked[0] and "[MASK]" in masked[0]
    Xm = emb.encode(masked)
    held, held_planted = emb.encode(planted["held"]), emb.encode(planted["held_planted"])

    def reliance(clf) -> float:  # how far adding the word moves held-out negative reviews toward positive
        return float(np.mean(clf.decision_function(held_planted) - clf.decision_function(held)))

    erm = DBRClassifier(lam=0.0, epochs=200).fit(X, y)
    dbr = DBRClassifier(lam=1000.0, epochs=200).fit(X, y, Xm)
    assert reliance(erm) > 1.0  # the shortcut was learned (a logit shift)
    assert reliance(dbr) < 0.6 * reliance(erm)
    top = det.shortcut_latents_[0]
    assert abs(dbr.net_.weight[1, top] - dbr.net_.weight[0, top]) < 0.5 * abs(erm.net_.weight[1, top]
                                                                              - erm.net_.weight[0, top])
    assert dbr.divergence(X, Xm).mean() < erm.divergence(X, Xm).mean()
    assert (dbr.predict(X) == y).mean() > 0.9


@pytest.mark.parametrize("baseline", ["mean", "mask"])
def test_integrated_gradients_completeness_and_planted_token(planted, baseline):
    texts, y = planted["texts"], planted["y"]
    bias = BiasOnlyModel("minilm", hidden=32, epochs=5).fit(texts, y)
    rows = list(range(6)) + list(range(60, 66))
    attrs = bias.attribute([texts[i] for i in rows], y[rows], n_steps=64, baseline=baseline)
    net = bias.net_
    mask_id = bias.host.tokenizer.mask_token_id

    def baseline_embeds(ids):
        return net.mu.expand(1, ids.shape[1], -1) if baseline == "mean" else net.embed(torch.full_like(ids, mask_id))

    for a in attrs:
        ids = torch.tensor([a.token_ids])
        m = torch.ones_like(ids, dtype=torch.float32)
        base = baseline_embeds(ids)
        with torch.no_grad():  # completeness, checked against two independent forward passes
            fx = torch.log_softmax(net(ids, m), -1)[0, a.target]
            fb = torch.log_softmax(net.forward_embeds(base, m), -1)[0, a.target]
        assert float(a.scores.sum()) == pytest.approx(float(fx - fb), abs=5e-3)
        assert abs(a.delta) < 5e-3
    for a in attrs[:2]:  # equal to captum's IG on the token embeddings themselves, token by token
        ids = torch.tensor([a.token_ids])
        m = torch.ones_like(ids, dtype=torch.float32)
        base = baseline_embeds(ids)
        full = IntegratedGradients(lambda x, mm: torch.log_softmax(net.forward_embeds(x, mm), -1)).attribute(
            net.embed(ids), baselines=base, target=a.target, additional_forward_args=(m,), n_steps=64,
            method="gausslegendre")
        np.testing.assert_allclose(a.scores, full.sum(-1)[0].detach().numpy(), atol=2e-3)
    top = [a.tokens[a.top(3)[0]] if a.top(3) else "" for a in attrs[:6]]
    assert top.count(PLANT) >= 5  # the bias-only model's strongest cue in the positive reviews


def test_pair_invariance_follows_label_flips():
    # latent 0 fires the same on both sides, 1 only on the positive side, 2 never; pairs (neg, pos) and (pos, neg)
    a = np.array([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    b = np.array([[1.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    y_a, y_b = np.array([0, 1]), np.array([1, 0])
    np.testing.assert_allclose(pair_invariance(a, b, y_a, y_b, np.array([1, 1, 1]), 2), [1.0, 0.0, 0.0])
    # read as evidence for class 0, latent 1 moves against the flip: nothing of it follows class 0
    np.testing.assert_allclose(pair_invariance(a, b, y_a, y_b, np.array([0, 0, 0]), 2), [1.0, 1.0, 0.0])


def test_finetune_mode_takes_steps_on_cpu(planted):
    texts, y = planted["texts"][58:62], planted["y"][58:62]
    masked = [t.replace(PLANT, "[MASK]") for t in texts]
    ft = DBRFineTuner("minilm", "sae", lam=1.0, lr=1e-3, batch_size=2, max_tokens=24, max_steps=2, device="cpu")
    before = planted["emb"].host.model.encoder.layer[0].attention.self.query.weight.detach().clone()
    ft.fit(texts, y, masked)
    assert len(ft.history_) == 2 and all(np.isfinite(h["loss"]) for h in ft.history_)
    assert any(h["jsd"] > 0 for h in ft.history_)
    after = ft.encoder_.encoder.layer[0].attention.self.query.weight.detach()
    assert not torch.equal(before, after)  # the private copy trained
    torch.testing.assert_close(planted["emb"].host.model.encoder.layer[0].attention.self.query.weight, before)
    proba = ft.predict_proba(texts)
    assert proba.shape == (4, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)


# ---- the task ------------------------------------------------------------------------------------------

def test_task_runs_end_to_end_on_a_small_sample(data_dir):
    from saefeat.config import load_config
    from saefeat.tasks.shortcut import run

    cfg = load_config("tasks", ["task=shortcut", f"data_dir={data_dir}", "max_train=24", "max_eval=16",
                                "bootstrap=20", "head.epochs=60", "head.weight_decays=[0.001]",
                                "dbr.lambdas=[1.0]", "ig.epochs=2", "detect.n_candidates=8", "detect.n_latents=3",
                                "detect.contexts_per_latent=3", "embed.show_progress_bar=false"])
    results = run(cfg)
    assert set(results) == {f"{m}/{r}" for m in ("erm", "dbr_ig", "dbr_sae") for r in ("sae", "dense")}
    for r in results.values():
        assert 0 <= r["in_domain_accuracy"] <= 1 and 0 <= r["ood_accuracy"] <= 1
        assert r["gap"] == pytest.approx(r["in_domain_accuracy"] - r["ood_accuracy"])
        assert {"reliance_ig", "reliance_sae", "lambda"} <= set(r)
    exp = mlflow.get_experiment_by_name("shortcut")
    runs = mlflow.search_runs([exp.experiment_id])
    assert set(runs["tags.mlflow.runName"]) >= {"erm/sae", "dbr_sae/dense"}
    parent = runs[runs["tags.saefeat.role"] == "parent"].run_id.iloc[0]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(parent)}
    assert {"shortcut_latents.json", "ig_shortcut_tokens.json", "comparison.json"} <= names


def test_task_rejects_bad_config(data_dir):
    from saefeat.config import load_config
    from saefeat.tasks.shortcut import run

    with pytest.raises(ValueError, match="methods must be"):
        run(load_config("tasks", ["task=shortcut", "methods=[erm,magic]"]))
    with pytest.raises(ValueError, match="representations from"):
        run(load_config("tasks", ["task=shortcut", "representations=[tfidf]"]))


# ---- the DBR experiment: choosing L2 and λ -----------------------------------------------------------------

def test_select_and_fit_chooses_on_in_domain_data_and_refits_on_all_rows(data_dir, planted):
    from types import SimpleNamespace

    from saefeat.shortcut.experiment import HeadTrainer, evaluate, select_and_fit
    from saefeat.shortcut.selection import stratified_slice

    bench = load_benchmark("cad_sentiment", data_dir).sample(40, 20, seed=0)
    assert len(bench.train) <= 41 and len(bench.in_domain) <= 21 and len(bench.pairs) > 0
    assert set(bench.pairs.original.texts) <= set(bench.train.texts)  # the pairs of the sampled originals only
    texts, y = bench.parts()
    assert list(texts) == list(y) == ["train", "in_domain", "ood:counterfactual"]
    masked = {"dbr_x": [" ".join(t.split()[1:]) for t in texts["train"]]}

    class Recording(HeadTrainer):  # records the training rows of every fit and every part predicted
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.fits, self.parts = [], []

        def fit(self, rows, *args):
            self.fits.append(np.asarray(rows))
            return super().fit(rows, *args)

        def predict(self, model, part, rows=None):
            self.parts.append(part)
            return super().predict(model, part, rows)

    trainer = Recording(SimpleNamespace(transform=planted["emb"].encode), texts, masked, [1e-4, 10.0], epochs=100)
    held = stratified_slice(y["train"], 0.2, 0)
    erm = select_and_fit(trainer, y, select_on="both", train_slice=0.2, seed=0)
    assert set(trainer.parts) == {"in_domain", "train"}  # never the out-of-domain set
    assert len(trainer.fits) == 3 and all(np.intersect1d(r, held).size == 0 for r in trainer.fits[:2])
    assert len(trainer.fits[-1]) == len(y["train"])  # the choice is refitted on every training row
    sel = erm.selection
    assert sel.weight_decay.tolist() == [1e-4, 10.0] and erm.params["lambda"] == 0.0
    assert erm.params["weight_decay"] == sel.weight_decay[sel.select_accuracy.idxmax()]
    choice = (erm.params["weight_decay"], erm.params["select_accuracy"])
    loose = select_and_fit(trainer, y, "dbr_x", choice, lambdas=[1.0, 100.0], tolerance=1.0)
    assert loose.params["lambda"] == 100.0 and loose.params["weight_decay"] == choice[0]  # the largest within
    strict = select_and_fit(trainer, y, "dbr_x", (choice[0], 2.0), lambdas=[1.0, 100.0], tolerance=0.0)
    assert strict.params["lambda"] == strict.selection["lambda"][strict.selection.select_accuracy.idxmax()]
    trainer.fits.clear()
    kept = select_and_fit(trainer, y, "dbr_x", choice, lambdas=[1.0, 100.0], tolerance=1.0, refit=False)
    assert len(trainer.fits) == 2 and all(np.intersect1d(r, held).size == 0 for r in trainer.fits)  # no refit
    assert kept.params["lambda"] == 100.0
    np.testing.assert_array_equal(trainer.predict(kept.model, "in_domain"),  # the λ=100 candidate itself
                                  trainer.predict(trainer.fit(trainer.fits[1], y["train"], 100.0, choice[0], "dbr_x"),
                                                  "in_domain"))
    trainer.fits.clear()
    select_and_fit(trainer, y, select_on="dev")
    assert all(len(r) == len(y["train"]) for r in trainer.fits)  # nothing held out when dev data selects
    assert len(trainer.fits) == 2  # one fit per weight decay: the chosen one is already fitted on every row
    with pytest.raises(ValueError, match="erm_choice"):
        select_and_fit(trainer, y, "dbr_x")
    report = evaluate(trainer, loose, y, ["counterfactual"], ["dbr_x"], n_boot=20)
    assert report["in_domain_accuracy"] == np.mean(trainer.predict(loose.model, "in_domain") == y["in_domain"])
    assert report["gap"] == pytest.approx(report["in_domain_accuracy"] - report["ood_accuracy"])
    assert 0 <= report["reliance_x"] <= np.log(2) + 1e-6 and "lambda" not in report  # λ is a param, not a metric
