"""The MLflow UI over saefeat's store: the server command, deep links, and a shared view per task comparison."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd

from saefeat.errors import MissingFileError

# MLflow's experiment tag of a shared view state (what the UI's "share" button stores):
# `?viewStateShareKey=KEY` opens the runs table in that state
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def store_uri(store: str | None = None) -> str:
    """The tracking URI of `store`: a URI as given, a folder holding `mlflow.db`, or the default store."""
    from saefeat.tracking import default_tracking_uri

    if not store:
        return default_tracking_uri()
    if "://" in store:
        return store
    path = Path(store).expanduser().resolve()
    db = path / "mlflow.db" if path.is_dir() or path.suffix != ".db" else path
    if not db.is_file():
        raise MissingFileError(f"store={store}: no MLflow database at {db} (run a task first, or pass a URI)")
    return f"sqlite:///{db}"


def server_command(uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int | None = None) -> list[str]:
    """`mlflow ui` on `uri`, with local artifacts beside a SQLite store and few workers on small machines."""
    workers = workers or max(1, min(4, (os.cpu_count() or 1) // 2))
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", str(workers)]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()]
    return cmd


def serve(cmd: Sequence[str]) -> int:
    """Run the server in its own process group and pass SIGINT/SIGTERM/SIGHUP on to the whole group, so that
    stopping this process stops the server and every worker it started; returns the server's exit code."""
    proc = subprocess.Popen(list(cmd), start_new_session=True)

    def forward(signum, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a server that exited on its own
            os.killpg(proc.pid, signal.SIGTERM)


def experiment_url(base_url: str, experiment_id: str, share_key: str | None = None) -> str:
    """A link to the experiment's runs table in the model-training view (optionally in a shared view state)."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={share_key}" if share_key else "")
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def share_comparison_view(experiment_id: str, parent_id: str, table: pd.DataFrame,
                          params: Sequence[str] = ("representation", "method", "layer", "pooling", "sae_id")) -> str:
    """Store a view of one task run on its experiment: its child runs only, with the headline metrics (those with
    an interval) and the provenance params as columns; returns the share key for `experiment_url`."""
    from saefeat.evaluation.comparison import headline_metrics

    headline = headline_metrics(table, fallback=6)
    state = {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_id}'",
        "orderByKey": "attributes.start_time", "orderByAsc": True, "startTime": "ALL",
        "selectedColumns": [_column("params", p) for p in params] + [_column("metrics", m) for m in headline],
        "runListHidden": False, "viewMaximized": False,
    }
    key = f"saefeat-{parent_id[:12]}"
    mlflow.MlflowClient().set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG}{key}", json.dumps(state))
    return key
