"""`saefeat compare`: the latest task run's metrics per representation, printed and logged as a figure."""

from __future__ import annotations

from collections.abc import Sequence

import mlflow

from saefeat.commands.ui import comparison_link
from saefeat.config import ConfigError, parse_overrides
from saefeat.evaluation.comparison import latest_comparison, plot_comparison, print_table
from saefeat.tracking import setup_tracking


def compare(overrides: Sequence[str]) -> None:
    """`task=NAME [experiment=NAME] [port=5000]`: print the table of the latest run with a link to it in the MLflow
    UI (as `saefeat ui` serves it), and log `comparison.png` on it."""
    ov = parse_overrides(overrides)
    task = ov.pop("task", None)
    experiment = ov.pop("experiment", None) or task
    port = ov.pop("port", "5000")
    if not experiment or ov or not port.isdigit():
        raise ConfigError("usage: saefeat compare task=NAME [experiment=NAME] [port=5000]")
    setup_tracking()
    parent_id, table = latest_comparison(experiment)
    print_table(table, f"{experiment}: latest run {parent_id[:8]}")
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_figure(plot_comparison(table), "comparison.png")
    link = comparison_link(experiment, f"http://127.0.0.1:{port}", (parent_id, table))
    print(f"in the MLflow UI (`saefeat ui`): {link}")
