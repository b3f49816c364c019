"""The on-disk activation store and training from it: exact values, resumable writes and runs, BatchTopK and
Matryoshka SAEs that load and encode with their learned threshold. Tiny real samples: minilm on a few thousand
tokens of the shared corpus."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import saefeat.sae.store as store_mod
from saefeat import load_sae
from saefeat.errors import SaefeatError
from saefeat.sae.activations import CorpusSource
from saefeat.sae.formats import default_sae_path
from saefeat.sae.store import ActivationStore, StoreConfig, StoreError, write_store
from saefeat.sae.train import StoreTrainConfig, TrainingRunError, evaluate_on_store, train_from_store, warm_start


def _sample(src: Path, dst: Path, n_docs: int, chars: int = 30_000) -> Path:
    """The first documents of a shared corpus file, cut to `chars` (kept in the test's tmp folder only)."""
    with gzip.open(src, "rt") as fh, open(dst, "w") as out:
        for i, line in enumerate(fh):
            if i == n_docs:
                break
            out.write(json.dumps({"text": json.loads(line)["text"][:chars]}) + "\n")
    return dst


@pytest.fixture(scope="module")
def store_cfg(data_dir, tmp_path_factory) -> StoreConfig:
    folder = tmp_path_factory.mktemp("corpus")
    books = _sample(data_dir / "corpus" / "gutenberg_one_book_per_author.jsonl.gz", folder / "g.jsonl", 12)
    calls = _sample(data_dir / "earnings" / "maec_transcripts_unlabeled.jsonl.gz", folder / "m.jsonl", 40)
    sources = [CorpusSource(str(books)), CorpusSource(str(calls))]
    return StoreConfig(layers=[3, 5], seq_len=64, train_tokens=3000, eval_tokens=600, shard_windows=12,
                       batch_windows=6, held_out_every=5, precision="bf16", sources=sources)


@pytest.fixture(scope="module")
def store(minilm, store_cfg, tmp_path_factory) -> ActivationStore:
    return write_store(minilm, store_cfg, tmp_path_factory.mktemp("stores") / "s", show_progress_bar=False)


def test_store_holds_the_hosts_residuals_in_fp16(minilm, store, store_cfg):
    assert store.layers == [3, 5] and store.d_model == 384 and store.seq_len == 64
    assert store.train_tokens >= 3000 and len(store.shards) >= 3 and store.manifest["complete"]
    assert store.identity["host_fingerprint"] == minilm.fingerprint
    assert store.verify() == []
    for index in (0, None):  # a training shard and the held-out slice
        windows = store.windows(index)
        assert all(0 < len(w) <= 64 for w in windows)
        for layer in (3, 5):
            got = store.shard(index, layer) if index is not None else store.eval_activations(layer)
            want = []
            for i in range(0, len(windows), store_cfg.batch_windows):  # the batches the writer ran
                part = windows[i:i + store_cfg.batch_windows]
                ids, att = minilm.pad_batch([minilm.wrap(w)[0] for w in part])
                keep = torch.zeros_like(att, dtype=torch.bool)
                for j, w in enumerate(part):
                    keep[j, 1:1 + len(w)] = True  # [CLS] content [SEP]
                want.append(minilm.residual(ids, att, layer, precision="bf16")[keep].half().numpy())
            assert got.dtype == np.float16
            np.testing.assert_array_equal(np.asarray(got), np.concatenate(want))


def test_reader_shuffles_each_epoch_and_resumes_at_any_batch(store):
    everything = np.concatenate([np.asarray(store.shard(i, 5)) for i in range(len(store.shards))])
    n = store.train_tokens
    epochs = store.batches(5, n, seed=3, group_shards=2)
    first, second = next(epochs), next(epochs)
    rows = sorted(r.tobytes() for r in everything)
    for epoch in (first, second):  # every token once per epoch
        assert sorted(r.tobytes() for r in epoch) == rows
    assert not np.array_equal(first, second) and not np.array_equal(first, everything)
    stream = store.batches(5, 512, seed=3)
    batches = [next(stream) for _ in range(14)]  # runs past the end of the first epoch
    resumed = store.batches(5, 512, seed=3, start=5)
    for b in batches[5:]:
        np.testing.assert_array_equal(next(resumed), b)
    assert not np.array_equal(next(store.batches(5, 512, seed=4)), batches[0])


def test_interrupted_write_resumes_to_the_same_store(minilm, store, store_cfg, tmp_path, monkeypatch):
    real = store_mod.capture_layers
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # a few shards in (two forward batches per shard)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "capture_layers", interrupted)
    folder = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        write_store(minilm, store_cfg, folder, show_progress_bar=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and 1 <= len(manifest["shards"]) < len(store.shards)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(folder)
    kept = {rec["name"]: (folder / rec["name"] / "L5.npy").stat().st_mtime_ns for rec in manifest["shards"]}
    monkeypatch.setattr(store_mod, "capture_layers", real)
    resumed = write_store(minilm, store_cfg, folder, show_progress_bar=False)
    assert resumed.fingerprint == store.fingerprint  # the same windows, values and checksums
    assert resumed.shards == store.shards and resumed.manifest["eval"] == store.manifest["eval"]
    assert all((folder / name / "L5.npy").stat().st_mtime_ns == t for name, t in kept.items())  # not rewritten
    other = StoreConfig(**{**store_cfg.__dict__, "seq_len": 32})
    with pytest.raises(StoreError, match="seq_len"):
        write_store(minilm, other, folder, show_progress_bar=False)


def _recipe(arch: str, **kw) -> StoreTrainConfig:
    base = dict(layer=5, architecture=arch, d_sae=512, k=4, epochs=2, batch_size=256, lr=1e-3, warmup_steps=2,
                dead_tokens=512, checkpoint_every=4, log_every=2, eval_every=6, eval_tokens=256)
    return StoreTrainConfig(**(base | kw))


@pytest.mark.parametrize("arch", ["topk", "matryoshka"])
def test_interrupted_training_resumes_to_the_same_weights(store, tmp_path, arch):
    cfg = _recipe(arch)
    seen: list[dict] = []
    _, whole_metrics, whole = train_from_store(store, cfg, tmp_path / "whole", log=lambda m, _: seen.append(m),
                                               half=False, show_progress_bar=False)
    assert any(m.get("aux_loss", 0) > 0 for m in seen)  # AuxK ran on dead latents
    lines: list[dict] = []

    def stop_at_10(stats, step):
        lines.append(stats)
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_from_store(store, cfg, tmp_path / "cut", log=stop_at_10, half=False, show_progress_bar=False)
    assert not (tmp_path / "cut" / "sae").exists()
    assert {"explained_variance", "l0", "dead_fraction", "aux_loss", "tokens_per_s"} <= set(lines[0])
    assert "eval_explained_variance" in lines[2]  # step 6
    # resumes from the step-8 checkpoint, with other logging settings (they never change the weights)
    _, metrics, cut = train_from_store(store, _recipe(arch, log_every=3), tmp_path / "cut", half=False,
                                       show_progress_bar=False)
    a, b = load_file(str(whole / "sae.safetensors")), load_file(str(cut / "sae.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # bit-identical: the same batches, and every piece of optimiser state restored exactly
        assert torch.equal(a[name], b[name]), name
    assert metrics["explained_variance"] == whole_metrics["explained_variance"]
    with pytest.raises(TrainingRunError):
        train_from_store(store, _recipe(arch, lr=2e-3), tmp_path / "cut", show_progress_bar=False)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_saes_load_and_encode_with_the_learned_threshold(store, tmp_path, arch):
    _, metrics, out = train_from_store(store, _recipe(arch, epochs=3), tmp_path / arch, show_progress_bar=False)
    sae = load_sae(out)
    assert sae.cfg.architecture == "batchtopk" and sae.cfg.extra["trained_as"] == arch
    assert sae.cfg.layer == 5 and sae.cfg.host == "minilm" and sae.cfg.context_size == 64
    if arch == "matryoshka":
        assert sae.cfg.extra["matryoshka_prefixes"] == [32, 64, 128, 256, 512]
    threshold = sae.threshold
    assert float(threshold.min()) == float(threshold.max()) > 0  # one global threshold
    assert float(threshold[0]) == pytest.approx(metrics["threshold"], rel=1e-3)  # saved in fp16
    assert not sae.is_topk
    x = torch.from_numpy(np.array(store.eval_activations(5), dtype=np.float32))
    z = sae.encode(x)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(z, torch.relu(pre) * (pre > threshold))
    per_token = (z > 0).sum(-1).float()
    assert per_token.std() > 0  # a threshold, not a per-token top k
    assert per_token.mean().item() == pytest.approx(metrics["l0"], abs=0.5)  # metrics: the fp32 SAE
    assert 0.3 * 4 < metrics["l0"] < 3 * 4


def test_a_checkpoint_continues_as_a_run_of_another_length_while_the_schedules_agree(store, tmp_path):
    steps = _recipe("topk").steps(store.train_tokens)  # the 2-epoch run
    assert steps >= 10  # its LR decays from step 0.8 * steps on; the checkpoint at step 4 is before that
    _, _, whole = train_from_store(store, _recipe("topk"), tmp_path / "whole", half=False, show_progress_bar=False)

    def stop_at(step_to_stop):
        def log(_, step):
            if step == step_to_stop:
                raise KeyboardInterrupt
        return log

    with pytest.raises(KeyboardInterrupt):  # a 3-epoch run, cut after its step-4 checkpoint
        train_from_store(store, _recipe("topk", epochs=3), tmp_path / "cut", log=stop_at(4), half=False,
                         show_progress_bar=False)
    _, _, cut = train_from_store(store, _recipe("topk"), tmp_path / "cut", half=False, show_progress_bar=False)
    a, b = load_file(str(whole / "sae.safetensors")), load_file(str(cut / "sae.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    # the finished 2-epoch checkpoint has decayed its LR: as the start of a 3-epoch run it would be wrong
    with pytest.raises(TrainingRunError):
        train_from_store(store, _recipe("topk", epochs=3), tmp_path / "cut", show_progress_bar=False)


def test_a_warm_start_continues_a_trained_sae_at_another_k(store, tmp_path):
    _, first_metrics, first = train_from_store(store, _recipe("topk"), tmp_path / "k4", show_progress_bar=False)
    init = load_sae(first)
    start = warm_start(_recipe("topk", k=8, init_from=str(first)), store)
    assert start.k == 8 and start.cfg.input_scale == init.cfg.input_scale
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(start, name), getattr(init, name).float()), name
    at_start = evaluate_on_store(start, store, 5)
    _, tuned, out = train_from_store(store, _recipe("topk", k=8, init_from=str(first), epochs=1),
                                     tmp_path / "k8", show_progress_bar=False)
    saved = load_sae(out)
    assert saved.k == 8 and saved.cfg.extra["warm_start"] == {"content_hash": init.content_hash, "k": 4,
                                                               "path": str(first)}
    assert tuned["l0"] == 8.0
    assert tuned["explained_variance"] > max(first_metrics["explained_variance"], at_start["explained_variance"])
    # a checkpoint belongs to its starting weights: another start is another run
    with pytest.raises(TrainingRunError):
        other_start = _recipe("topk", k=8, init_from=str(out), epochs=1)
        train_from_store(store, other_start, tmp_path / "k8", show_progress_bar=False)
    for bad, message in [(dict(d_sae=256), "shape"), (dict(layer=3), "layer 5, the recipe minilm layer 3"),
                         (dict(architecture="batchtopk"), "warm starts are for TopK")]:
        with pytest.raises(SaefeatError, match=message):
            train_from_store(store, _recipe("topk", init_from=str(first), **bad), tmp_path / "bad",
                             show_progress_bar=False)


# ---- SAEs over sentence embeddings (sae_sentence) ----------------------------------------------------------

def test_window_vectors_are_the_models_sentence_embeddings(store):
    """A store window's final-block mean, normalised, is what sentence-transformers gives for the window's text."""
    from saefeat.embed.vectorizers import SentenceVectorizer
    from saefeat.sae.sentence import window_embeddings

    vecs = window_embeddings(store, 5)
    # sentence-transformers' own encode: `auto` would take the int8 ONNX path on CPUs without native bf16, whose
    # drift (min cosine 0.89 under the AVX2 cap) is not what this test is about
    st = SentenceVectorizer(cache_dir=False, precision="fp32", backend="torch")
    texts = [st.st.tokenizer.decode(w) for i in range(len(store.shards)) for w in store.windows(i)]
    assert len(texts) == len(vecs)
    emb, owner = st.encode_chunks(texts[:40])
    assert np.array_equal(owner, np.arange(40))  # 64-token windows: one chunk each
    cos = (emb * vecs[:40]).sum(1)
    assert cos.mean() > 0.98 and cos.min() > 0.9, cos
    other = (emb * np.roll(vecs[:40], 1, axis=0)).sum(1)  # another window's vector is far less alike
    assert other.mean() < cos.mean() - 0.2


def test_sentence_sae_codes_are_pooled_over_chunks_and_cached(store, tmp_path):
    from saefeat.embed.vectorizers import SentenceSAEVectorizer, SentenceVectorizer, chunk_code_stats
    from saefeat.sae.formats import load_sae, save_sae
    from saefeat.sae.sentence import short_chunks, train_vector_sae, window_embeddings

    st = SentenceVectorizer(cache_dir=False, long_docs="mean")  # the chunking sae_sentence pools over
    chunks = short_chunks(store, st.st.tokenizer.decode, 150, 8, 40, seed=1)
    vectors = np.concatenate([window_embeddings(store, 5), st.encode_chunks(chunks)[0]])
    sae, metrics = train_vector_sae(vectors, d_sae=256, k=8, host="minilm", epochs=30, batch_size=64, seed=0)
    assert metrics["explained_variance"] > 0.3 and metrics["l0"] == 8.0  # 8 of 256 latents, 250 vectors
    path = save_sae(sae, tmp_path / "sent")
    long = " ".join(chunks) * 2  # several chunks of max_seq_length tokens
    docs = ["The mill stood by the river.", long, "Revenue rose in the quarter."]
    vec = SentenceSAEVectorizer(sae=str(path), cache_dir=tmp_path / "c")
    X = vec.transform(docs)
    emb, owner = st.encode_chunks(docs)
    assert (owner == 1).sum() > 2
    codes = load_sae(path).encode(torch.from_numpy(emb)).detach().numpy()
    np.testing.assert_allclose(X.toarray(), np.stack([codes[owner == d].max(0) for d in range(3)]), atol=1e-5)
    mean = SentenceSAEVectorizer(sae=str(path), cache_dir=False, pooling="mean").transform(docs)
    np.testing.assert_allclose(mean.toarray(), np.stack([codes[owner == d].mean(0) for d in range(3)]), atol=1e-5)
    assert chunk_code_stats(load_sae(path), emb, owner, 3).n_tokens.tolist() == np.bincount(owner).tolist()
    again = SentenceSAEVectorizer(sae=str(path), cache_dir=tmp_path / "c")
    again.encode_chunks = lambda texts: pytest.fail("encoded again")  # every document is cached
    np.testing.assert_array_equal(again.transform(docs[::-1]).toarray(), X.toarray()[::-1])
    # the chunks also filled the cache of `sentence` with long_docs=mean (its key, not truncate's)
    sentence = SentenceVectorizer(cache_dir=tmp_path / "c", long_docs="mean")
    sentence.encode_chunks = lambda texts: pytest.fail("encoded again")
    np.testing.assert_allclose(sentence.transform(docs),
                               SentenceVectorizer(cache_dir=False, long_docs="mean").transform(docs), atol=1e-6)


def test_token_and_sentence_saes_are_not_interchangeable(store, tmp_path):
    from saefeat.embed.embedder import SAEEmbedder
    from saefeat.embed.vectorizers import SentenceSAEVectorizer
    from saefeat.sae.formats import save_sae
    from saefeat.sae.sentence import train_vector_sae, window_embeddings

    vectors = window_embeddings(store, 5)
    sae, _ = train_vector_sae(np.tile(vectors, (3, 1)), d_sae=64, k=4, host="minilm", epochs=1, seed=0)
    path = save_sae(sae, tmp_path / "sent")
    from saefeat.embed.config import BaselineConfig
    from saefeat.representations import describe_representation

    params = describe_representation("sae_sentence", baselines=BaselineConfig(sentence_sae=str(path)))
    assert params["sae_hash"] == load_sae(path).content_hash and "layer" not in params  # its own SAE, no layer
    with pytest.raises(SaefeatError, match="not the residual stream"):  # a sentence SAE read at a layer
        SAEEmbedder("minilm", sae=path).encode(["a text"])
    with pytest.raises(SaefeatError, match="not on sentence embeddings"):  # a layer's SAE read as a sentence one
        SentenceSAEVectorizer(sae=str(default_sae_path("minilm"))).transform(["a text"])
