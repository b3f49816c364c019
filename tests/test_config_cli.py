import pytest
from typer.testing import CliRunner

from saefeat.cli import app
from saefeat.config import ConfigError, load_config


def test_task_config_merges_model_and_overrides():
    cfg = load_config("train", ["model=smollm2", "sae.k=16", "layer=5"])
    assert cfg.model.path == "smollm2" and cfg.sae.k == 16 and cfg.layer == 5


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'sae.kk'.*valid keys under 'sae': d_sae, k"):
        load_config("train", ["sae.kk=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("train", ["sae.k"])


def test_a_section_is_not_overwritten_by_a_scalar():
    with pytest.raises(ConfigError, match=r"'sae' is a section, not a value; set one of its keys.*under 'sae': .*path"):
        load_config("embed", ["sae=/some/folder"])


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'gpt9'; valid: .*minilm.*smollm2"):
        load_config("train", ["model=gpt9"])


def test_cli_bad_override_is_one_clear_line():
    res = CliRunner().invoke(app, ["train-sae", "sae.dsae=5"])
    assert res.exit_code == 2
    assert "unknown config key 'sae.dsae'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["run", "task=nope"])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output
