"""Pinned results on fixed, seeded samples of the real data: a change that makes a task's headline number worse
fails here, not only a change that breaks its structure (issue 20).

Every pin runs in fp32 (`embed.precision=fp32`), so it does not depend on the CPU's bf16 support; what is left
between CPUs is the order of float sums, which moves these numbers by well under a tenth of each tolerance. Each
tolerance says why it is that wide; it is narrower than the drop of the broken variant named beside it.
"""

import importlib.util

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from saefeat.embed.config import BaselineConfig, EmbedConfig
from saefeat.representations import make_representation


def pinned(measured: float, expected: float, tol: float, what: str) -> None:
    assert abs(measured - expected) <= tol, f"{what}: measured {measured:.4f}, pinned {expected:.4f} +/- {tol}"


@pytest.fixture(scope="module")
def toxicity_split(data_dir):
    """600 training and 600 evaluation comments of the balanced Jigsaw set (a seeded draw, at most 400 chars)."""
    from saefeat.detox.data import load_labelled_comments

    texts, y = load_labelled_comments(data_dir / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz")
    order = np.random.default_rng(0).permutation(len(texts))[:1200]
    docs = [texts[i][:400] for i in order]
    return docs[:600], y[order[:600]], docs[600:], y[order[600:]]


# Pins measured with the shipped k=48 minilm SAE (fp32, AMD EPYC avx2 avx512_bf16; the k=32 SAE before it gave
# sae 0.9361 as well, to four places). Broken variants tried on the k=32 SAE: run at k=4 (sae 0.898) and every
# document cut to its first 8 tokens (sae 0.855, dense 0.818).
TOXICITY_PINS = {"sae": 0.9361, "dense": 0.9263}
TOXICITY_TOL = 0.015  # about one bootstrap standard deviation of ROC-AUC over 600 balanced comments


@pytest.mark.parametrize("representation", ["sae", "dense"])
def test_toxicity_probe_roc_auc_is_pinned(toxicity_split, representation):
    """A logistic-regression probe on `sae` (shipped minilm SAE, max pooling) or `dense` (mean of the same layer)."""
    X_tr, y_tr, X_ev, y_ev = toxicity_split
    rep = make_representation(representation, EmbedConfig(precision="fp32", show_progress_bar=False),
                              BaselineConfig())
    A, B = rep.fit_transform(X_tr), rep.transform(X_ev)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(A, y_tr)
    auc = roc_auc_score(y_ev, clf.predict_proba(B)[:, 1])
    pinned(auc, TOXICITY_PINS[representation], TOXICITY_TOL, f"toxicity ROC-AUC of {representation}")


# Pinned with the k=48 SAE and the task's sqrt_max pooling (fp32, AMD EPYC avx2 avx512_bf16; max pooling: 0.8429,
# the k=32 SAE with max: 0.8554). Broken variant tried on the k=32 SAE: run at k=4 (sae 0.772). BM25 needs no model:
# its pin checks the sample and the scoring.
RETRIEVAL_PINS = {"sae": 0.8635, "bm25": 0.8203}
RETRIEVAL_TOL = {"sae": 0.03,  # about one bootstrap standard deviation of nDCG@10 over 60 queries
                 "bm25": 0.002}  # exact code on exact data: only a changed sample or scorer moves it


def test_retrieval_ndcg_is_pinned(data_dir, tmp_path):
    """The retrieval task on the first 60 SciFact train queries over their judged abstracts plus random ones (400)."""
    from saefeat.config import load_config
    from saefeat.tasks import get_task

    cfg = load_config("tasks", ["task=retrieval", f"data_dir={data_dir}", "data.max_queries=60", "data.max_docs=400",
                                "representations=[sae,bm25]", "bootstrap=50", "embed.precision=fp32",
                                "embed.show_progress_bar=false"])
    results = get_task("retrieval")(cfg)
    for name, expected in RETRIEVAL_PINS.items():
        pinned(results[name]["ndcg_at_10"], expected, RETRIEVAL_TOL[name], f"SciFact nDCG@10 of {name}")


def test_sentence_matches_sentence_transformers_encode(data_dir):
    """`sentence` (its default `truncate`) is sentence-transformers' own `encode` of the same text, long abstracts
    included; `mean` differs exactly where a text is longer than max_seq_length."""
    from saefeat.embed.vectorizers import SentenceVectorizer
    from saefeat.retrieval.evaluation import load_beir

    texts = load_beir(data_dir / "retrieval" / "scifact", "train").texts
    vec = SentenceVectorizer("minilm", precision="fp32", cache_dir=False)
    lengths = [len(vec.st.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts[:200]]
    long, short = [i for i, n in enumerate(lengths) if n > 300][:3], [i for i, n in enumerate(lengths) if n < 200][:3]
    sample = [texts[i] for i in long + short]
    ours = vec.transform(sample)
    theirs = vec.st.encode(sample, normalize_embeddings=True, convert_to_numpy=True)
    cos = np.sum(ours * theirs, axis=1) / np.linalg.norm(ours, axis=1)
    assert cos.min() > 0.9999, cos
    means = SentenceVectorizer("minilm", precision="fp32", cache_dir=False, long_docs="mean").transform(sample)
    cos_mean = np.sum(means * theirs, axis=1) / np.linalg.norm(means, axis=1)
    assert cos_mean[:3].max() < 0.99 and cos_mean[3:].min() > 0.9999  # chunks change long texts only


# Pinned at this commit (fp32, AMD EPYC avx2 avx512_bf16). Broken variant tried: SAELatentClamp adding
# decode(original) - decode(clamped), the edit's sign flipped (profanity change +0.048, perplexity +0.106).
DETOX_PINS = {"profanity_mean_change": -0.2723, "ppl_change": 0.0659}
DETOX_TOL = {"profanity_mean_change": 0.06,  # greedy decoding on 48 prompts: one changed continuation moves it ~0.02
             "ppl_change": 0.06}


@pytest.mark.skipif(importlib.util.find_spec("profanity_check") is None,
                    reason="needs the detox extra (alt-profanity-check)")
def test_detox_steering_is_pinned(data_dir):
    """The shipped smollm2 SAE's top 20 toxic latents (ranked on 400 training comments) clamped to -2 x their mean
    toxic activation where they fire, on 48 challenging prompts, 12 greedy tokens: the TF-IDF scorer's mean
    toxicity and the continuations' perplexity change against no intervention."""
    from saefeat.detox.data import load_labelled_comments, load_prompts, sample_prompts, stratified_cap
    from saefeat.detox.evaluate import Condition, ProfanityCheckScorer, evaluate_conditions
    from saefeat.detox.experiment import clamp_condition
    from saefeat.detox.latents import find_toxic_latents
    from saefeat.detox.selection import ClampSetting

    texts, y = load_labelled_comments(data_dir / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz")
    texts = [t[:400] for t in texts]
    rank_texts, rank_y = stratified_cap(texts, y, 400, seed=0)
    embed = EmbedConfig(model="smollm2", precision="fp32", max_tokens=128, cache=False, show_progress_bar=False)
    rankings, probe = find_toxic_latents(rank_texts, rank_y, embed, n=20, max_freq_clean=0.3)
    emb = probe.representation_.embedder
    prompts = sample_prompts(load_prompts(data_dir / "toxicity" / "rtp_challenging_toxic_prompts.jsonl"), 48, seed=0)
    conditions = [Condition("none"), clamp_condition("clamp", emb, rankings["combined"],
                                                     ClampSetting(2.0, "active", 20, "combined"))]
    table, _, _ = evaluate_conditions(emb.host, conditions, prompts, [ProfanityCheckScorer()], n_boot=10,
                                      max_new_tokens=20, show_progress_bar=False)
    for key, expected in DETOX_PINS.items():
        pinned(float(table.loc["clamp", key]), expected, DETOX_TOL[key], f"detox steering {key}")


def pinned_all(measured: dict[str, float], expected: dict[str, float], tol: float, what: str) -> None:
    """Every pin of a run checked at once, so a failure lists all the moved numbers with their measured values."""
    moved = {k: (measured[k], v) for k, v in expected.items() if abs(measured[k] - v) > tol}
    assert not moved, f"{what} moved beyond +/- {tol}: " + ", ".join(
        f"{k} measured {m:.4f}, pinned {v:.4f}" for k, (m, v) in moved.items())


# Pinned with the task's defaults, minilm's layer-3 SAE and `sum` pooling (so `dense` reads layer 3 too), at weight
# decay 0.001 and λ 10 (fp32, Intel Xeon avx2 avx512_bf16 amx_bf16). With the layer-5 k=48 SAE and `max` of before
# the pins were sae 0.770 / 0.535 / 0.745 / 0.500 and dense 0.710 / 0.535 / 0.715 / 0.465, the same within tolerance
# on an AMD EPYC avx2 avx512_bf16. DBR with SAE-latent tokens is not pinned by accuracy: its masked copies follow the
# detector's cut of 10 latents, and across CPUs the same commit gave dbr_sae/dense 0.600 / 0.530 (Xeon), 0.750 /
# 0.575 and 0.770 / 0.585 (EPYC) in-domain / counterfactual, every other pin within tolerance. What DBR itself
# promises is checked instead: its JSD term takes the prediction off the masked tokens. Broken variant tried on the
# layer-3 SAE: run at k=4 (embed.sae_k=4), which moved all four SAE pins by 0.03 to 0.075.
SHORTCUT_PINS = {"erm/sae:in_domain": 0.860, "erm/sae:ood": 0.535, "dbr_ig/sae:in_domain": 0.815,
                 "dbr_ig/sae:ood": 0.435, "erm/dense:in_domain": 0.810, "erm/dense:ood": 0.635,
                 "dbr_ig/dense:in_domain": 0.770, "dbr_ig/dense:ood": 0.555}
SHORTCUT_TOL = 0.025  # 200 reviews per evaluation set: 0.025 is 5 changed predictions
RELIANCE_CUT = 0.6    # DBR's reliance on its own masked tokens, at most this share of ERM's (measured: 0 to 0.42,
                      # the 0.42 by dbr_sae/dense with torch capped at AVX2; λ ignored gives 1)


def test_shortcut_dbr_is_pinned(data_dir):
    """The shortcut task on CAD sentiment, head mode: 400 training reviews, 200 dev and 200 counterfactual ones,
    the three methods on `sae` and `dense`; in-domain and counterfactual accuracy of ERM and DBR-IG pinned, and
    both DBR variants relying far less than ERM on the tokens they mask."""
    from saefeat.config import load_config
    from saefeat.tasks import get_task

    cfg = load_config("tasks", ["task=shortcut", f"data_dir={data_dir}", "max_train=400", "max_eval=200",
                                "bootstrap=20", "embed.precision=fp32", "embed.show_progress_bar=false",
                                # one weight decay and one λ: a choice among several turns on single predictions
                                # of the 80 selection reviews, so fp32 rounding of another CPU could flip it
                                "head.weight_decays=[0.001]", "dbr.lambdas=[10.0]"])
    results = get_task("shortcut")(cfg)
    measured = {f"{child}:{m}": r[f"{m}_accuracy"] for child, r in results.items() for m in ("in_domain", "ood")}
    pinned_all({k: measured[k] for k in SHORTCUT_PINS}, SHORTCUT_PINS, SHORTCUT_TOL, "CAD sentiment accuracies")
    for rep in ("sae", "dense"):
        for method, kind in (("dbr_ig", "ig"), ("dbr_sae", "sae")):
            erm, dbr = results[f"erm/{rep}"][f"reliance_{kind}"], results[f"{method}/{rep}"][f"reliance_{kind}"]
            # ERM on layer-3 `sum` features relies on the IG tokens at about 0.01 (0.06 on `dense`)
            assert erm > 0.005, f"erm/{rep} barely relies on the {kind} tokens ({erm:.4f}): nothing for DBR to remove"
            assert dbr <= RELIANCE_CUT * erm, f"{method}/{rep}: reliance {dbr:.4f} against ERM's {erm:.4f}"


# Pinned with the k=48 SAE (fp32, AMD EPYC avx2 avx512_bf16; the k=32 SAE: sae 0.8980). Broken variant tried on
# the k=32 SAE: run at k=4 (sae 0.822). Spearman of the regression is near 0 on these truncated calls: not pinned.
EARNINGS_PINS = {"sae:roc_auc": 0.8783, "dense:roc_auc": 0.8750, "tfidf:roc_auc": 0.8322}
EARNINGS_TOL = 0.03  # ROC-AUC over the ~100 test calls of the global cut: one swapped pair of calls moves it ~0.001


def test_earnings_is_pinned(data_dir, tmp_path):
    """The earnings task on all 500 calls, each cut to its first 2,000 characters, with the default global date cut:
    test ROC-AUC of `sae`, `dense` and `tfidf` (logistic regression on ANOVA-selected features)."""
    import pandas as pd

    from saefeat.config import load_config
    from saefeat.tasks import get_task

    df = pd.read_json(data_dir / "earnings" / "earnings_calls_10tech.jsonl.gz", lines=True)
    df["text"] = df["text"].str[:2000]
    path = tmp_path / "calls.jsonl"
    df.to_json(path, orient="records", lines=True)
    cfg = load_config("tasks", ["task=earnings", f"data.path={path}", "representations=[sae,dense,tfidf]",
                                "classifiers=[logreg]", "selection.methods=[anova]", "selection.k_grid=[32,128]",
                                "bootstrap=20", "explain_top=2", "embed.max_tokens=512", "embed.precision=fp32",
                                "embed.show_progress_bar=false"])
    results = get_task("earnings")(cfg)
    measured = {f"{rep}:roc_auc": r["roc_auc"] for rep, r in results.items()}
    pinned_all(measured, EARNINGS_PINS, EARNINGS_TOL, "earnings test metrics")
