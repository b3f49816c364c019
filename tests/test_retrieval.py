"""The SAE index on real SciFact abstracts with the default minilm SAE: property retrieval of a planted phrase,
exact save/load and add, refusal of mismatched and corrupt indexes, the CLI and the task."""

from __future__ import annotations

import gzip
import json
import shutil

import mlflow
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from saefeat.cli import app
from saefeat.embed.vectorizers import get_embedder
from saefeat.retrieval import CorruptIndexError, IndexMismatchError, SAEIndex
from saefeat.retrieval.properties import latent_labels, property_from_description
from tests.helpers import random_sae

PHRASE = "Zorblax marmalade quasars were also catalogued."
N_DOCS, TARGET = 200, 57


def _plant(text: str) -> str:
    """The phrase inserted at a word break in the middle, so it sits inside ordinary scientific text."""
    cut = text.rfind(" ", 0, len(text) // 2)
    return f"{text[:cut]} {PHRASE}{text[cut:]}"


def _short(row: dict) -> str:
    """Title and the start of the abstract, about 100 tokens (keeps the encoding cost of the tests low)."""
    text = f"{row['title']}. {row['text']}"
    return text if len(text) <= 500 else text[:text.rfind(" ", 0, 500)]


@pytest.fixture(scope="module")
def scifact(data_dir):
    rows = []
    with gzip.open(data_dir / "retrieval" / "scifact" / "corpus.jsonl.gz", "rt") as fh:
        for line in fh:
            rows.append(json.loads(line))
            if len(rows) == N_DOCS + 10:
                break
    return rows


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("retrieval-cache")


@pytest.fixture(scope="module")
def embedder(cache_dir):
    return get_embedder(model="minilm", sae="default", cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def corpus(scifact):
    ids = [r["_id"] for r in scifact[:N_DOCS]]
    texts = [_short(r) for r in scifact[:N_DOCS]]
    texts[TARGET] = _plant(texts[TARGET])
    return ids, texts


@pytest.fixture(scope="module")
def index(corpus, embedder):
    ids, texts = corpus
    return SAEIndex.build(texts, embedder=embedder, ids=ids, dense="dense")


def _same(a: SAEIndex, b: SAEIndex) -> None:
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(a.vectors, name), getattr(b.vectors, name))
    assert a.ids == b.ids and a.texts == b.texts
    np.testing.assert_array_equal(a.idf, b.idf)
    np.testing.assert_array_equal(a.dense.vectors(), b.dense.vectors())
    assert (a.pooling, a.k, a.dense_kind) == (b.pooling, b.k, b.dense_kind)


def test_planted_phrase_is_found_by_a_property_of_examples(index, scifact, corpus):
    positives = [_plant(_short(r)) for r in scifact[N_DOCS:N_DOCS + 5]]  # not in the index
    prop = index.property(positives, method="latents")
    assert len(prop) > 0
    hits = index.search_property(prop, k=5)
    assert hits[0].doc_id == corpus[0][TARGET]
    assert hits[0].score > 2 * hits[1].score
    # the strongest selected latent peaks on the planted phrase's tokens in an example
    toks = index.embedder.encode_tokens(positives[0])
    col = toks.acts[:, int(prop.latents[0])].toarray().ravel()
    phrase_ids = index.embedder.host.tokenizer(PHRASE, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(toks.token_ids)) if toks.token_ids[i:i + len(phrase_ids)] == phrase_ids)
    assert start <= int(np.argmax(col)) < start + len(phrase_ids)
    # concept filtering: excluded latents never enter the property nor the explanations
    filtered = index.search_property(positives, k=5, exclude_latents=prop.latents[:3], method="latents")
    assert not set(prop.latents[:3].tolist()) & {j for h in filtered for j, _ in h.latents}


def test_classifier_property_is_a_balanced_logistic_regression_against_the_corpus(index, scifact, corpus):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    positives = [_plant(_short(r)) for r in scifact[N_DOCS:N_DOCS + 5]]
    prop = index.property(positives)  # the default method
    assert prop.norm_idf is not None
    hits = index.search_property(prop, k=5)
    assert hits[0].doc_id == corpus[0][TARGET]
    # the same scores as scikit-learn's classifier of the examples against the 200 indexed abstracts
    P = index.encode(positives)
    X = normalize(sp.vstack([P, index.vectors]) @ sp.diags(index.idf))
    y = np.r_[np.ones(len(positives)), np.zeros(len(index))]
    direct = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(X, y).decision_function(X)
    np.testing.assert_allclose(index.property_scores(prop), direct[len(positives):], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(prop.score(index.vectors), direct[len(positives):], rtol=1e-4, atol=1e-5)
    # examples taken from the corpus are not also read as background: the planted document as its own example
    own = index.property(index.vectors[[TARGET]])
    rest = np.r_[TARGET, np.setdiff1d(np.arange(len(index)), [TARGET])]
    Xo = normalize(index.vectors[rest] @ sp.diags(index.idf))
    yo = np.r_[1.0, np.zeros(len(index) - 1)]
    direct_own = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(Xo, yo).decision_function(Xo)
    np.testing.assert_allclose(index.property_scores(own)[rest], direct_own, rtol=1e-4, atol=1e-5)
    # concept filtering: excluded latents get no weight and explain no hit
    top = prop.latents[np.argsort(-prop.weights)[:3]]
    filtered = index.search_property(positives, k=5, exclude_latents=top)
    assert not set(top.tolist()) & {j for h in filtered for j, _ in h.latents}
    assert not set(top.tolist()) & set(index.property(positives, exclude_latents=top).latents.tolist())
    with pytest.raises(Exception, match="unknown property method 'centroid'"):
        index.property(positives, method="centroid")


def test_ordinary_search_finds_a_document_by_its_own_sentence(index, corpus):
    ids, texts = corpus
    rows = [3, 20, 90, 150, 199]
    queries = [t[t.find(" ", 100):t.find(" ", 250)] for t in (texts[r] for r in rows)]  # a span from inside
    found = [hits[0].doc_id == ids[r] for r, hits in zip(rows, index.search(queries, k=3))]
    assert sum(found) >= 4
    hits = index.search(queries[0], k=3, mode="hybrid")
    assert hits[0].doc_id == ids[rows[0]] and hits[0].latents
    with pytest.raises(ValueError, match="unknown search mode"):
        index.search(queries[0], mode="fancy")


def test_save_load_round_trips_exactly(index, embedder, tmp_path):
    path = index.save(tmp_path / "idx")
    loaded = SAEIndex.load(path, embedder=embedder)
    _same(index, loaded)
    query = "T cells in the immune response"
    a, b = index.search(query, k=10), loaded.search(query, k=10)
    assert [(h.doc_id, h.score, h.latents) for h in a] == [(h.doc_id, h.score, h.latents) for h in b]
    _same(index, SAEIndex.load(path))  # the embedder rebuilt from the manifest ("default" SAE)
    index.save(path)  # saving over an index replaces it and leaves no temporary folder behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_adding_documents_equals_building_from_scratch(index, corpus, embedder):
    ids, texts = corpus
    part = SAEIndex.build(texts[:120], embedder=embedder, ids=ids[:120], dense="dense")
    part.add(texts[120:], ids=ids[120:])
    _same(index, part)
    q = "protein folding in bacteria"
    assert [(h.doc_id, h.score) for h in part.search(q, k=10)] == [(h.doc_id, h.score) for h in index.search(q, k=10)]
    with pytest.raises(ValueError, match="duplicate document ids"):
        part.add(["another text"], ids=[ids[0]])


def test_an_index_built_with_another_sae_is_refused(index, tmp_path):
    path = index.save(tmp_path / "idx")
    other = get_embedder(model="minilm", sae=str(random_sae(tmp_path / "sae", d_sae=4096, k=32)), cache_dir=False)
    with pytest.raises(IndexMismatchError, match="sae_hash"):
        SAEIndex.load(path, embedder=other)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["embedder"]["sae_hash"] = "0123456789abcdef"  # as if built with an older default SAE
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="0123456789abcdef"):
        SAEIndex.load(path)


def test_a_corrupt_index_is_refused(index, tmp_path):
    good = index.save(tmp_path / "good")
    for name, damage in [("postings.npz", "flip"), ("docs.parquet", "truncate"), ("manifest.json", "delete"),
                         ("dense.faiss", "delete")]:
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(good, bad)
        f = bad / name
        if damage == "flip":
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        elif damage == "truncate":
            f.write_bytes(f.read_bytes()[:-100])
        else:
            f.unlink()
        with pytest.raises(CorruptIndexError, match=name.split(".")[0]):
            SAEIndex.load(bad)
    with pytest.raises(FileNotFoundError):
        SAEIndex.load(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a saefeat index"):
        index.save(tmp_path / "notes")


def test_index_and_search_commands(corpus, cache_dir, tmp_path):
    ids, texts = corpus
    rows = list(range(TARGET - 15, TARGET + 15))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"_id": ids[i], "text": texts[i]}) + "\n" for i in rows))
    runner = CliRunner()
    res = runner.invoke(app, ["index", f"input={docs}", "output=idx", "id_field=_id", "dense=none",
                              f"embed.cache_dir={cache_dir}", "embed.show_progress_bar=false"])
    assert res.exit_code == 0, res.output
    assert "indexed 30 documents" in res.output
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["pooling"] == "sqrt_max"  # retrieval's pick
    pos = tmp_path / "pos.txt"
    pos.write_text("\n".join(_plant(texts[i]) for i in (5, 100, 160, 190)) + "\n")
    res = runner.invoke(app, ["search", "idx", f"examples={pos}", "k=3"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    cells = [[c.strip() for c in line.split("│")] for line in res.output.splitlines() if line.count("│") > 4]
    assert [c[3] for c in cells if c[1] == "1"] == [ids[TARGET]]
    piped = runner.invoke(app, ["search", "idx", f"examples={pos}", "k=3"], env={"COLUMNS": None})  # not a tty
    cells = [[c.strip() for c in line.split("│")] for line in piped.output.splitlines() if line.count("│") > 4]
    assert [c[3] for c in cells if c[1] == "1"] == [ids[TARGET]]  # the id column is not squeezed away
    res = runner.invoke(app, ["search", "idx", "query=immune cells", "k=2", "exclude=1,2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["search", "idx", "k=2"])
    assert res.exit_code == 2 and "exactly one of" in res.output
    res = runner.invoke(app, ["search", "idx", "query=x", "mode=hybrid"])
    assert res.exit_code == 2 and "dense side" in res.output
    res = runner.invoke(app, ["index", "input=missing.jsonl", "output=idx2"])
    assert res.exit_code == 2 and "missing.jsonl" in res.output


def test_description_matches_latent_labels(tmp_path):
    labels = {7: ("heart attack, cardiac arrest", 2.0), 9: ("football match, goal", 1.0),
              11: ("tax, revenue, income", 3.0)}
    prop = property_from_description("cardiovascular disease", labels, n_latents=2, min_similarity=0.0)
    assert prop.latents[0] == 7 and prop.scales[0] == pytest.approx(2.0)
    assert 7 not in property_from_description("cardiovascular disease", labels, exclude=[7]).latents
    with pytest.raises(ValueError, match="describe-latents"):
        latent_labels("no-such-sae", str(tmp_path))


def test_task_logs_a_comparison_with_the_sae_latents(cache_dir, data_dir):
    from saefeat.config import load_config
    from saefeat.tasks import get_task

    cfg = load_config("tasks", ["task=retrieval", f"data_dir={data_dir}", "data.max_queries=5", "data.max_docs=30",
                                "representations=[sae,bm25,hybrid]", "retrieval.hybrid_dense=dense",
                                "bootstrap=50", f"embed.cache_dir={cache_dir}", "embed.show_progress_bar=false"])
    results = get_task("retrieval")(cfg)
    assert set(results) == {"sae", "bm25", "hybrid"}
    for m in results.values():
        assert 0 <= m["ndcg_at_10_lo"] <= m["ndcg_at_10"] <= m["ndcg_at_10_hi"] <= 1
    exp = mlflow.get_experiment_by_name("retrieval")
    runs = mlflow.search_runs([exp.experiment_id])
    sae_run = runs[runs["tags.representation"] == "sae"].iloc[0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(sae_run.run_id)}
    assert "top_latents.json" in artifacts
    assert any(a.endswith(".html") for a in artifacts)


def test_every_retriever_answers_text_queries_through_one_interface(index, corpus):
    from saefeat.retrieval.retrievers import RETRIEVERS, Retriever, latent_contributions, make_retriever

    ids, texts = corpus
    rows = [3, 20, 90]
    queries = [t[t.find(" ", 100):t.find(" ", 250)] for t in (texts[r] for r in rows)]  # a span from inside
    ranked = {}
    for kind in RETRIEVERS:
        retriever = make_retriever(kind, index, show_progress_bar=False)
        assert isinstance(retriever, Retriever)
        got, scores = retriever.search(queries, 5)
        assert len(got) == len(scores) == len(queries)
        for r, s in zip(got, scores):
            assert len(r) == len(s) == 5 and np.all(np.diff(np.asarray(s, float)) <= 1e-6)  # best first
        assert sum(ids[int(r[0])] == ids[q] for r, q in zip(got, rows)) >= 2, kind  # the source ranks first
        ranked[kind] = (got, scores)
    # the index's own modes and its dense side ("dense") rank exactly as `index.search` does
    for kind, mode in (("sae", "sae"), ("hybrid", "hybrid"), ("dense", "dense")):
        for (r, s), hits in zip(zip(*ranked[kind]), index.search(queries, k=5, mode=mode, explain=0)):
            assert [ids[int(i)] for i in r] == [h.doc_id for h in hits]
            np.testing.assert_allclose(s, [h.score for h in hits], rtol=1e-5, atol=1e-6)
    # explanations: the shares of the latents add up to the SAE score, largest first
    sae = make_retriever("sae", index)
    got, scores = sae.search(queries[:1], 5)
    top, score = int(got[0][0]), float(scores[0][0])
    shares = sae.explain(queries[0], top)
    assert [c for _, c in shares] == sorted((c for _, c in shares), reverse=True)
    assert sum(c for _, c in shares) == pytest.approx(score, rel=1e-4)
    assert sae.explain(queries[0], top, n=2) == shares[:2]
    assert shares == index.hit_latents(top, index.encode(queries[:1])[0])
    imp = latent_contributions(sae, queries[:1], [np.array([top])], ["q0"], {"q0": {ids[top]: 1}})
    assert imp.to_dict() == pytest.approx(dict(shares))
    assert latent_contributions(sae, queries[:1], [np.array([top])], ["q0"], {"q0": {}}).empty
    with pytest.raises(ValueError, match="unknown retriever"):
        make_retriever("fancy", index)


def test_sentence_side_runs_with_the_embedders_own_settings(corpus):
    """The `sentence` dense side encodes with the index embedder's precision and backend (fp32 here), not the
    CPU-dependent `auto` default: its vectors equal the fp32 sentence representation's."""
    from saefeat.embed.config import EmbedConfig
    from saefeat.representations import make_representation
    from saefeat.retrieval.dense import encode_dense_side

    _, texts = corpus
    exact = get_embedder(model="minilm", sae="default", precision="fp32", backend="torch", cache_dir=False)
    got = encode_dense_side("sentence", texts[:40], exact, batch_size=8, show_progress_bar=False)
    ref = make_representation("sentence", EmbedConfig(precision="fp32", backend="torch", cache=False))
    np.testing.assert_allclose(got, ref.transform(texts[:40]), atol=1e-5)
    assert exact.config.precision == "fp32"
