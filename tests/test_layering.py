"""The layering rule: the library's embedding, SAE and retrieval layers never import the command layer."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "saefeat"
LIBRARY = ("embed", "sae", "retrieval")
FORBIDDEN = ("omegaconf", "mlflow", "saefeat.config", "saefeat.tracking", "saefeat.commands", "saefeat.cli", "tasks",
             "saefeat.tasks", "saefeat.evaluation.comparison")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", LIBRARY)
def test_library_layers_do_not_import_config_tracking_or_commands(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = sorted(n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))
        if hits:
            bad[str(path.relative_to(ROOT.parent))] = hits
    assert not bad, bad


def test_the_rule_sees_an_offending_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from omegaconf import DictConfig\nimport saefeat.tracking as t\nfrom saefeat.commands import x\n")
    assert _imports(probe) >= {"omegaconf", "saefeat.tracking", "saefeat.commands"}


def test_commands_live_in_one_package():
    modules = {p.stem for p in (ROOT / "commands").glob("*.py")} - {"__init__"}
    assert {"embed", "search", "train_sae", "explain", "compare"} <= modules
    assert not list(ROOT.rglob("commands.py")) and not (ROOT / "embed" / "corpus.py").exists()
