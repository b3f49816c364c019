"""MLflow tracking: a SQLite store in ./mlruns by default, one run per command, child runs per representation."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

import saefeat
from saefeat.provenance import environment


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else a SQLite database in ./mlruns."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


_own_uri: str | None = None  # the store setup_tracking chose itself last: re-resolved on the next call


def _caller_uri() -> str | None:
    """The store the caller set with `mlflow.set_tracking_uri`, if it is not one saefeat set itself."""
    try:
        from mlflow.tracking._tracking_service import utils
    except ImportError:  # moved in another MLflow version: only saefeat's own resolution is known
        return None
    current = getattr(utils, "_tracking_uri", None)
    return None if not current or current == _own_uri else str(current)


def setup_tracking(uri: str | None = None) -> str:
    """Use `uri`, else the store the caller already set in code, else `default_tracking_uri()`."""
    global _own_uri
    caller = None if uri else _caller_uri()
    uri = uri or caller or default_tracking_uri()
    if caller is None:
        _own_uri = uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


# MLflow's experiment kind: it picks the UI's model-training view (MLflow 3 guesses GenAI for an experiment without)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def ensure_experiment(name: str) -> str:
    """Experiment id, creating it with artifacts under ./mlruns/artifacts when the store is local; the UI opens
    it in the model-training view."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:///"):
        root = Path(mlflow.get_tracking_uri().removeprefix("sqlite:///")).parent / "artifacts" / name
        location = root.resolve().as_uri()
    return mlflow.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else str(v)
    return out


def log_params(params: dict[str, Any]) -> None:
    flat = {k: v[:500] for k, v in flatten(params).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, config: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run carrying the resolved config and what it ran on (versions, CPU, git commit and dirty flag)."""
    if not nested:
        setup_tracking()
    exp_id = ensure_experiment(experiment)
    base_tags = {"saefeat.version": saefeat.__version__, **environment()}
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested,
                          tags=base_tags | (tags or {})) as run:
        if config is not None:
            log_params(config)
            mlflow.log_dict(config, "config.yaml")
        yield run
