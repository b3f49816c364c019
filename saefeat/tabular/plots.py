"""Figures for the tabular task: real against synthetic distributions, and concept faithfulness."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from saefeat.tabular.schema import TableSchema  # noqa: E402


def plot_distributions(real: pd.DataFrame, synthetic: pd.DataFrame, schema: TableSchema, max_categories: int = 8,
                       labels: tuple[str, str] = ("real (held-out)", "synthetic")):
    """One panel per column: overlaid histograms (numerical) or bars of the most common values (categorical)."""
    cols = schema.columns
    n = len(cols)
    width = min(4, n)
    fig, axes = plt.subplots(math.ceil(n / width), width, figsize=(3.6 * width, 2.8 * math.ceil(n / width)),
                             squeeze=False)
    for ax, c in zip(axes.ravel(), cols):
        if schema.types[c] == "numerical":
            a, b = real[c].dropna().to_numpy(float), synthetic[c].dropna().to_numpy(float)
            both = np.concatenate([a, b])
            lo, hi = np.percentile(both, [0.5, 99.5]) if len(both) else (0, 1)
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
            ax.hist(a, bins=bins, density=True, alpha=0.5, label=labels[0])
            ax.hist(b, bins=bins, density=True, alpha=0.5, label=labels[1])
        else:
            ra = real[c].fillna("<missing>").astype(str).value_counts(normalize=True)
            sb = synthetic[c].fillna("<missing>").astype(str).value_counts(normalize=True)
            top = ra.index[:max_categories]
            x = np.arange(len(top))
            ax.bar(x - 0.2, ra.reindex(top).fillna(0), 0.4, label=labels[0])
            ax.bar(x + 0.2, sb.reindex(top).fillna(0), 0.4, label=labels[1])
            ax.set_xticks(x, [str(t)[:12] for t in top], rotation=60, fontsize=7)
        ax.set_title(c, fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_faithfulness(table: pd.DataFrame):
    """Per concept: share of synthetic rows that show it, of real rows that belong to it, and the base rate."""
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(table) + 2), 3.6))
    x = np.arange(len(table))
    ax.bar(x - 0.27, table["synthetic_rate"], 0.27, label="synthetic rows of the concept", color="#d62728")
    ax.bar(x, table["real_member_rate"].fillna(0), 0.27, label="real rows of the concept", color="#1f77b4")
    ax.bar(x + 0.27, table["base_rate"], 0.27, label="all real rows (base rate)", color="#7f7f7f")
    ax.axhline(0.8, ls="--", lw=0.8, color="k")
    ax.set_xticks(x, table["concept"], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("share of rows whose concept latents fire")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
