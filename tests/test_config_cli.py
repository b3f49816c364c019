import pytest
from typer.testing import CliRunner

from saefeat.cli import app
from saefeat.config import ConfigError, load_config


def test_task_config_merges_model_and_overrides():
    cfg = load_config("train", ["model=smollm2", "k=16", "layer=5"])
    assert cfg.embed.model == "smollm2" and cfg.k == 16 and cfg.layer == 5


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'embed.kk'.*valid keys under 'embed': .*pool_k"):
        load_config("train", ["embed.kk=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("train", ["k"])


def test_a_section_is_not_overwritten_by_a_scalar():
    with pytest.raises(ConfigError, match=r"'embed' is a section, not a value; set one of its keys.*under 'embed': "):
        load_config("embed", ["embed=/some/folder"])


@pytest.mark.parametrize("kind", ["tasks", "embed", "index", "describe", "explain", "probe"])
def test_sae_means_the_same_in_every_command(kind):
    extra = {"embed": ["input=a", "output=b.npz"], "index": ["input=a", "output=b"]}.get(kind, [])
    assert load_config(kind, ["sae=/some/folder", *extra]).embed.sae == "/some/folder"


@pytest.mark.parametrize("override,message", [
    ("embed.batch_size=-1", "embed.batch_size must be an integer >= 1"),
    ("embed.max_tokens=-3", "embed.max_tokens must be an integer >= 1 or null"),
    ("embed.window=0", "embed.window must be an integer >= 1 or null"),
    ("embed.sae_k=-1", "embed.sae_k must be an integer >= 1 or null"),
    ("embed.pooling=median", "embed.pooling must be one of max, sqrt_max, mean"),
    ("embed.batch_size=abc", "bad value for 'embed.batch_size'"),
    ("embed.k=8", "config key 'embed.k' is now embed.pool_k"),
    ("sae.path=x", "config key 'sae.path' is now sae"),
    ("baselines.dense_pooling=topk", "baselines.dense_pooling must be one of"),
])
def test_bad_embedding_values_fail_at_load_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tasks", [override])


def test_an_unknown_key_in_a_yaml_embed_section_names_it(tmp_path, monkeypatch):
    import shutil

    from saefeat.config import configs_dir

    shutil.copytree(str(configs_dir()), tmp_path / "configs")
    task = tmp_path / "configs/tasks/earnings.yaml"
    task.write_text(task.read_text().replace("embed:\n", "embed:\n  windw: 128\n"))
    monkeypatch.setenv("SAEFEAT_CONFIGS", str(tmp_path / "configs"))
    with pytest.raises(ConfigError, match=r"unknown config key 'embed.windw' in the YAML"):
        load_config("tasks", [])


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'gpt9'; valid: .*minilm.*smollm2"):
        load_config("tasks", ["model=gpt9"])


def test_cli_bad_override_is_one_clear_line():
    res = CliRunner().invoke(app, ["train-sae", "sae.dsae=5"])
    assert res.exit_code == 2
    assert "unknown config key 'sae.dsae'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["run", "task=nope"])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
