"""Shared fixtures: the real offline hosts, the shared data folder, isolated caches and MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAEFEAT_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder; a test that needs it skips where it is missing, or fails under
    SAEFEAT_REQUIRE_DATA=1 (CI, where a silently skipped half of the suite would pass)."""
    if not DATA.is_dir():
        if os.environ.get("SAEFEAT_REQUIRE_DATA") == "1":
            pytest.fail(f"shared data not found at {DATA} (SAEFEAT_REQUIRE_DATA=1; set SAEFEAT_DATA_DIR)",
                        pytrace=False)
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def minilm():
    from saefeat.hosts import get_host

    return get_host("minilm", "cpu")


@pytest.fixture(scope="session")
def smollm2():
    from saefeat.hosts import get_host

    return get_host("smollm2", "cpu")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, tmp_path_factory, monkeypatch):
    """Every test gets its own embedding cache and MLflow store. The cache sits beside the test's tmp_path, not in
    it: on CPUs without native bf16 the ONNX export lands there, and tests assert what tmp_path holds."""
    monkeypatch.setenv("SAEFEAT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SAEFEAT_CONFIGS", raising=False)  # the configs of the imported saefeat package
