"""One parent MLflow run per task run, one child run per representation, the same metric names in each."""

from __future__ import annotations

import contextlib
import html
import time
from collections.abc import Iterator
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from saefeat.config import embed_config, to_dict
from saefeat.errors import SaefeatError
from saefeat.tracking import log_params, start_run


class TaskRun:
    """A task's parent run: `with task.child("sae") as rec:` opens a child run and collects metrics.

    Each child carries the resolved provenance of its representation as params, tags `representation` and
    `method` equal to those params; the parent gets `wall_seconds`, the table as
    `comparison.json`, a figure of the headline metrics (`comparison.png`) and `summary.html` linking every child.
    """

    def __init__(self, cfg: DictConfig, run_name: str | None = None):
        self.cfg = cfg
        self.name = str(cfg.task)
        self.run_name = run_name or f"{self.name}-{cfg.embed.model}"
        self.rows: dict[str, dict[str, float]] = {}
        self.run_ids: dict[str, str] = {}  # child run name -> its MLflow run id
        self._stack = contextlib.ExitStack()
        self._described: dict[str, dict[str, str]] = {}
        self.parent: mlflow.ActiveRun | None = None
        self.start: float | None = None  # wall_seconds counts from here (a subclass may set an earlier start)

    def __enter__(self) -> TaskRun:
        if self.start is None:
            self.start = time.perf_counter()
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
            if exc[0] is None:
                mlflow.log_metric("wall_seconds", time.perf_counter() - self.start)
                if self.rows:
                    table = self.table()
                    mlflow.log_table(table.round(4).reset_index(), "comparison.json")
                    mlflow.log_figure(plot_comparison(table), "comparison.png")
                    mlflow.log_text(summary_html(self.name, table, self.run_ids, self.parent), "summary.html")
                    print_table(table, f"{self.name}: representations compared")
        finally:
            self._stack.__exit__(*exc)

    def describe(self, representation: str) -> dict[str, str]:
        """The resolved provenance params of `representation` in this run (computed once)."""
        if representation not in self._described:
            from saefeat.config import baseline_config
            from saefeat.representations import describe_representation

            self._described[representation] = describe_representation(
                representation, embed_config(self.cfg), baseline_config(self.cfg)) if "embed" in self.cfg else {}
        return self._described[representation]

    @contextlib.contextmanager
    def child(self, representation: str, params: dict[str, Any] | None = None,
              method: str | None = None) -> Iterator[dict[str, float]]:
        """A child run `<method>/<representation>` (or `<representation>`); metrics put in the yielded dict are
        logged when it closes."""
        name = f"{method}/{representation}" if method else representation
        labels = {"representation": representation} | ({"method": method} if method else {})
        with self.open_child(name, labels | {"saefeat.role": "representation"},
                             labels | self.describe(representation) | (params or {})) as metrics:
            yield metrics

    @contextlib.contextmanager
    def open_child(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> Iterator[dict[str, float]]:
        """A nested run named `name` under the parent; the metrics put in the yielded dict are logged on close."""
        metrics: dict[str, float] = {}
        with mlflow.start_run(run_name=name, nested=True, experiment_id=self.parent.info.experiment_id,
                              tags={"task": self.name} | tags) as run:
            log_params(params)
            yield metrics
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        self.rows[name] = metrics
        self.run_ids[name] = run.info.run_id

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


def widen_when_piped(console: Console, width: int = 160) -> Console:
    """Logs and pipes get `width` columns instead of rich's 80, so tables are not squeezed to nothing."""
    if not console.is_terminal:
        console.width = max(console.width, width)
    return console


def print_table(df: pd.DataFrame, title: str, console: Console | None = None) -> None:
    """Print metrics as `value [lo, hi]` where a metric has an interval."""
    console = widen_when_piped(console or Console())
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
    """Metrics of the child runs of the experiment's latest parent run: (parent run id, table by child name)."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SaefeatError(f"no MLflow experiment {experiment!r} in {mlflow.get_tracking_uri()}; run the task first")
    parents = mlflow.search_runs([exp.experiment_id], filter_string="tags.`saefeat.role` = 'parent'",
                                 order_by=["start_time DESC"], max_results=20)
    for parent_id in parents["run_id"] if len(parents) else []:
        children = mlflow.search_runs([exp.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
        if len(children):
            cols = [c for c in children.columns if c.startswith("metrics.")]
            table = children.set_index("tags.mlflow.runName")[cols].rename(columns=lambda c: c[len("metrics."):])
            return parent_id, table.rename_axis("representation").sort_index()
    raise SaefeatError(f"experiment {experiment!r} has no finished task run with representation child runs")


# the lower end of a metric's axis: chance where it is known (a bar chart that starts there shows real gaps)
CHANCE = {"roc_auc": 0.5, "accuracy": 0.5, "balanced_accuracy": 0.5}


def is_sae_based(name: str) -> bool:
    """Whether a child run (`<method>/<representation>` or `<representation>`) uses SAE features."""
    from saefeat.representations import SAE_BASED

    rep = name.rsplit("/", 1)[-1]
    return rep in SAE_BASED or rep.startswith("sae")


def _chance(metric: str) -> float | None:
    return next((v for k, v in CHANCE.items() if metric == k or metric.endswith(f"_{k}")), None)


def _axis_floor(metric: str, lows: np.ndarray) -> float:
    chance = _chance(metric)
    low = float(np.nanmin(lows)) if len(lows) else 0.0
    if chance is not None and chance <= low:
        return chance
    return max(0.0, low - 0.1 * abs(low)) if low >= 0 else low * 1.1


def headline_metrics(table: pd.DataFrame, fallback: int = 4) -> list[str]:
    """The metrics of a comparison that carry a 95% interval, else its first `fallback` metrics."""
    return [c for c in table.columns if f"{c}_lo" in table.columns] or \
        [c for c in table.columns if not c.endswith(("_lo", "_hi"))][:fallback]


def plot_comparison(table: pd.DataFrame, metrics: list[str] | None = None):
    """The headline metrics (those with a 95% interval) by child run as bars with error bars; SAE-based runs in
    red, the others grey; each axis starts at chance where that is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = metrics or headline_metrics(table)
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(max(3.2, 0.55 * len(table) + 1.5) * len(metrics), 3.6),
                             squeeze=False)
    colors = ["#d62728" if is_sae_based(str(r)) else "#7f7f7f" for r in table.index]
    for ax, m in zip(axes[0], metrics):
        vals = table[m].to_numpy(float)
        lo = table[f"{m}_lo"].to_numpy(float) if f"{m}_lo" in table else vals
        hi = table[f"{m}_hi"].to_numpy(float) if f"{m}_hi" in table else vals
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(0)
        x, floor = np.arange(len(table)), _axis_floor(m, np.minimum(lo, vals))
        ax.bar(x, vals - floor, bottom=floor, yerr=err, capsize=4, color=colors)
        ax.set_xticks(x, [str(i) for i in table.index], rotation=35, ha="right", fontsize=8)
        top = float(np.nanmax(np.maximum(hi, vals)))
        ax.set_ylim(floor, top + 0.05 * max(top - floor, 1e-6))
        if (chance := _chance(m)) is not None and floor <= chance <= top:
            ax.axhline(chance, color="k", lw=0.8, ls="--")
        ax.set_title(m if chance is None else f"{m} (dashed: chance)")
    fig.suptitle("SAE-based runs in red", fontsize=9, color="#d62728")
    fig.tight_layout()
    return fig


def summary_html(task: str, table: pd.DataFrame, run_ids: dict[str, str], parent: mlflow.ActiveRun) -> str:
    """A page with the comparison table (value [lo, hi]) and, per child, links to its run and its latent report."""
    exp = parent.info.experiment_id
    client = mlflow.MlflowClient()
    metrics = [c for c in table.columns if not c.endswith(("_lo", "_hi"))]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    rows = []
    for name, row in table.iterrows():
        run_id = run_ids.get(str(name), "")
        cells = []
        for m in metrics:
            v = row[m]
            text = "" if pd.isna(v) else f"{v:.3f}"
            if f"{m}_lo" in table and pd.notna(row.get(f"{m}_lo")):
                text += f" <small>[{row[m + '_lo']:.3f}, {row[m + '_hi']:.3f}]</small>"
            cells.append(f"<td>{text}</td>")
        reports = [a.path for a in client.list_artifacts(run_id) if a.path.endswith(".html")] if run_id else []
        links = " ".join(f'<a target="_blank" href="/#/experiments/{exp}/runs/{run_id}/artifacts/{html.escape(r)}">'
                         f"{html.escape(r)}</a>" for r in reports)
        if not links and is_sae_based(str(name)):
            links = "<em>no latent report</em>"
        style = ' style="color:#d62728"' if is_sae_based(str(name)) else ""
        rows.append(f'<tr><th{style}><a target="_blank" href="/#/experiments/{exp}/runs/{run_id}">'
                    f"{html.escape(str(name))}</a></th>{''.join(cells)}<td>{links}</td></tr>")
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(task)}</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 8px;text-align:right}"
            "table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}</style>"
            f"<h2>{html.escape(task)}: representations compared</h2>"
            f"<p>Run {parent.info.run_id}. Intervals are 95% bootstrap intervals; SAE-based runs in red.</p>"
            f"<table><tr><th>run</th>{head}<th>latent report</th></tr>{''.join(rows)}</table>")
