"""`saefeat compare`: the latest task run's metrics per representation, printed and logged as a figure."""

from __future__ import annotations

from collections.abc import Sequence

import mlflow

from saefeat.config import ConfigError, parse_overrides
from saefeat.evaluation.comparison import latest_comparison, plot_comparison, print_table
from saefeat.tracking import setup_tracking


def compare(overrides: Sequence[str]) -> None:
    """`task=NAME [experiment=NAME]`: print the table of the latest run and log `comparison.png` on it."""
    ov = parse_overrides(overrides)
    task = ov.pop("task", None)
    experiment = ov.pop("experiment", None) or task
    if not experiment or ov:
        raise ConfigError("usage: saefeat compare task=NAME [experiment=NAME]")
    setup_tracking()
    parent_id, table = latest_comparison(experiment)
    print_table(table, f"{experiment}: latest run {parent_id[:8]}")
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_figure(plot_comparison(table), "comparison.png")
