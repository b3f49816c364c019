"""Fault injection: bad values, foreign folders, tampered files and code in data are refused up front, by name,
and nothing the user owns is replaced (issue 18)."""

import json
import shutil

import numpy as np
import pytest
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


@pytest.mark.parametrize("command", ["embed", "index"])
def test_kill_9_resumes_to_the_same_rows(tmp_path, data_dir, command):
    """`saefeat embed` or `saefeat index` killed with SIGKILL once its first shard is cached; the rerun computes
    only the rest and writes the same rows as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

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
        env = os.environ | {"SAEFEAT_CACHE": str(tmp_path / cache)}
        proc = subprocess.Popen([sys.executable, "-m", "saefeat.cli", *common, f"output={tmp_path / out}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if wait:
            assert proc.wait(timeout=600) == 0, proc.stderr.read()
        return proc

    suffix = ".npz" if command == "embed" else ""
    run(f"whole{suffix}", "cache-whole")
    proc = run(f"cut{suffix}", "cache-cut", wait=False)
    deadline = time.time() + 300
    while not list((tmp_path / "cache-cut").rglob("shard-*.npz")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
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
