"""Embedding corpora on the local and the Ray backend: the same rows, resumable shard folders (issue 21)."""

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from saefeat.embed.config import EmbedConfig
from saefeat.embed.embedder import SAEEmbedder
from saefeat.embed.pooling import pool
from saefeat.engine import RayOptions, embed_corpus, read_embeddings, read_stats
from saefeat.engine.backends import ray_available
from saefeat.errors import SaefeatError
from tests.helpers import random_sae

needs_ray = pytest.mark.skipif(not ray_available() and not os.environ.get("SAEFEAT_REQUIRE_RAY"),
                               reason="Ray Data is not installed (pip install 'saefeat[ray]')")


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory):
    """60 real comments of the toxicity set (the first 400 characters), with ids."""
    from saefeat.detox.data import load_labelled_comments

    texts, _ = load_labelled_comments(data_dir / "toxicity" / "jigsaw_toxic_balanced_8k.csv.gz")
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "text": t[:400]}) + "\n" for i, t in enumerate(texts[:60])))
    return path, [t[:400] for t in texts[:60]]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    sae = random_sae(tmp_path_factory.mktemp("sae") / "sae", d_sae=512, k=16)
    return EmbedConfig(model="minilm", sae=str(sae), precision="fp32", cache=False)


@pytest.fixture(scope="module")
def local_run(corpus, config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("local") / "out"
    return embed_corpus(corpus[0], folder, config, id_field="id", shard_rows=8, show_progress_bar=False)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_shard_folder_holds_the_embedders_statistics_in_input_order(corpus, config, local_run):
    path, texts = corpus
    m = local_run.manifest
    assert m["complete"] and m["rows"] == 60 and len(m["shards"]) == 8 and m["d_sae"] == 512
    assert [r["rows"] for r in m["shards"].values()] == [8] * 7 + [4]
    assert {f.name for f in local_run.folder.iterdir()} == {"manifest.json", *(r["name"] for r in m["shards"].values())}
    stats, ids = read_stats(local_run.folder)
    assert ids == [f"c{i}" for i in range(60)]
    direct = SAEEmbedder.from_config(config).encode_stats(texts[:8], show_progress_bar=False)
    first = stats.take(np.arange(8))
    np.testing.assert_array_equal(first.n_tokens, direct.n_tokens)
    for key in ("sum", "max", "count", "log1p_sum"):  # the same shard's documents: the embedder's own statistics
        np.testing.assert_array_equal(getattr(first, key).toarray(), getattr(direct, key).toarray())
    for pooling in ("max", "mean", "log1p_topk"):
        X, _ = read_embeddings(local_run.folder, pooling=pooling)
        np.testing.assert_allclose(X.toarray(), pool(stats, pooling).toarray(), rtol=1e-6)
    table = pq.read_table(local_run.folder / "shard-000000.parquet")
    assert table.column_names == ["row", "id", "n_tokens", "latents", "sum", "max", "count", "log1p_sum"]


def test_the_npz_route_and_the_shard_route_agree(corpus, config, local_run, tmp_path):
    from typer.testing import CliRunner

    from saefeat.cli import app

    out = tmp_path / "e.npz"
    res = CliRunner().invoke(app, ["embed", f"input={corpus[0]}", "id_field=id", f"output={out}", f"sae={config.sae}",
                                   "embed.precision=fp32", "embed.cache=false", "value_dtype=float32"])
    assert res.exit_code == 0, res.output
    a, ids_a = read_embeddings(out)
    b, ids_b = read_embeddings(local_run.folder, pooling="max")
    assert ids_a == ids_b and a.shape == b.shape
    # other forward batches: equal up to float rounding, which can flip a latent at the top-k cut-off
    close = np.isclose(a.toarray(), b.toarray(), rtol=1e-4, atol=1e-4)
    assert close.mean() > 0.9999
    with pytest.raises(SaefeatError, match="pooled when"):
        read_embeddings(out, pooling="mean")


def test_a_rerun_resumes_and_recomputes_a_damaged_shard(corpus, config, local_run, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(local_run.folder, folder)
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    (folder / "shard-000002.parquet").write_bytes(b"not parquet")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["shards"]["3"]  # as if killed after shard 3 landed but before the manifest recorded it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run = embed_corpus(corpus[0], folder, config, id_field="id", shard_rows=8, show_progress_bar=False)
    assert run.docs == 8  # only the damaged shard; shard 3's file was adopted
    assert run.manifest["shards"]["3"].get("adopted") and run.manifest["complete"]
    after = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    assert [n for n in before if before[n] != after[n]] == ["shard-000002.parquet"]
    a, _ = read_embeddings(folder)
    b, _ = read_embeddings(local_run.folder)
    np.testing.assert_array_equal(a.toarray(), b.toarray())
    with pytest.raises(SaefeatError, match="other settings"):  # another shard size is another run
        embed_corpus(corpus[0], folder, config, id_field="id", shard_rows=6, show_progress_bar=False)


def test_bad_rows_are_named_and_nothing_written_is_lost(corpus, config, local_run, tmp_path):
    import shutil

    folder = tmp_path / "kept"
    shutil.copytree(local_run.folder, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    bad = tmp_path / "bad.jsonl"
    lines = corpus[0].read_text().splitlines()
    lines[7] = json.dumps({"id": "c7", "text": "   "})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(SaefeatError, match=r"row 7: empty"):
        embed_corpus(bad, folder, config, id_field="id", shard_rows=8, show_progress_bar=False)
    with pytest.raises(SaefeatError, match="body"):
        embed_corpus(corpus[0], folder, config, text_field="body", shard_rows=8, show_progress_bar=False)
    with pytest.raises(SaefeatError, match="other settings"):  # another input into a finished folder
        embed_corpus(bad, folder, config, id_field="id", shard_rows=8, allow_empty=True, show_progress_bar=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(SaefeatError, match="did not write"):
        embed_corpus(corpus[0], mine, config, show_progress_bar=False)


@needs_ray
def test_ray_and_local_give_the_same_rows(corpus, config, local_run, tmp_path, ray_session):
    run = embed_corpus(corpus[0], tmp_path / "ray", config, id_field="id", shard_rows=8, backend="ray",
                       ray=RayOptions(concurrency=2), show_progress_bar=False)
    assert run.manifest["complete"] and run.manifest["sessions"][-1]["actors"] == 2
    assert run.manifest["settings_hash"] == local_run.manifest["settings_hash"]
    a, ids_a = read_stats(run.folder)
    b, ids_b = read_stats(local_run.folder)
    assert ids_a == ids_b == [f"c{i}" for i in range(60)]
    for key in ("sum", "max", "count", "log1p_sum"):
        np.testing.assert_array_equal(getattr(a, key).toarray(), getattr(b, key).toarray())
    np.testing.assert_array_equal(a.n_tokens, b.n_tokens)


def _ray_embed(corpus, config, out, env=None) -> subprocess.Popen:
    args = ["embed", f"input={corpus[0]}", "id_field=id", f"output={out}", f"sae={config.sae}", "backend=ray",
            "ray.concurrency=2", "ray.num_cpus_total=2", "shard_rows=8", "embed.precision=fp32", "embed.cache=false",
            "embed.show_progress_bar=false"]
    return subprocess.Popen([sys.executable, "-m", "saefeat.cli", *args], env=os.environ | (env or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_tree(proc: subprocess.Popen, which: str) -> None:
    """SIGKILL the driver with the Ray processes it started (`which=driver`), or one actor (`which=actor`)."""
    import psutil

    deadline = time.time() + 300
    driver = psutil.Process(proc.pid)

    def actors() -> list:
        return [p for p in driver.children(recursive=True) if "StatsWorker" in " ".join(p.cmdline() or [])]

    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        shards = list(out_folder(proc).glob("shard-*.parquet")) if out_folder(proc) else []
        if shards and (which == "driver" or actors()):
            break
        time.sleep(0.1)
    if which == "actor":
        actors()[0].kill()
        return
    tree = driver.children(recursive=True)
    driver.kill()
    proc.wait()
    for p in tree:  # the Ray processes a killed driver leaves behind
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def out_folder(proc: subprocess.Popen):
    from pathlib import Path

    arg = next(a for a in proc.args if a.startswith("output="))
    folder = Path(arg.removeprefix("output="))
    return folder if folder.is_dir() else None


@needs_ray
@pytest.mark.parametrize("which", ["driver", "actor"])
def test_kill_9_on_ray_ends_with_the_same_rows(corpus, config, local_run, tmp_path, which):
    """kill -9 of the driver (then the same command again), or of one actor mid-run (Ray restarts it and
    retries its shard): the folder ends with the rows of an uninterrupted local run."""
    out = tmp_path / "out"
    proc = _ray_embed(corpus, config, out)
    _kill_tree(proc, which)
    if which == "driver":
        manifest = json.loads((out / "manifest.json").read_text())
        assert not manifest["complete"]
        proc = _ray_embed(corpus, config, out)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    if which == "driver":
        assert sum(r["rows"] for r in manifest["shards"].values()) == 60 and manifest["sessions"][-1]["docs"] < 60
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # the store the subprocess wrote to
        runs = mlflow.search_runs(experiment_names=["embeddings"])  # the finished session's run
        assert len(runs) >= 1 and runs["metrics.actors"].max() == 2 and runs["metrics.tokens_per_s"].max() > 0
        assert runs["tags.backend"].tolist()[0] == "ray"
    a, ids_a = read_embeddings(out, pooling="max")
    b, ids_b = read_embeddings(local_run.folder, pooling="max")
    assert ids_a == ids_b
    np.testing.assert_array_equal(a.toarray(), b.toarray())


def test_an_index_builds_from_a_shard_folder(corpus, local_run):
    from saefeat.retrieval.index import SAEIndex

    index = SAEIndex.from_shards(local_run.folder, pooling="topk", pool_k=32)
    X, ids = read_embeddings(local_run.folder, pooling="topk", pool_k=32)
    assert index.ids == ids and index.texts == corpus[1]
    np.testing.assert_array_equal(index.vectors.toarray(), X.toarray())
    hits = index.search(corpus[1][5], k=3)  # a document's own text finds it first
    assert hits[0].doc_id == "c5"
