import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.feature_selection import SelectKBest, chi2
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from saefeat.data import DataError
from saefeat.embed.embedder import SAEEmbedder
from saefeat.embed.pooling import SPARSE_POOLINGS, TokenStats, pool
from saefeat.embed.storage import load_sparse
from saefeat.embed.vectorizers import SAEVectorizer
from saefeat.embed.windows import split_windows
from tests.helpers import random_sae

LONG = " ".join(f"Sentence number {i} talks about revenue, margins and the {i % 7}th product line." for i in range(60))
DOCS = [LONG, "A short note.", "Guidance was raised for the full year.", LONG[:700], "Costs fell."]


@pytest.fixture
def sae_path(tmp_path):
    return random_sae(tmp_path / "sae")


def _dense(m):
    return m.toarray() if sp.issparse(m) else m


@pytest.mark.parametrize("causal", [False, True])
def test_windows_own_every_token_once(causal):
    for n in (1, 63, 64, 65, 200, 1000):
        ws = split_windows(0, n, 64, 16, causal)
        owned = [t for w in ws for t in range(w.own_start, w.own_end)]
        assert owned == list(range(n))
        assert all(w.start <= w.own_start and w.own_end <= w.end and w.end - w.start <= 64 for w in ws)


@pytest.mark.parametrize("pooling", SPARSE_POOLINGS)
def test_window_pooling_is_exact(sae_path, pooling):
    emb = SAEEmbedder("minilm", sae=sae_path, window=48, overlap=12, k=20, cache_dir=False)
    tokens = emb.encode_tokens(LONG)
    assert len(tokens.tokens) > 3 * 48  # really several windows
    acts = tokens.acts
    direct = TokenStats(np.array([acts.shape[0]]), sp.csr_matrix(acts.sum(0)), sp.csr_matrix(acts.max(0)),
                        sp.csr_matrix((acts > 0).sum(0).astype(np.float32)))
    np.testing.assert_allclose(_dense(emb.encode([LONG], pooling=pooling)), _dense(pool(direct, pooling, k=20)),
                               rtol=1e-5, atol=1e-6)


def test_dense_window_pooling_is_exact(sae_path):
    """Batched, windowed dense pooling equals pooling each window's owned tokens computed one window at a time."""
    emb = SAEEmbedder("minilm", sae=sae_path, window=48, overlap=12, cache_dir=False, precision="fp32")
    host = emb.host
    pooled = {p: emb.encode_dense(DOCS, pooling=p) for p in ("mean", "max", "sum")}
    for i, ids in enumerate(host.tokenize(DOCS)):
        owned = []
        for w in split_windows(0, len(ids), 48, 12, host.is_causal):
            wrapped, content = host.wrap(ids[w.start:w.end])
            acts = host.residual(*host.pad_batch([wrapped]), emb.layer, "fp32")[0]
            first = content.index(True)
            owned.append(acts[first + w.own_start - w.start:first + w.own_end - w.start])
        tokens = np.concatenate([a.numpy() for a in owned])
        assert len(tokens) == len(ids)
        for pooling, direct in (("mean", tokens.mean(0)), ("max", tokens.max(0)), ("sum", tokens.sum(0))):
            np.testing.assert_allclose(pooled[pooling][i], direct, rtol=1e-4, atol=1e-4)


def test_order_is_preserved_under_length_sorting(sae_path):
    # fp32: in bf16 a row can differ in the last digits with the batch it was padded into
    emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=False, precision="fp32")
    X = emb.encode(DOCS, batch_size=2)
    for i, d in enumerate(DOCS):
        np.testing.assert_allclose(X[i].toarray(), emb.encode([d]).toarray(), rtol=1e-5, atol=1e-5)
    assert X.shape == (5, 512) and X.dtype == np.float32 and sp.isspmatrix_csr(X)


def test_killed_encode_resumes_from_cache(sae_path, tmp_path, monkeypatch):
    corpus = [f"Document {i}: " + "word " * (i * 7 % 50 + 3) for i in range(40)]
    cache = tmp_path / "c"
    full = SAEEmbedder("minilm", sae=sae_path, cache_dir=False, precision="fp32").encode(corpus)

    import saefeat.embed.embedder as mod

    emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=cache, precision="fp32")
    real = emb._compute_stats
    calls = {"n": 0}

    def dies_on_third_chunk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mod, "_chunks", lambda items, sizes: (items[i:i + 8] for i in range(0, len(items), 8)))
    monkeypatch.setattr(emb, "_compute_stats", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        emb.encode(corpus)

    again = SAEEmbedder("minilm", sae=sae_path, cache_dir=cache, precision="fp32")
    assert len(again._cache("sae")) == 16  # two chunks survived the interruption
    computed = []
    real2 = again._compute_stats
    monkeypatch.setattr(again, "_compute_stats",
                        lambda texts, *a, **k: computed.append(len(texts)) or real2(texts, *a, **k))
    X = again.encode(corpus)
    assert sum(computed) == 24
    np.testing.assert_allclose(X.toarray(), full.toarray(), rtol=1e-5, atol=1e-6)


def test_changed_settings_miss_the_cache(sae_path, tmp_path):
    cache = tmp_path / "c"
    a = SAEEmbedder("minilm", sae=sae_path, cache_dir=cache)
    a.encode(DOCS)
    for kwargs in ({"window": 40}, {"overlap": 8}, {"max_tokens": 20}, {"sae_k": 4}):
        b = SAEEmbedder("minilm", sae=sae_path, cache_dir=cache, **kwargs)
        assert len(b._cache("sae")) == 0, kwargs
    with pytest.raises(ValueError, match="trained on layer 3"):
        SAEEmbedder("minilm", sae=sae_path, layer=2)
    other = random_sae(tmp_path / "other", seed=1)
    assert len(SAEEmbedder("minilm", sae=other, cache_dir=cache)._cache("sae")) == 0
    assert len(SAEEmbedder("minilm", sae=sae_path, cache_dir=cache)._cache("sae")) == len(DOCS)


def test_bad_documents_name_the_row(sae_path):
    emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=False)
    with pytest.raises(DataError, match="row 1: missing"):
        emb.encode(["fine", None])
    with pytest.raises(DataError, match="row 2: int"):
        emb.encode(["fine", "also", 3])
    with pytest.raises(DataError, match="row 0: undecodable"):
        emb.encode([b"\xff\xfe bad"])
    X = emb.encode(["", "   ", "text"])  # documented: empty documents pool to all-zero rows
    assert X[0].nnz == 0 and X[1].nnz == 0 and X[2].nnz > 0


def test_vectorizer_in_pipeline_clones_and_pickles(sae_path):
    vec = SAEVectorizer(sae=str(sae_path), pooling="max", cache_dir=False)
    texts = ["great results and strong growth", "weak demand hurt sales", "record revenue", "losses widened"] * 3
    y = [1, 0, 1, 0] * 3
    pipe = Pipeline([("sae", vec), ("select", SelectKBest(chi2, k=20)), ("clf", LogisticRegression())])
    pipe.fit(texts, y)
    assert pipe.predict(texts).shape == (12,)
    assert vec.get_feature_names_out()[5] == "latent_5"
    blob = pickle.dumps(pipe)
    assert len(blob) < 200_000  # no model weights inside
    restored = pickle.loads(blob)
    np.testing.assert_array_equal(restored.predict(texts), pipe.predict(texts))
    assert clone(vec).get_params() == vec.get_params()


def test_embed_cli_writes_npz_and_ids(sae_path, tmp_path):
    from typer.testing import CliRunner

    from saefeat.cli import app

    src = tmp_path / "corpus.jsonl"
    src.write_text('{"id": "a", "body": "first doc"}\n{"id": "b", "body": "second document here"}\n')
    out = tmp_path / "emb.npz"
    res = CliRunner().invoke(app, ["embed", f"input={src}", "text_field=body", "id_field=id", f"output={out}",
                                   f"sae.path={sae_path}"])
    assert res.exit_code == 0, res.output
    X = load_sparse(out)
    assert X.shape == (2, 512)
    direct = SAEEmbedder("minilm", sae=sae_path).encode(["first doc", "second document here"])
    np.testing.assert_array_equal(X.indices, direct.indices)  # float16 values by default: same latents,
    np.testing.assert_allclose(X.toarray(), direct.toarray(), rtol=1e-3)  # values within float16 rounding
    exact = tmp_path / "exact.npz"
    res = CliRunner().invoke(app, ["embed", f"input={src}", "text_field=body", f"output={exact}", "value_dtype=float32",
                                   f"sae.path={sae_path}"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(load_sparse(exact).toarray(), direct.toarray())
    assert exact.stat().st_size > out.stat().st_size
    assert out.with_suffix(".ids.txt").read_text().split() == ["a", "b"]
    bad = CliRunner().invoke(app, ["embed", f"input={src}", "text_field=text", f"output={out}"])
    assert bad.exit_code == 2 and "missing column" in bad.output


def test_one_pass_fills_sae_and_dense_caches(sae_path, tmp_path, monkeypatch):
    emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=tmp_path / "c")
    emb.encode(DOCS)
    monkeypatch.setattr(emb, "_compute_stats", lambda *a, **k: pytest.fail("dense stats were recomputed"))
    cached = emb.encode_dense(DOCS)
    fresh = SAEEmbedder("minilm", sae=sae_path, cache_dir=False).encode_dense(DOCS)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-6)
