import mlflow
import pytest
from typer.testing import CliRunner

from saefeat.cli import app
from saefeat.sae import load_sae


@pytest.mark.parametrize("model,layer", [("minilm", 2)])
def test_train_sae_end_to_end_on_a_tiny_budget(data_dir, tmp_path, model, layer):
    out = tmp_path / "sae"
    res = CliRunner().invoke(app, [
        "train-sae", f"model={model}", f"layer={layer}", "d_sae=256", "k=8", f"output={out}",
        f"data_dir={data_dir}", "train.total_tokens=16384", "train.batch_size=1024", "train.buffer_tokens=8192",
        "train.eval_windows=8", "train.seq_len=64", "train.batch_windows=16", "train.warmup_steps=2",
    ])
    assert res.exit_code == 0, res.output
    sae = load_sae(out)
    assert (sae.d_in, sae.d_sae, sae.k, sae.cfg.layer, sae.cfg.host) == (384, 256, 8, layer, model)
    assert sae.cfg.extra["recipe"]["train"]["total_tokens"] == 16384
    runs = mlflow.search_runs(experiment_names=["sae-training"])
    assert len(runs) == 1
    for m in ("explained_variance", "l0", "dead_fraction", "train_fvu"):
        assert f"metrics.{m}" in runs.columns
    assert runs["metrics.l0"][0] == pytest.approx(8, abs=0.5)
    assert runs["params.d_sae"][0] == "256" and runs["tags.saefeat.git_commit"][0]


def test_train_sae_never_writes_into_the_package_or_over_a_user_folder(tmp_path):
    from saefeat.sae.formats import DEFAULTS_DIR

    res = CliRunner().invoke(app, ["train-sae", f"output={DEFAULTS_DIR / 'minilm'}"])
    assert res.exit_code == 2 and "inside the installed package" in res.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["train-sae", f"output={mine}"])
    assert res.exit_code == 2 and "not an SAE folder saefeat wrote" in res.output
    assert (mine / "notes.txt").read_text() == "keep me"


def test_store_recipes_are_named_and_checked_before_any_work(tmp_path):
    """`train-sae recipe=NAME`: an unknown name lists the recipes, a store recipe is not an SAE recipe, a host is
    the store's to name, and the outputs (run folder and store) may not be inside the package."""
    from saefeat.sae.formats import DEFAULTS_DIR

    run = lambda *a: CliRunner().invoke(app, ["train-sae", *a])  # noqa: E731
    res = run("recipe=nope")
    assert res.exit_code == 2 and "unknown store recipe 'nope'" in res.output and "minilm-topk-16k" in res.output
    res = run("recipe=minilm-store")
    assert res.exit_code == 2 and "describes an activation store, not an SAE" in res.output
    res = run("recipe=minilm-topk-16k", "model=smollm2")
    assert res.exit_code == 2 and "names its host in its store recipe" in res.output
    res = run("recipe=minilm-topk-16k", f"output={DEFAULTS_DIR / 'x'}")
    assert res.exit_code == 2 and "inside the installed package" in res.output
    res = run("recipe=minilm-topk-16k", f"output={tmp_path / 'run'}", f"store.output={DEFAULTS_DIR / 's'}")
    assert res.exit_code == 2 and "store.output" in res.output and not (tmp_path / "run").exists()
    res = run("recipe=minilm-topk-16k", "train.architecture=magic")
    assert res.exit_code == 2 and "magic" in res.output
    res = run("recipe=minilm-topk48-16k", f"output={tmp_path / 'ft'}", f"store.output={tmp_path / 'store'}",
              f"train.init_from={tmp_path / 'no-sae'}")
    assert res.exit_code == 2 and "train.init_from=" in res.output and "no SAE there" in res.output
    assert not (tmp_path / "store").exists()  # refused before any store work
