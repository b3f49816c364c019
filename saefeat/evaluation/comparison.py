"""One parent MLflow run per task run, one child run per representation, the same metric names in each."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import mlflow
import pandas as pd
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from saefeat.config import embed_config, to_dict
from saefeat.tracking import log_params, start_run


class TaskRun:
    """A task's parent run: `with task.child("sae") as rec:` opens a child run and collects metrics."""

    def __init__(self, cfg: DictConfig, run_name: str | None = None):
        self.cfg = cfg
        self.name = str(cfg.task)
        self.run_name = run_name or f"{self.name}-{cfg.embed.model}"
        self.rows: dict[str, dict[str, float]] = {}
        self._stack = contextlib.ExitStack()
        self.parent: mlflow.ActiveRun | None = None

    def __enter__(self) -> TaskRun:
        experiment = self.cfg.tracking.experiment or self.name
        self.parent = self._stack.enter_context(start_run(
            experiment, self.run_name, to_dict(self.cfg),
            tags={"task": self.name, "host": str(self.cfg.embed.model), "sae": str(self.cfg.embed.sae),
                  "saefeat.role": "parent"}))
        self.resolved = resolved_embedding(self.cfg)
        if self.resolved:
            log_params({"resolved": self.resolved})
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.rows:
                table = self.table()
                mlflow.log_table(table.reset_index(), "comparison.json")
                print_table(table, f"{self.name}: representations compared")
        finally:
            self._stack.__exit__(*exc)

    @contextlib.contextmanager
    def child(self, name: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, float]]:
        """A child run for one representation; metrics put in the yielded dict are logged when it closes."""
        metrics: dict[str, float] = {}
        with mlflow.start_run(run_name=name, nested=True, experiment_id=self.parent.info.experiment_id,
                              tags={"representation": name, "task": self.name, "saefeat.role": "representation"}):
            log_params({"resolved": self.resolved} | (params or {}))
            yield metrics
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        self.rows[name] = metrics

    def table(self) -> pd.DataFrame:
        return pd.DataFrame.from_dict(self.rows, orient="index").rename_axis("representation")


def resolved_embedding(cfg: DictConfig) -> dict[str, str]:
    """What the run's SAE embedding resolves to (host and SAE hashes, layer, backend, precision, device, kernel),
    from the embedder the `sae` representation uses; {} for a config without an embedding section."""
    if "embed" not in cfg:
        return {}
    from saefeat.embed.vectorizers import get_embedder
    from saefeat.provenance import embedder_provenance

    return embedder_provenance(get_embedder(embed_config(cfg)))


def print_table(df: pd.DataFrame, title: str, console: Console | None = None) -> None:
    """Print metrics as `value [lo, hi]` where a metric has an interval."""
    console = console or Console()
    if not console.is_terminal:  # logs and pipes: do not squeeze the table to 80 columns
        console.width = max(console.width, 160)
    metrics = [c for c in df.columns if not c.endswith(("_lo", "_hi"))]
    t = Table(title=title)
    t.add_column(df.index.name or "")
    for m in metrics:
        t.add_column(m, justify="right")
    for idx, row in df.iterrows():
        cells = []
        for m in metrics:
            v = row[m]
            if f"{m}_lo" in df.columns and pd.notna(row.get(f"{m}_lo")):
                cells.append(f"{v:.3f} [{row[m + '_lo']:.3f}, {row[m + '_hi']:.3f}]")
            else:
                cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        t.add_row(str(idx), *cells)
    console.print(t)


def latest_comparison(experiment: str) -> tuple[str, pd.DataFrame]:
    """Metrics of the child runs of the experiment's latest parent run: (parent run id, table)."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}; run the task first")
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.`saefeat.role` = 'parent'",
                                 order_by=["start_time DESC"], max_results=20)
    for parent_id in parents["run_id"] if len(parents) else []:
        children = mlflow.search_runs([exp.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
        if len(children):
            cols = [c for c in children.columns if c.startswith("metrics.")]
            table = children.set_index("tags.representation")[cols].rename(columns=lambda c: c[len("metrics."):])
            return parent_id, table.rename_axis("representation").sort_index()
    raise ValueError(f"experiment {experiment!r} has no finished task run with representation child runs")


def plot_comparison(table: pd.DataFrame, metrics: list[str] | None = None):
    """Bar chart of each metric per representation with its 95% interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = metrics or [c for c in table.columns if f"{c}_lo" in table.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = table[m].to_numpy(float)
        err = np.vstack([vals - table[f"{m}_lo"].to_numpy(float), table[f"{m}_hi"].to_numpy(float) - vals])
        ax.bar(table.index, vals, yerr=np.clip(err, 0, None), capsize=4,
               color=["#d62728" if r == "sae" else "#7f7f7f" for r in table.index])
        ax.set_title(m)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig
