"""`saefeat ui`: the MLflow UI on saefeat's store, opened on a task's latest comparison."""

from __future__ import annotations

from collections.abc import Sequence

import mlflow
import pandas as pd
from rich.console import Console

from saefeat.config import ConfigError, parse_overrides
from saefeat.ui import experiment_url, serve, server_command, share_comparison_view, store_uri

USAGE = "usage: saefeat ui [store=PATH|URI] [task=NAME] [host=127.0.0.1] [port=5000] [workers=N]"


def comparison_link(experiment: str, base_url: str, latest: tuple[str, pd.DataFrame] | None = None) -> str:
    """A link to the latest task run of `experiment` (`latest`: its `latest_comparison`, when the caller has it):
    its child runs with the headline metrics as columns."""
    from saefeat.evaluation.comparison import latest_comparison

    parent_id, table = latest or latest_comparison(experiment)
    exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    return experiment_url(base_url, exp_id, share_comparison_view(exp_id, parent_id, table))


def latest_task_experiment() -> str | None:
    """The experiment of the store's most recent task run (parent run), if there is one."""
    exps = [e.experiment_id for e in mlflow.search_experiments()]
    runs = mlflow.search_runs(exps, filter_string="tags.`saefeat.role` = 'parent'", order_by=["start_time DESC"],
                              max_results=1) if exps else []
    return mlflow.get_experiment(runs.experiment_id.iloc[0]).name if len(runs) else None


def ui(overrides: Sequence[str], console: Console | None = None) -> int:
    """Print a link to `task`'s latest run (by default to the latest task run), then run the MLflow server until
    it is stopped (Ctrl-C or SIGTERM stop its workers too)."""
    console = console or Console()
    ov = parse_overrides(overrides)
    store, task = ov.pop("store", None), ov.pop("task", None)
    host, port, workers = ov.pop("host", "127.0.0.1"), ov.pop("port", "5000"), ov.pop("workers", None)
    if ov or not port.isdigit() or (workers is not None and not workers.isdigit()):
        raise ConfigError(f"{USAGE} (got {' '.join(overrides)})")
    uri = store_uri(store)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    mlflow.set_tracking_uri(uri)
    experiment = task or latest_task_experiment()
    if experiment:
        link = comparison_link(experiment, base)
        console.print(f"{experiment}: the latest run's representations side by side:\n  {link}", soft_wrap=True)
    else:
        console.print(f"MLflow UI (no task run in this store yet): {base}/#/experiments?workflowType=machine_learning",
                      soft_wrap=True)
    console.print(f"(store: {uri}; stop with Ctrl-C)", soft_wrap=True, highlight=False)
    return serve(server_command(uri, host, int(port), int(workers) if workers else None))
