"""Fault injection: bad values, foreign folders, tampered files and code in data are refused up front, by name,
and nothing the user owns is replaced (issue 18)."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from saefeat.cli import app
from saefeat.embed.embedder import SAEEmbedder
from saefeat.errors import SaefeatError
from saefeat.retrieval.index import SAEIndex
from saefeat.retrieval.store import CorruptIndexError
from tests.helpers import random_sae

DOCS = ["Statins lower cholesterol in adults.", "Cells divide by mitosis.", "The heart pumps blood.",
        "Vaccines train the immune system."]


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    sae = random_sae(tmp_path_factory.mktemp("sae") / "sae")
    return SAEIndex.build(DOCS, embedder=SAEEmbedder("minilm", sae=sae, cache_dir=False), dense=None)


def test_a_nan_in_the_sae_weights_is_refused_at_load(tmp_path):
    from saefeat.sae.formats import load_sae

    path = random_sae(tmp_path / "sae")
    weights = load_file(path / "sae.safetensors")
    weights["W_enc"][3, 7] = float("nan")
    save_file(weights, path / "sae.safetensors")
    with pytest.raises(SaefeatError, match=r"W_enc.*NaN"):
        load_sae(path)


def test_a_single_string_and_empty_queries_are_refused(small_index):
    emb = small_index.embedder
    with pytest.raises(SaefeatError, match="single string"):
        emb.encode("cells divide")
    with pytest.raises(ValueError, match="single string"):
        SAEIndex.build("statins", embedder=emb, dense=None)
    with pytest.raises(SaefeatError, match="empty"):
        small_index.search("")
    with pytest.raises(SaefeatError, match="k must be at least 1"):
        small_index.search("statins", k=0)
    assert len(small_index.search("statins", k=2)) == 2


def test_a_foreign_folder_with_a_manifest_is_never_replaced(small_index, tmp_path):
    app_dir = tmp_path / "webapp"
    app_dir.mkdir()
    (app_dir / "manifest.json").write_text('{"name": "my web app"}')
    (app_dir / "index.html").write_text("<html/>")
    with pytest.raises(SaefeatError, match="not a saefeat index"):
        small_index.save(app_dir)
    assert (app_dir / "index.html").read_text() == "<html/>"


def test_the_manifest_must_list_every_data_file_by_plain_name(small_index, tmp_path):
    good = small_index.save(tmp_path / "good")
    outside = {"../outside.txt": {"sha256": "x", "bytes": 1}}
    for change, message in ((lambda f: f.pop("docs.parquet"), "must list"),
                            (lambda f: f.update(outside), "unknown data files")):
        bad = tmp_path / f"bad-{message.split()[0]}"
        shutil.copytree(good, bad)
        manifest = json.loads((bad / "manifest.json").read_text())
        change(manifest["files"])
        (bad / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorruptIndexError, match=message):
            SAEIndex.load(bad, embedder=small_index.embedder)


def test_index_command_needs_overwrite_for_an_existing_index(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    sae = random_sae(tmp_path / "sae")
    args = ["index", f"input={src}", f"output={tmp_path / 'idx'}", f"sae={sae}", "dense=none",
            f"embed.cache_dir={tmp_path / 'cache'}"]
    assert CliRunner().invoke(app, args).exit_code == 0
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "pass overwrite=true" in res.output
    assert CliRunner().invoke(app, [*args, "overwrite=true"]).exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text("{}")
    res = CliRunner().invoke(app, [*args[:2], f"output={mine}", *args[3:]])
    assert res.exit_code == 2 and "not a saefeat index" in res.output and (mine / "manifest.json").exists()


def test_loading_a_filter_runs_no_code_from_its_folder(tmp_path):
    from saefeat.detox.filter import ToxicityFilter

    texts = ["you stupid idiot", "have a nice day", "shut up moron", "thank you kindly"] * 4
    y = np.array([1, 0, 1, 0] * 4)
    filt = ToxicityFilter("tfidf", target="recall", target_value=0.5).fit(texts, y)
    path = filt.save(tmp_path / "filter")
    marker = tmp_path / "executed"
    for code in path.rglob("*.py"):  # an attacker's filter: its entry point writes a file when run
        code.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + code.read_text())
    loaded = ToxicityFilter.load(path)
    assert not marker.exists()
    np.testing.assert_allclose(loaded.predict_proba(texts)[:, 1], filt.predict_proba(texts)[:, 1])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SaefeatError, match="not a saefeat toxicity filter"):
        filt.save(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert filt.save(path, overwrite=True) == path and ToxicityFilter.load(path).threshold_ == filt.threshold_


def test_an_api_key_goes_over_https_or_to_this_machine_only(monkeypatch):
    from saefeat.explain.llm import OpenAICompatible

    monkeypatch.setenv("MY_KEY", "secret")
    with pytest.raises(SaefeatError, match="refusing to send \\$MY_KEY over plain http to example.com"):
        OpenAICompatible("http://example.com/v1", "m", "MY_KEY")
    OpenAICompatible("https://example.com/v1", "m", "MY_KEY")
    OpenAICompatible("http://127.0.0.1:8000/v1", "m", "MY_KEY")
    OpenAICompatible("http://localhost:8000/v1", "m", "MY_KEY")
    OpenAICompatible("http://example.com/v1", "m", "UNSET_KEY_FOR_TEST")  # no key, nothing to leak
    with pytest.raises(SaefeatError, match="http\\(s\\) URL"):
        OpenAICompatible("file:///etc/passwd", "m", "MY_KEY")


def test_cli_prints_its_own_errors_in_one_line_and_lets_bugs_raise(tmp_path, monkeypatch):
    import gzip

    bad_gz = tmp_path / "corpus.jsonl.gz"
    bad_gz.write_bytes(b"not gzip at all")
    res = CliRunner().invoke(app, ["embed", f"input={bad_gz}", f"output={tmp_path / 'o.npz'}"])
    assert res.exit_code == 2 and str(bad_gz) in res.output and "Traceback" not in res.output
    assert isinstance(gzip.BadGzipFile("x"), OSError)
    res = CliRunner().invoke(app, ["embed", f"input={tmp_path}", f"output={tmp_path / 'o.npz'}"])
    assert res.exit_code == 2 and "is a folder" in res.output
    for override, message in (("embed.batch_size=abc", "bad value for 'embed.batch_size'"),
                              ("embed.device=cuda:7", "device=")):
        res = CliRunner().invoke(app, ["embed", f"input={tmp_path / 'x.jsonl'}", f"output={tmp_path / 'o.npz'}",
                                       override])
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    import saefeat.commands.embed as command

    monkeypatch.setattr(command, "embed_file", lambda cfg: {}["a bug"])
    res = CliRunner().invoke(app, ["embed", f"input={tmp_path / 'x.jsonl'}", f"output={tmp_path / 'o.npz'}"])
    assert res.exit_code == 1 and isinstance(res.exception, KeyError)  # a bug is not dressed up as bad input


def test_out_of_range_alpha_and_sae_k_are_refused(small_index, tmp_path):
    with pytest.raises(SaefeatError, match="alpha"):
        small_index.search("statins", alpha=7)
    with pytest.raises(SaefeatError, match="exceeds the SAE's 512 latents"):
        SAEEmbedder("minilm", sae=random_sae(tmp_path / "sae"), sae_k=513, cache_dir=False)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_cache_shard_is_deleted_and_recomputed(tmp_path, damage):
    sae = random_sae(tmp_path / "sae")
    ref = SAEEmbedder("minilm", sae=sae, cache_dir=False, precision="fp32")
    fresh, fresh_dense = ref.encode(DOCS).toarray(), ref.encode_dense(DOCS)
    SAEEmbedder("minilm", sae=sae, cache_dir=tmp_path / "c", precision="fp32").encode(DOCS)
    shards = sorted((tmp_path / "c").rglob("shard-*.npz"))
    assert shards
    for shard in shards:
        data = bytearray(shard.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "flip":  # bytes flipped across the middle of the file (array data, covered by CRC and checksum)
            for i in range(len(data) * 2 // 5, len(data) * 3 // 5, 97):
                data[i] ^= 0xFF
        else:
            data = bytearray()
        shard.write_bytes(bytes(data))
    again = SAEEmbedder("minilm", sae=sae, cache_dir=tmp_path / "c", precision="fp32")
    np.testing.assert_array_equal(again.encode(DOCS).toarray(), fresh)
    np.testing.assert_allclose(again.encode_dense(DOCS), fresh_dense, rtol=1e-5, atol=1e-6)
    sae_dir = again._cache("sae").dir
    assert not any(s.exists() for s in shards if s.parent == sae_dir)  # deleted, fresh shards took their place
    third = SAEEmbedder("minilm", sae=sae, cache_dir=tmp_path / "c", precision="fp32")  # as a new process sees it
    np.testing.assert_array_equal(third.encode(DOCS).toarray(), fresh)
    np.testing.assert_allclose(third.encode_dense(DOCS), fresh_dense, rtol=1e-5, atol=1e-6)
    assert all(doc_hash_in(third, d) for d in DOCS)


def doc_hash_in(embedder, text):
    from saefeat.embed.cache import doc_hash

    return doc_hash(text) in embedder._cache("sae")


def test_nan_statistics_are_never_cached(tmp_path):
    import scipy.sparse as sp

    from saefeat.embed.cache import StatsCache
    from saefeat.embed.pooling import TokenStats

    cache = StatsCache(tmp_path, {"kind": "sae", "x": 1})
    good = sp.csr_matrix(np.array([[1.0, 0.0], [np.nan, 2.0], [0.0, 0.0]], np.float32))
    stats = TokenStats(np.array([3, 4, 5]), good, good, good, good)
    cache.put(["a", "b", "c"], stats)
    assert "a" in cache and "b" not in cache and "c" not in cache  # NaN row, and no activity over 5 tokens
    np.testing.assert_array_equal(StatsCache(tmp_path, {"kind": "sae", "x": 1}).get(["a"]).sum.toarray(), [[1, 0]])


def saefeat_process(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`python -m saefeat.cli ARGS` in the background, its output collected."""
    return subprocess.Popen([sys.executable, "-m", "saefeat.cli", *args], env=os.environ | (env or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    """Wait for `proc` to succeed; its output."""
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def kill_9_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ended first (then the test would cut nothing)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended before the cut: {proc.stdout.read()}"
        assert time.time() < deadline, "nothing to cut at before the timeout"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("command", ["embed", "index"])
def test_kill_9_resumes_to_the_same_rows(tmp_path, data_dir, command):
    """`saefeat embed` or `saefeat index` killed with SIGKILL once its first shard is cached; the rerun computes
    only the rest and writes the same rows as an uninterrupted run."""
    from saefeat.detox.data import load_labelled_comments
    from saefeat.embed.storage import load_sparse

    texts, _ = load_labelled_comments(data_dir / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"c{i}", "text": t[:300]}) + "\n" for i, t in enumerate(texts[:700])))
    sae = random_sae(tmp_path / "sae")
    common = [command, f"input={docs}", f"sae={sae}", "embed.precision=fp32", "embed.show_progress_bar=false"]
    if command == "index":
        common += ["id_field=id", "dense=none"]

    def run(out: str, cache: str, wait: bool = True) -> subprocess.Popen:
        proc = saefeat_process([*common, f"output={tmp_path / out}"], {"SAEFEAT_CACHE": str(tmp_path / cache)})
        if wait:
            finish(proc)
        return proc

    suffix = ".npz" if command == "embed" else ""
    run(f"whole{suffix}", "cache-whole")
    proc = run(f"cut{suffix}", "cache-cut", wait=False)
    kill_9_when(proc, lambda: any((tmp_path / "cache-cut").rglob("shard-*.npz")))
    assert not (tmp_path / f"cut{suffix}").exists()  # nothing half-written where the output goes
    done = {p.name for p in (tmp_path / "cache-cut").rglob("shard-*.npz")}
    assert done
    run(f"cut{suffix}", "cache-cut")
    assert done < {p.name for p in (tmp_path / "cache-cut").rglob("shard-*.npz")}  # kept, and the rest added
    if command == "embed":
        a, b = load_sparse(tmp_path / "whole.npz"), load_sparse(tmp_path / "cut.npz")
    else:
        a, b = (SAEIndex.load(tmp_path / name).vectors for name in ("whole", "cut"))
        assert list(SAEIndex.load(tmp_path / "cut").ids) == list(SAEIndex.load(tmp_path / "whole").ids)
    assert a.shape == b.shape == (700, 512)
    np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=1e-6, atol=1e-6)


def _gz_sample(src: Path, dst: Path, n_docs: int, chars: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(src, "rt") as fh, gzip.open(dst, "wt") as out:
        for i, line in enumerate(fh):
            if i == n_docs:
                break
            out.write(json.dumps({"text": json.loads(line)["text"][:chars]}) + "\n")


# a few documents of the recipe's corpora under the names it reads, and a tiny budget: train-sae's own settings
TRAIN_SAE_ARGS = ["train-sae", "recipe=minilm-topk-16k", "embed.show_progress_bar=false", "store.precision=fp32",
                  "store.seq_len=64", "store.train_tokens=12288", "store.eval_tokens=1024", "store.shard_windows=16",
                  "store.batch_windows=8", "train.bf16=false", "train.d_sae=2048", "train.k=8", "train.epochs=4",
                  "train.batch_size=1024", "train.warmup_steps=2", "train.dead_tokens=2048",
                  "train.checkpoint_every=4", "train.log_every=4", "train.eval_every=0", "half=false"]


def _train_sae(root: Path, name: str) -> subprocess.Popen:
    """`saefeat train-sae` into `root/name` on the corpus sample under `root/data`, on one thread (with two, the
    order of the threads' partial sums varies, and two uninterrupted runs already differ by about 1e-8)."""
    env = {"OMP_NUM_THREADS": "1", "SAEFEAT_CACHE": str(root / f"cache-{name}"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}"}
    return saefeat_process([*TRAIN_SAE_ARGS, f"data_dir={root / 'data'}", f"runs_dir={root / name}"], env)


@pytest.fixture(scope="module")
def train_sae_whole(tmp_path_factory, data_dir) -> Path:
    """A folder with the corpus sample and the uninterrupted train-sae run (`whole`) both kill -9 cases compare
    with: the run is the same for both, so it runs once."""
    root = tmp_path_factory.mktemp("train-sae")
    for name in ("corpus/gutenberg_one_book_per_author.jsonl.gz", "earnings/maec_transcripts_unlabeled.jsonl.gz"):
        _gz_sample(data_dir / name, root / "data" / name, 12, 20_000)
    finish(_train_sae(root, "whole"))
    return root


@pytest.mark.parametrize("phase", ["store", "train"])
def test_kill_9_of_train_sae_resumes_to_the_same_sae(train_sae_whole, phase):
    """`saefeat train-sae recipe=...` killed with SIGKILL while it writes its activation store, or once it has
    written its first training checkpoint; the same command again finishes with the bit-identical SAE of an
    uninterrupted run and keeps what was done (store shards, the checkpoint's steps)."""
    from saefeat.sae.formats import load_sae
    from saefeat.sae.store import ActivationStore

    root, name = train_sae_whole, f"cut-{phase}"
    cut = root / name
    manifest, checkpoint = cut / "stores" / "minilm-L3-L5-w256" / "manifest.json", \
        cut / "sae" / "minilm-L5-topk32-16k" / "checkpoint.safetensors"
    if phase == "store":
        kill_9_when(_train_sae(root, name), lambda: manifest.is_file() and '"name"' in manifest.read_text())
        assert not json.loads(manifest.read_text())["complete"] and not checkpoint.exists()
        kept = {p.name: p.stat().st_mtime_ns for p in manifest.parent.glob("shard_*/L5.npy")}
    else:
        kill_9_when(_train_sae(root, name), checkpoint.is_file)
        kept = {}
    assert not (checkpoint.parent / "sae").exists()  # no SAE before training finished
    out = finish(_train_sae(root, name))
    assert ("resuming" in out) == (phase == "train"), out  # training went on from the checkpoint's step
    for shard, mtime in kept.items():  # store shards written before the kill are kept, not rewritten
        assert (manifest.parent / shard / "L5.npy").stat().st_mtime_ns == mtime
    stores = [ActivationStore(root / r / "stores" / "minilm-L3-L5-w256") for r in ("whole", name)]
    assert stores[0].fingerprint == stores[1].fingerprint
    a, b = (load_sae(root / r / "sae" / "minilm-L5-topk32-16k" / "sae") for r in ("whole", name))
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), key
    logged = [[json.loads(line)["step"] for line in (root / r / "sae" / "minilm-L5-topk32-16k" / "log.jsonl")
               .read_text().splitlines()] for r in ("whole", name)]
    assert logged[0] == logged[1]  # no step logged twice by the resumed run


def test_kill_9_of_describe_latents_resumes_to_the_same_cards(tmp_path, data_dir):
    """`saefeat describe-latents` killed with SIGKILL after its first committed chunk; the same command again
    continues after that chunk and stores the cards an uninterrupted build stores."""
    import sqlite3

    from saefeat.detox.data import load_labelled_comments
    from saefeat.explain.store import LatentStore
    from saefeat.sae.formats import content_hash

    texts, _ = load_labelled_comments(data_dir / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t in texts[:160]))
    sae = random_sae(tmp_path / "sae", d_sae=256, k=8)
    args = ["describe-latents", f"sae={sae}", f"corpus={corpus}", "n_docs=160", "chunk_docs=4", "n_top=3",
            "n_sample=3", "embed.precision=fp32", "embed.show_progress_bar=false"]

    def store(name: str) -> LatentStore:
        return LatentStore.for_sae(content_hash(sae), tmp_path / name)

    def docs_done() -> int:
        if not store("cut").exists:
            return 0
        try:
            return int(LatentStore(store("cut").path, read_only=True).meta.get("docs_done", 0))
        except sqlite3.OperationalError:  # the writer holds the lock this instant
            return 0

    finish(saefeat_process([*args, f"store_dir={tmp_path / 'whole'}"]))
    kill_9_when(saefeat_process([*args, f"store_dir={tmp_path / 'cut'}"]), lambda: docs_done() >= 4)
    cut = LatentStore(store("cut").path, read_only=True)
    done = int(cut.meta["docs_done"])
    assert 4 <= done < 160 and done % 4 == 0 and not cut.complete  # whole chunks only
    cut.close()
    out = finish(saefeat_process([*args, f"store_dir={tmp_path / 'cut'}"]))
    assert f"resuming latent cards after {done} of 160 documents" in out
    a, b = store("whole"), store("cut")
    assert a.complete and b.complete and a.n_tokens == b.n_tokens
    np.testing.assert_array_equal(a.firing_counts(), b.firing_counts())
    key = ["latent", "kind", "doc", "pos"]
    ca, cb = (s.contexts().sort_values(key).reset_index(drop=True) for s in (a, b))
    assert len(ca) > 0
    pd.testing.assert_frame_equal(ca.drop(columns="acts"), cb.drop(columns="acts"))
    np.testing.assert_allclose(np.concatenate(ca.acts.tolist()), np.concatenate(cb.acts.tolist()), rtol=1e-6)
