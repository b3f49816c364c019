import pickle

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.feature_selection import SelectKBest, chi2
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from saefeat.data import DataError
from saefeat.embed.config import EmbedConfig
from saefeat.embed.embedder import SAEEmbedder
from saefeat.embed.pooling import SPARSE_POOLINGS, TokenStats, pool
from saefeat.embed.storage import load_sparse, read_ids
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
    emb = SAEEmbedder("minilm", sae=sae_path, window=48, overlap=12, pool_k=20, cache_dir=False)
    tokens = emb.encode_tokens(LONG)
    assert len(tokens.tokens) > 3 * 48  # really several windows
    acts = tokens.acts
    direct = TokenStats(np.array([acts.shape[0]]), sp.csr_matrix(acts.sum(0)), sp.csr_matrix(acts.max(0)),
                        sp.csr_matrix((acts > 0).sum(0).astype(np.float32)), sp.csr_matrix(acts.log1p().sum(0)))
    np.testing.assert_allclose(_dense(emb.encode([LONG], pooling=pooling)), _dense(pool(direct, pooling, k=20)),
                               rtol=1e-5, atol=1e-6)


def test_log1p_topk_is_exact_and_cached(sae_path, tmp_path):
    """log1p_topk = per latent the sum over tokens of log(1 + a), its 20 largest kept; windowed, batched and read
    back from the cache it equals that computed from the per-token activations directly."""
    emb = SAEEmbedder("minilm", sae=sae_path, window=48, overlap=12, pool_k=20, cache_dir=tmp_path / "c",
                      precision="fp32")  # in bf16 a row can differ in the last digits with its batch
    for i, doc in enumerate(DOCS):
        acts = emb.encode_tokens(doc).acts.toarray().astype(np.float64)
        total = np.log1p(acts).sum(0)
        keep = np.argsort(-total, kind="stable")[:20]
        direct = np.zeros_like(total)
        direct[keep] = total[keep]
        for _ in range(2):  # computed, then from the cache
            pooled = emb.encode(DOCS, pooling="log1p_topk")[i].toarray()[0]
            assert (pooled > 0).sum() == min(20, (total > 0).sum())
            np.testing.assert_allclose(pooled, direct, rtol=1e-5, atol=1e-5)
    stats = emb.encode_stats(DOCS[:2])
    assert stats.log1p_sum is not None and (stats.log1p_sum != stats.sum).nnz  # log(1+a) < a: not the sum
    assert (stats.log1p_sum.data <= stats.sum.data + 1e-6).all()


def test_sae_shards_of_an_older_stats_version_are_not_read(sae_path, tmp_path, monkeypatch):
    """Shards written before log1p_sum existed (stats version 1: no version in the key) are never found, so the
    documents are encoded again rather than pooled from statistics that lack it."""
    import dataclasses

    import saefeat.embed.cache as cache

    root = tmp_path / "c"
    stats = SAEEmbedder("minilm", sae=sae_path, cache_dir=False, precision="fp32").encode_stats(DOCS)
    with monkeypatch.context() as m:  # a writer of version 1
        m.setattr(cache, "STATS_VERSIONS", {})
        emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=root, precision="fp32")
        cache.StatsCache(root, emb.settings("sae")).put([cache.doc_hash(d) for d in DOCS],
                                                        dataclasses.replace(stats, log1p_sum=None))
    fresh = SAEEmbedder("minilm", sae=sae_path, cache_dir=root, pool_k=20, precision="fp32")
    assert len(fresh._cache("sae")) == 0
    np.testing.assert_allclose(fresh.encode(DOCS, pooling="log1p_topk").toarray(),
                               pool(stats, "log1p_topk", 20).toarray(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="log1p_sum"):
        pool(dataclasses.replace(stats, log1p_sum=None), "log1p_topk")


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
    with pytest.raises(ValueError, match="trained at .* layer 3, but layer 2"):
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
    vec = SAEVectorizer(EmbedConfig(sae=str(sae_path), pooling="max", cache=False))
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
                                   f"sae={sae_path}"])
    assert res.exit_code == 0, res.output
    X = load_sparse(out)
    assert X.shape == (2, 512)
    direct = SAEEmbedder("minilm", sae=sae_path).encode(["first doc", "second document here"])
    np.testing.assert_array_equal(X.indices, direct.indices)  # float16 values by default: same latents,
    np.testing.assert_allclose(X.toarray(), direct.toarray(), rtol=1e-3)  # values within float16 rounding
    exact = tmp_path / "exact.npz"
    res = CliRunner().invoke(app, ["embed", f"input={src}", "text_field=body", f"output={exact}", "value_dtype=float32",
                                   f"sae={sae_path}"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(load_sparse(exact).toarray(), direct.toarray())
    assert exact.stat().st_size > out.stat().st_size
    assert read_ids(out) == ["a", "b"]
    bad = CliRunner().invoke(app, ["embed", f"input={src}", "text_field=text", f"output={tmp_path / 'new.npz'}"])
    assert bad.exit_code == 2 and "missing column" in bad.output


def test_embed_cli_refuses_bad_outputs_and_ids_before_embedding(sae_path, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import saefeat.commands.embed as command
    from saefeat.cli import app

    src = tmp_path / "corpus.jsonl"
    src.write_text('{"id": "line\\nbreak", "body": "first doc"}\n{"id": "b", "body": "second document here"}\n')
    out = tmp_path / "emb.npz"
    out.write_bytes(b"the user's own file")
    run = lambda *extra: CliRunner().invoke(app, ["embed", f"input={src}", "text_field=body", "id_field=id",  # noqa: E731
                                                 f"sae={sae_path}", *extra])
    monkeypatch.setattr(command, "make_representation", lambda *a: pytest.fail("embedding started"))
    res = run(f"output={out}")
    assert res.exit_code == 2 and "exists; pass overwrite=true" in res.output
    assert out.read_bytes() == b"the user's own file"
    for extra, message in ((f"output={tmp_path}", "is a folder saefeat did not write"),
                           (f"output={tmp_path / 'x.csv'}", "name a .npz file"),
                           (f"output={tmp_path / 'y.npz'} value_dtype=int8", "value_dtype must be one of")):
        res = run(*extra.split())
        assert res.exit_code == 2 and message in res.output, res.output
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "body": "x"}\n{"id": "a", "body": "y"}\n')
    res = CliRunner().invoke(app, ["embed", f"input={dup}", "text_field=body", "id_field=id",
                                   f"output={tmp_path / 'd.npz'}"])
    assert res.exit_code == 2 and "duplicate ids" in res.output and "row 1" in res.output
    header = tmp_path / "header.csv"
    header.write_text("text\n")
    res = CliRunner().invoke(app, ["embed", f"input={header}", f"output={tmp_path / 'h.npz'}"])
    assert res.exit_code == 2 and "no rows" in res.output
    monkeypatch.undo()
    res = run(f"output={out}", "overwrite=true")
    assert res.exit_code == 0, res.output
    assert read_ids(out) == ["line\nbreak", "b"]  # an id with a newline stays one id of one row


def test_one_pass_fills_sae_and_dense_caches(sae_path, tmp_path, monkeypatch):
    emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=tmp_path / "c")
    emb.encode(DOCS)
    monkeypatch.setattr(emb, "_compute_stats", lambda *a, **k: pytest.fail("dense stats were recomputed"))
    cached = emb.encode_dense(DOCS)
    fresh = SAEEmbedder("minilm", sae=sae_path, cache_dir=False).encode_dense(DOCS)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["max", "sqrt_max", "sum", "log1p_topk"])
def test_a_token_pass_caches_the_pooled_features(sae_path, tmp_path, monkeypatch, pooling):
    """encode_tokens_batch(cache_pooled=True) caches what encode and encode_dense would compute (a duplicate
    document once), so they then run no forward pass; its token activations pool to the same rows. By default it
    caches nothing."""
    emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=tmp_path / "c", precision="fp32")
    docs = [*DOCS, DOCS[1]]
    emb.encode_tokens_batch(docs)
    assert not list((tmp_path / "c").rglob("shard-*.npz"))
    tokens = emb.encode_tokens_batch(docs, cache_pooled=True)
    monkeypatch.setattr(emb, "_compute_stats", lambda *a, **k: pytest.fail("statistics were recomputed"))
    cached, cached_dense = _dense(emb.encode(docs, pooling=pooling)), emb.encode_dense(docs)
    fresh = SAEEmbedder("minilm", sae=sae_path, cache_dir=False, precision="fp32")
    np.testing.assert_allclose(cached, _dense(fresh.encode(docs, pooling=pooling)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cached_dense, fresh.encode_dense(docs), rtol=1e-5, atol=1e-6)
    if pooling in ("max", "sqrt_max"):  # sqrt_max: the square root of each latent's strongest token
        token_max = np.stack([t.acts.toarray().max(0) for t in tokens])
        np.testing.assert_allclose(cached, token_max if pooling == "max" else np.sqrt(token_max), rtol=1e-6)
    assert cached.any(axis=1).all()


def test_cli_and_api_give_the_same_embeddings_on_real_text(data_dir, tmp_path):
    """One config route: `saefeat embed` and `SAEEmbedder("minilm").encode` read the same windows of the same
    abstracts (the SAE's 256-token training window), so their rows are identical."""
    import gzip
    import json

    from typer.testing import CliRunner

    from saefeat.cli import app

    with gzip.open(data_dir / "retrieval/scifact/corpus.jsonl.gz", "rt") as fh:
        rows = [json.loads(line) for _, line in zip(range(40), fh)]
    src = tmp_path / "abstracts.jsonl"
    src.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    out = tmp_path / "cli.npz"
    res = CliRunner().invoke(app, ["embed", f"input={src}", f"output={out}", "value_dtype=float32",
                                   f"embed.cache_dir={tmp_path / 'cache'}", "embed.precision=fp32"])
    assert res.exit_code == 0, res.output
    api = SAEEmbedder("minilm", cache_dir=False, precision="fp32")
    assert api.window == 256  # the shipped SAE's training window, not the host's 254
    direct = api.encode([r["text"] for r in rows])
    assert max(len(api.host.tokenize([r["text"]])[0]) for r in rows) > 256  # some abstracts need two windows
    np.testing.assert_array_equal(load_sparse(out).toarray(), direct.toarray())


def test_two_in_memory_saes_get_two_embedders(sae_path):
    from saefeat.embed.vectorizers import get_embedder
    from saefeat.sae.formats import load_sae

    a, b = load_sae(sae_path), load_sae(sae_path)
    with torch.no_grad():
        b.W_enc.mul_(-1.0)  # same config, other weights
    config = EmbedConfig(cache=False, precision="fp32")
    ea, eb = get_embedder(config, sae=a), get_embedder(config, sae=b)
    assert ea is not eb and ea.sae is a and eb.sae is b
    assert get_embedder(config, sae=a) is ea  # shared while the weights are the same
    assert (ea.encode(DOCS) != eb.encode(DOCS)).nnz > 0


def test_dense_baseline_for_a_host_without_an_sae():
    from saefeat.hosts import get_host, resolve_host_path
    from saefeat.representations import make_representation

    folder, _ = resolve_host_path("minilm")  # the model as a plain folder: no SAE ships for it
    with pytest.raises(FileNotFoundError, match="no default SAE ships"):
        make_representation("dense", EmbedConfig(model=folder, cache=False)).transform(DOCS)
    dense = make_representation("dense", EmbedConfig(model=folder, sae=None, cache=False, precision="fp32"))
    X = dense.transform(DOCS)
    host = get_host(folder)
    assert dense.embedder.layer == host.n_layers - 1 and X.shape == (len(DOCS), host.d_model)
    batch = host.batch(host.tokenize(DOCS[1:2]))  # a short one: a single window
    h = host.residual(batch.input_ids, batch.attention_mask, host.n_layers - 1, "fp32")[batch.content]
    np.testing.assert_allclose(X[1], h.mean(0).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no SAE"):
        make_representation("sae", EmbedConfig(model=folder, sae=None, cache=False)).transform(DOCS)


def test_the_cache_holds_a_bounded_number_of_shards_in_memory(sae_path, tmp_path, monkeypatch):
    import saefeat.embed.embedder as mod
    from saefeat.embed import cache

    corpus = [f"Note {i}: " + "token " * (i % 13 + 2) for i in range(30)]
    monkeypatch.setattr(mod, "_chunks", lambda items, sizes: (items[i:i + 4] for i in range(0, len(items), 4)))
    emb = SAEEmbedder("minilm", sae=sae_path, cache_dir=tmp_path / "c", precision="fp32")
    first = emb.encode(corpus)  # 8 shards written
    store = cache.StatsCache(tmp_path / "c", emb.settings("sae"), max_loaded=3)
    assert len(list(store.dir.glob("shard-*.npz"))) == 8
    hashes = [cache.doc_hash(d) for d in corpus]
    stats = store.get(hashes)  # every shard read, at most 3 kept
    assert len(store._loaded) == 3
    np.testing.assert_array_equal(stats.n_tokens, cache.StatsCache(tmp_path / "c", emb.settings("sae")).get(
        hashes).n_tokens)
    again = SAEEmbedder("minilm", sae=sae_path, cache_dir=tmp_path / "c", precision="fp32")
    np.testing.assert_array_equal(again.encode(corpus).toarray(), first.toarray())


def test_the_sentence_cache_key_follows_the_weights_and_the_length(tmp_path):
    """Two folders of one model with another max_seq_length must not share cached sentence vectors."""
    import json
    from pathlib import Path

    from saefeat.embed import cache
    from saefeat.embed.vectorizers import SentenceVectorizer
    from saefeat.hosts import resolve_host_path

    src = Path(resolve_host_path("minilm")[0])
    short = tmp_path / "minilm-128"
    short.mkdir()
    for f in src.rglob("*"):
        if f.is_file():
            (short / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            if f.name != "sentence_bert_config.json":
                (short / f.relative_to(src)).symlink_to(f)
    cfg = json.loads((src / "sentence_bert_config.json").read_text())
    (short / "sentence_bert_config.json").write_text(json.dumps(cfg | {"max_seq_length": 128}))
    a, b = SentenceVectorizer("minilm").cache_settings(), SentenceVectorizer(str(short)).cache_settings()
    assert a["fingerprint"] == b["fingerprint"] and a["max_seq_length"] == 256 and b["max_seq_length"] == 128
    assert cache.settings_hash(a) != cache.settings_hash(b | {"model": "minilm"})
