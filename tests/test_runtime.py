"""The resolved runtime (backend, precision): its rules, the ONNX Runtime host, CUDA, and what MLflow records."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from collections import Counter

import mlflow
import numpy as np
import pytest
import torch

from saefeat import device as device_mod
from saefeat.device import Runtime, resolve_runtime
from saefeat.provenance import ISA_CAPS

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_runtime_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(device_mod, "onnxruntime_available", lambda: True)
    expected = Runtime("torch", "bf16") if native else Runtime("onnx", "int8")
    assert resolve_runtime(CPU, "auto", "auto") == expected
    # a causal LM is not exported: torch, in the precision the CPU runs fast
    assert resolve_runtime(CPU, "auto", "auto", onnx_capable=False) == Runtime("torch", "bf16" if native else "fp32")
    assert resolve_runtime(CPU, "fp32", "auto") == Runtime("torch", "fp32")  # fp32 alone stays exact torch
    assert resolve_runtime(CPU, "int8", "auto") == Runtime("onnx", "int8")
    assert resolve_runtime(CPU, "auto", "onnx") == Runtime("onnx", "int8")
    assert resolve_runtime(torch.device("cuda"), "auto", "auto") == Runtime("torch", "bf16")


def test_an_isa_cap_runs_as_a_cpu_without_native_bf16():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes this process a CPU without native bf16 (the second CI pass runs this way):
    `auto` takes the ONNX int8 path and the recorded CPU names the cap."""
    code = ("import torch; from saefeat.device import cpu_has_native_bf16, resolve_runtime; "
            "from saefeat.provenance import cpu_description; "
            "print(cpu_has_native_bf16(), resolve_runtime(torch.device('cpu')), cpu_description(), sep='|')")
    env = {k: v for k, v in os.environ.items() if k not in ISA_CAPS} | {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True).stdout.strip().split("|")
    assert out[0] == "False"
    assert out[1] == repr(Runtime("onnx", "int8"))
    assert out[2].endswith("capped: ONEDNN_MAX_CPU_ISA=AVX2")


def test_auto_runtime_without_onnxruntime(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(device_mod, "onnxruntime_available", lambda: False)
    assert resolve_runtime(CPU, "auto", "auto") == Runtime("torch", "fp32")
    with pytest.raises(ValueError, match="needs onnxruntime"):
        resolve_runtime(CPU, "int8", "auto")


@pytest.mark.parametrize("precision, backend, device, message", [
    ("int8", "torch", "cpu", "int8 runs on backend=onnx"),
    ("bf16", "onnx", "cpu", "not bf16"),
    ("auto", "onnx", "cuda", "CPU only"),
    ("int8", "auto", "cuda", "CPU only"),
    ("fp16", "auto", "cpu", "precision must be one of"),
    ("auto", "tensorrt", "cpu", "backend must be one of"),
])
def test_bad_runtime_is_refused_by_name(precision, backend, device, message):
    with pytest.raises(ValueError, match=message):
        resolve_runtime(torch.device(device), precision, backend)


def test_causal_host_refuses_the_onnx_backend(smollm2):
    from saefeat.onnx_host import onnx_capable

    assert not onnx_capable(smollm2)
    with pytest.raises(ValueError, match="encoder hosts"):
        resolve_runtime(CPU, "fp32", "onnx", onnx_capable=onnx_capable(smollm2))


def _abstracts(data_dir, n: int) -> list[str]:
    with gzip.open(data_dir / "retrieval" / "scifact" / "corpus.jsonl.gz", "rt") as fh:
        return [f"{d['title']}. {d['text']}" for d in map(json.loads, (next(fh) for _ in range(n)))]


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    return tmp_path_factory.mktemp("onnx-cache")


def test_onnx_fp32_host_matches_torch_fp32(data_dir, onnx_root):
    from saefeat.embed.embedder import SAEEmbedder

    docs = _abstracts(data_dir, 12)
    ref = SAEEmbedder("minilm", cache_dir=False, precision="fp32", backend="torch")
    ort = SAEEmbedder("minilm", cache_dir=onnx_root, precision="fp32", backend="onnx")
    assert ort.runtime == Runtime("onnx", "fp32") and ort.reader._onnx is not None
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(ort.reader._onnx.path)).graph.node)
    assert ops["Attention"] == 6 and ops["SkipLayerNormalization"] >= 6, ops  # fused, one attention per block
    # the export traced eager attention and then gave the host back its own
    assert ort.host.model.config._attn_implementation == ref.host.model.config._attn_implementation
    a, b = ref.encode_stats(docs, "dense"), ort.encode_stats(docs, "dense")
    np.testing.assert_array_equal(a.n_tokens, b.n_tokens)
    np.testing.assert_allclose(b.sum / b.n_tokens[:, None], a.sum / a.n_tokens[:, None], atol=2e-4)
    xa, xb = ref.encode(docs).toarray(), ort.encode(docs).toarray()
    diff = np.abs(xa - xb)
    # fp32 rounding differs by ~1e-5 between the runtimes; where two latents tie at the top-k boundary within that,
    # one swaps for the other (one such swap in these 12 abstracts), so allow a couple, never a broad drift
    assert (diff > 1e-2).sum() <= 2 and np.median(diff[xa > 0]) < 1e-4, (diff > 1e-2).sum()
    # the stats cache keeps the runtimes apart
    assert ref.settings("sae") != ort.settings("sae") and ort.settings("sae")["backend"] == "onnx"


def test_onnx_int8_host_stays_close_and_its_export_is_reused(data_dir, onnx_root):
    from saefeat.embed.embedder import SAEEmbedder

    docs = _abstracts(data_dir, 12)
    ref = SAEEmbedder("minilm", cache_dir=False, precision="fp32", backend="torch").encode(docs).toarray()
    emb = SAEEmbedder("minilm", cache_dir=onnx_root, precision="int8")
    path, mtime = emb.reader._onnx.path, emb.reader._onnx.path.stat().st_mtime_ns
    got = emb.encode(docs).toarray()
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.92, cos  # int8 weights and activations through all six blocks: close, not exact
    assert not np.array_equal(ref, got)
    again = SAEEmbedder("minilm", cache_dir=onnx_root, precision="int8", pooling="mean")
    assert again.reader._onnx.path == path and path.stat().st_mtime_ns == mtime  # exported once, then read


def test_an_export_the_optimizer_cannot_fuse_stays_unfused_and_exact(data_dir, tmp_path, monkeypatch, caplog):
    import onnx
    from onnxruntime.transformers import optimizer

    from saefeat.hosts import load_host
    from saefeat.onnx_host import OnnxHost

    def refuse(*args, **kwargs):
        raise RuntimeError("no fusion for this graph")

    monkeypatch.setattr(optimizer, "optimize_model", refuse)
    host = load_host("minilm")
    onnx_host = OnnxHost(host, 3, "fp32", tmp_path)
    assert "stays unfused" in caplog.text
    ops = Counter(n.op_type for n in onnx.load(str(onnx_host.path)).graph.node)
    assert ops["Attention"] == 0 and ops["MatMul"] > 0, ops
    ids, att = host.pad_batch([host.wrap(ids[:60])[0] for ids in host.tokenize(_abstracts(data_dir, 2))])
    with torch.no_grad():
        ref = host.residual(ids, att, 3, precision="fp32")
    valid = att.bool()
    torch.testing.assert_close(onnx_host.residual(ids, att)[valid], ref[valid].float(), rtol=1e-4, atol=1e-4)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        OnnxHost(host, 3, "int8", tmp_path)  # quantizing logs one line of saefeat's, none of the quantizer's chatter
    assert [r.name for r in caplog.records] == ["saefeat.onnx_host"], [(r.name, r.getMessage()) for r in caplog.records]


def test_a_damaged_export_is_rebuilt(data_dir, onnx_root):
    from saefeat.embed.embedder import SAEEmbedder
    from saefeat.onnx_host import OnnxHost

    good = SAEEmbedder("minilm", cache_dir=onnx_root, precision="int8").reader._onnx  # its session is already in memory
    host = good.host
    ids, att = host.pad_batch([host.wrap(ids[:200])[0] for ids in host.tokenize(_abstracts(data_dir, 3))])
    for path in good.path.parent.glob("*.onnx"):  # the int8 export and the fp32 one it was quantized from
        path.write_bytes(path.read_bytes()[:1000])
    again = OnnxHost(host, good.layer, "int8", onnx_root)
    assert again.path == good.path and good.path.stat().st_size > 1000
    torch.testing.assert_close(again.residual(ids, att), good.residual(ids, att), rtol=0, atol=0)


def test_int8_sae_step_keeps_the_selected_latents(data_dir, onnx_root):
    from saefeat.embed.embedder import SAEEmbedder
    from saefeat.onnx_sae import OnnxSAEEncoder

    emb = SAEEmbedder("minilm", cache_dir=onnx_root, precision="int8")
    assert emb.sae_step == "onnx-int8" and emb.settings("sae")["sae_step"] == "onnx-int8"
    assert "sae_step" not in SAEEmbedder("minilm", cache_dir=onnx_root, precision="fp32").settings("sae")
    reader = emb.reader
    x = torch.cat([x for _, _, x in reader.batches(reader.token_ids(_abstracts(data_dir, 6)), 8)])
    ref_v, ref_i = emb.sae.encode_topk_rows(x.float())  # the same activations, through the exact fp32 encoder
    int8 = OnnxSAEEncoder(emb.sae, onnx_root)
    got_v, got_i = int8.encode_topk_rows(x)
    assert got_i.shape == ref_i.shape == (len(x), emb.sae.k) and bool((got_v >= 0).all())
    kept = [len(set(a[va > 0].tolist()) & set(b[vb > 0].tolist())) / max(1, int((va > 0).sum()))
            for a, b, va, vb in zip(ref_i, got_i, ref_v, got_v)]
    assert 0.9 < np.mean(kept) < 1.0, np.mean(kept)  # quantized, so not all of them; most of them
    path, mtime = int8.path, int8.path.stat().st_mtime_ns
    assert OnnxSAEEncoder(emb.sae, onnx_root).path == path and path.stat().st_mtime_ns == mtime  # quantized once
    path.write_bytes(path.read_bytes()[:500])  # a damaged cache file is derived: it is rebuilt
    rebuilt = OnnxSAEEncoder(emb.sae, onnx_root)
    torch.testing.assert_close(rebuilt.encode_topk_rows(x), (got_v, got_i), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_embedding_matches_cpu(data_dir):
    from saefeat.embed.embedder import SAEEmbedder

    docs = _abstracts(data_dir, 16)
    cpu = SAEEmbedder("minilm", device="cpu", cache_dir=False, precision="fp32").encode(docs).toarray()
    gpu = SAEEmbedder("minilm", device="cuda", cache_dir=False)
    assert gpu.runtime == Runtime("torch", "bf16")
    got = gpu.encode(docs).toarray()
    cos = (cpu * got).sum(1) / np.linalg.norm(cpu, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.98, cos


def test_runs_record_what_ran_in_the_callers_store(tmp_path, monkeypatch):
    from saefeat.config import load_config
    from saefeat.evaluation.comparison import TaskRun

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mine.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        cfg = load_config("tasks", ["task=earnings", "embed.precision=fp32", f"embed.cache_dir={tmp_path}",
                                    "tracking.experiment=provenance-test"])
        with TaskRun(cfg) as run, run.child("sae") as metrics:
            metrics["x"] = 1.0
        assert mlflow.get_tracking_uri() == uri  # start_run kept the caller's store
        runs = mlflow.search_runs(experiment_names=["provenance-test"])
        assert len(runs) == 2
        for _, r in runs.iterrows():  # parent (resolved.*) and child (its representation's params) say what ran
            p = "resolved." if r["tags.saefeat.role"] == "parent" else ""
            assert r[f"params.{p}precision"] == "fp32" and r[f"params.{p}backend"] == "torch"
            assert r[f"params.{p}device"] == "cpu" and len(r[f"params.{p}host_fingerprint"]) == 16
            assert r[f"params.{p}sae_step"] == "torch"  # fp32 keeps the SAE step in torch
        parent = runs[runs["tags.saefeat.role"] == "parent"].iloc[0]
        assert parent["tags.version.torch"] == importlib.metadata.version("torch")
        assert parent["tags.saefeat.git_dirty"] in ("True", "False", "unknown")
        assert parent["tags.cpu"] and parent["tags.cpu.native_bf16"] in ("True", "False")
    finally:
        mlflow.set_tracking_uri(None)


def test_saefeats_own_store_follows_the_environment(tmp_path, monkeypatch):
    from saefeat.tracking import setup_tracking, start_run

    first, second = tmp_path / "a" / "new" / "m.db", tmp_path / "b" / "new" / "m.db"
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{first}")
        with start_run("env-test", "one"):
            pass
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{second}")  # the store saefeat chose is not kept
        with start_run("env-test", "two"):
            pass
        assert first.is_file() and second.is_file()  # folders of a store named in the environment are created
        assert mlflow.get_tracking_uri() == f"sqlite:///{second}"
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        monkeypatch.chdir(tmp_path)
        assert setup_tracking() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    finally:
        mlflow.set_tracking_uri(None)


def test_sentence_runs_on_onnx_runtime_as_sentence_transformers_does(data_dir, onnx_root):
    from saefeat.embed.vectorizers import SentenceVectorizer

    docs = _abstracts(data_dir, 10) + ["short", "a second short one"]
    ref = SentenceVectorizer("minilm", cache_dir=False, precision="fp32")
    assert ref.runtime == Runtime("torch", "fp32")
    want = ref.st.encode(docs, batch_size=4, normalize_embeddings=True)
    exact = SentenceVectorizer("minilm", cache_dir=onnx_root, precision="fp32", backend="onnx", batch_size=4)
    assert exact.runtime == Runtime("onnx", "fp32")
    # the model's own truncation, special tokens, mean pooling and normalization, in input order
    np.testing.assert_allclose(exact.transform(docs), want, atol=2e-5)
    int8 = SentenceVectorizer("minilm", cache_dir=onnx_root, precision="int8", batch_size=4)
    assert int8.runtime == Runtime("onnx", "int8")
    got = int8.transform(docs)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.97 and not np.allclose(got, want, atol=1e-4), cos
    keys = [v.cache_settings() for v in (ref, exact, int8)]
    assert keys[1]["backend"] == keys[2]["backend"] == "onnx" and "backend" not in keys[0]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 3  # the runtimes never share cached vectors
    int8.st[1].pooling_mode = "cls"  # a stack the ONNX path does not reproduce stays on sentence-transformers
    assert int8.runtime == Runtime("torch", "bf16" if device_mod.cpu_has_native_bf16() else "fp32")
