"""An installed saefeat runs from any folder: configs and tasks ship inside the package, tasks register through entry
points, and a stray ./configs in the working directory changes nothing."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.machinery import EXTENSION_SUFFIXES
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from saefeat import tasks as registry
from saefeat.config import ConfigError, configs_dir, load_config
from saefeat.embed.storage import load_sparse

REPO = Path(__file__).resolve().parent.parent
# what a fresh clone would not have, or what must not leak into the build from this checkout
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "mlruns",
                                     "outputs", ".*_cache", ".cache")
BUILTINS = sorted(p.stem for p in (REPO / "tasks").glob("*.py") if not p.name.startswith("_"))


def _wheel_names(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


def _expected_files() -> set[str]:
    """Every module and data file of the source tree, as its path inside the wheel."""
    mapped = [("saefeat", REPO / "saefeat", ("*.py", "*/*.py", "weights/*/*")),
              ("saefeat/configs", REPO / "configs", ("*.py", "**/*.yaml")),
              ("saefeat/tasks", REPO / "tasks", ("*.py",))]
    return {f"{prefix}/{p.relative_to(root).as_posix()}" for prefix, root, globs in mapped for g in globs
            for p in root.glob(g) if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, site folder): the wheel built from a copy of the source tree, installed with `pip --target`."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "wheel"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (whl,) = (root / "wheel").glob("saefeat-*.whl")
    site = root / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(whl)],
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    return whl, site


def test_wheel_ships_configs_and_tasks_inside_saefeat(installed):
    whl, site = installed
    names = _wheel_names(whl)
    assert {"saefeat/configs/base.yaml", "saefeat/configs/commands/embed.yaml", "saefeat/tasks/earnings.py"} <= names
    assert not [n for n in names if n.split("/")[0] in ("tasks", "configs")]  # no top-level tasks/ or configs/
    missing = _expected_files() - names  # the explicit package list in pyproject.toml left something out
    assert not missing, sorted(missing)
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
    with zipfile.ZipFile(whl) as z:
        assert z.read(f"{dist_info}/top_level.txt").decode().split() == ["saefeat"]
        eps = configparser.ConfigParser()
        eps.read_string(z.read(f"{dist_info}/entry_points.txt").decode())
    assert dict(eps["saefeat.tasks"]) == {t: f"saefeat.tasks.{t}:run" for t in BUILTINS}
    assert not (site / "tasks").exists() and (site / "saefeat" / "tasks" / "__init__.py").is_file()
    if shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]):  # the optional kernel, where it can build
        assert {f"saefeat/sae/_topk{suffix}" for suffix in EXTENSION_SUFFIXES} & names


def test_installed_copy_embeds_from_another_folder(installed, tmp_path):
    """`saefeat embed` of the installed copy, from a folder with a stray ./configs that must be ignored."""
    _, site = installed
    work = tmp_path / "elsewhere"
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "base.yaml").write_text("embed:\n  model: not-a-model\n  sae: /nowhere\n")
    docs = ["Revenue grew twelve percent.", "Margins fell in the quarter.", "Guidance was raised."]
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    env = {k: v for k, v in os.environ.items() if k != "SAEFEAT_CONFIGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])

    probe = ("import json, saefeat, saefeat.tasks as t; from saefeat.config import configs_dir; "
             "print(json.dumps([saefeat.__file__, t.__file__, str(configs_dir()), t.available_tasks()]))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pkg, tasks_file, configs, tasks = json.loads(res.stdout.strip().splitlines()[-1])
    for path in (pkg, tasks_file, configs):
        assert Path(path).resolve().is_relative_to(site.resolve()), path  # the installed copy, not the repo
    assert {t: tasks[t] for t in BUILTINS} == {t: f"saefeat.tasks.{t}:run" for t in BUILTINS}

    out = work / "out" / "emb.npz"
    out.parent.mkdir()
    cmd = [str(site / "bin" / "saefeat"), "embed", "input=docs.jsonl", f"output={out}", "model=minilm",
           f"embed.cache_dir={tmp_path / 'cache'}", "embed.show_progress_bar=false"]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    X = load_sparse(out)
    assert X.shape[0] == 3 and all(X[i].nnz > 0 for i in range(3))
    assert [json.loads(x) for x in out.with_suffix(".ids.jsonl").read_text().splitlines()] == ["0", "1", "2"]


def test_configs_come_from_the_package_not_the_working_directory(tmp_path, monkeypatch):
    """conftest runs every test in its own tmp_path; a ./configs there is never read."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("embed:\n  model: not-a-model\n")
    assert Path(str(configs_dir())).resolve() == (REPO / "configs").resolve()  # the editable install maps it here
    assert load_config("embed", ["input=a", "output=b.npz"]).embed.model == "minilm"

    own = tmp_path / "mine"
    shutil.copytree(REPO / "configs", own, ignore=_NOT_SOURCE)
    (own / "models" / "minilm.yaml").write_text("embed:\n  model: minilm\n  window: 64\n")
    monkeypatch.setenv("SAEFEAT_CONFIGS", str(own))
    assert load_config("embed", ["input=a", "output=b.npz", "model=minilm"]).embed.window == 64
    monkeypatch.setenv("SAEFEAT_CONFIGS", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="SAEFEAT_CONFIGS=.*missing is not a configs folder"):
        load_config("embed", ["input=a", "output=b.npz"])


def test_builtin_tasks_are_registered_as_entry_points():
    """pyproject registers every module of tasks/ (this reads the metadata of the current install)."""
    from importlib.metadata import entry_points

    own = {ep.name: ep.value for ep in entry_points(group=registry.GROUP) if ep.value.startswith("saefeat.tasks.")}
    assert own == registry.builtin_tasks() == {t: f"saefeat.tasks.{t}:run" for t in BUILTINS}
    assert registry.get_task("earnings").__module__ == "saefeat.tasks.earnings"


def test_a_plugin_never_shadows_a_builtin(monkeypatch):
    plugins = [EntryPoint("earnings", "evil.plugin:run", registry.GROUP),
               EntryPoint("earnings", "saefeat.tasks.earnings:run", registry.GROUP),
               EntryPoint("sentiment", "myplugin.sentiment:run", registry.GROUP),
               EntryPoint("sentiment", "other.sentiment:run", registry.GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep for ep in plugins if ep.group == group])
    with pytest.warns(registry.TaskNameClash) as caught:
        tasks = registry.available_tasks()
    assert tasks["earnings"] == "saefeat.tasks.earnings:run" and tasks["sentiment"] == "myplugin.sentiment:run"
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "'evil.plugin:run'" in messages[0] and "built-in 'saefeat.tasks.earnings:run'" in messages[0]
    assert "'other.sentiment:run'" in messages[1] and "'myplugin.sentiment:run'" in messages[1]
