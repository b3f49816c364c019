"""`saefeat probe-sae`: one SAE through the probing suite (`saefeat.evaluation.probes`), every probe beside the
`dense`, `dense_last` and `sentence` baselines; one MLflow parent run, a child run per probe, the table printed and
logged with a plot of the SAE's gap to the dense baselines."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from saefeat import earnings
from saefeat.config import ConfigError, baseline_config, embed_config, load_config, parse_overrides
from saefeat.data import read_table
from saefeat.detox.data import load_labelled_comments, stratified_cap
from saefeat.embed.vectorizers import get_embedder
from saefeat.errors import SaefeatError
from saefeat.evaluation.comparison import TaskRun, print_table, widen_when_piped
from saefeat.evaluation.model_selection import check_penalty, check_regularization
from saefeat.evaluation.probes import (
    SIDES,
    ProbeResult,
    Side,
    core_probe,
    earnings_probe,
    probe_sides,
    property_probe,
    retrieval_probe,
    sentence_core_probe,
    sentiment_probe,
    toxicity_probe,
)
from saefeat.retrieval.evaluation import load_beir, subset
from saefeat.sae.activations import CorpusSource, sample_windows
from saefeat.shortcut.data import load_cad_sentiment_pairs

logger = logging.getLogger(__name__)
console = Console()

PROBES = ("core", "toxicity", "sentiment", "scifact", "properties", "earnings")


def probe_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The suite's config (configs/commands/probe.yaml + overrides); with quick=true the `quick_sizes` apply to
    every key the overrides do not set themselves."""
    given = set(parse_overrides(overrides))
    cfg = load_config("probe", overrides)
    if cfg.quick:
        sizes = OmegaConf.to_container(cfg.quick_sizes, resolve=True)
        for key, value in _leaves(sizes):
            if key not in given:
                OmegaConf.update(cfg, key, value, merge=False)
    bad = [p for p in cfg.probes if p not in PROBES]
    if bad:
        raise ConfigError(f"probes: unknown {bad}; valid: {', '.join(PROBES)}")
    if cfg.embed.sae is None:
        raise ConfigError("probe-sae scores an SAE: give sae=default or sae=PATH, not null")
    try:
        for key in ("toxicity.C", "sentiment.C"):
            check_regularization(OmegaConf.select(cfg, key), key)
        for key in ("probe_penalty.sae", "probe_penalty.baselines"):
            check_penalty(OmegaConf.select(cfg, key), key)
    except SaefeatError as err:
        raise ConfigError(str(err)) from None
    return cfg


def _leaves(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


# ---- data: read and checked before any model work ---------------------------------------------------------
def _comments(cfg: DictConfig) -> dict[str, Any]:
    t, seed = cfg.toxicity, int(cfg.seed)
    texts, y = load_labelled_comments(t.path, t.text_field, t.label_field)
    rows, _ = stratified_cap(list(range(len(texts))), y, t.max_comments, seed)
    subtypes = list(cfg.properties.subtypes)
    table = read_table(t.path, subtypes) if subtypes else pd.DataFrame(index=range(len(texts)))
    return {"texts": [texts[i] for i in rows], "y": y[rows],
            "subtypes": {c: table[c].to_numpy(int)[rows] for c in subtypes}}


def _sentiment(cfg: DictConfig) -> dict[str, Any]:
    """CAD's original reviews with their counterfactual edits, train and dev pairs pooled (the test files are
    held out), capped at `max_pairs` (stratified)."""
    s = cfg.sentiment
    root = Path(cfg.data_dir) / "shortcut"
    pairs = [load_cad_sentiment_pairs(root, split) for split in ("train", "dev")]
    classes = sorted(set(pairs[0].original.labels))
    originals = [t for p in pairs for t in p.original.texts]
    counterfactuals = [t for p in pairs for t in p.counterfactual.texts]
    y_in = np.concatenate([p.original.y(classes) for p in pairs])
    y_cf = np.concatenate([p.counterfactual.y(classes) for p in pairs])
    keep, _ = stratified_cap(list(range(len(originals))), y_in, s.max_pairs, int(cfg.seed))
    return {"originals": ([originals[i] for i in keep], y_in[keep]),
            "counterfactuals": ([counterfactuals[i] for i in keep], y_cf[keep]), "classes": classes}


def _scifact(cfg: DictConfig) -> Any:
    s = cfg.scifact
    return subset(load_beir(s.path, "train"), s.max_queries, s.max_docs, int(cfg.seed))


def _calls(cfg: DictConfig) -> dict[str, Any]:
    e = cfg.earnings
    df = earnings.load_calls(e.path)
    train, _ = earnings.split_calls(df, test_per_group=e.test_per_group, seed=int(cfg.seed), source=str(e.path))
    train = train[np.argsort(df.report_date.to_numpy()[train], kind="stable")]
    if e.max_calls is not None and e.max_calls < len(train):
        train = train[np.unique(np.round(np.linspace(0, len(train) - 1, int(e.max_calls))).astype(int))]
    texts = [t[: int(e.max_chars)] if e.max_chars else t for t in df.text.iloc[train]]
    return {"texts": texts, "y": df.surprise_label.to_numpy()[train], "dates": df.report_date.to_numpy()[train]}


LOADERS: dict[str, tuple[str, Callable[[DictConfig], Any]]] = {
    "toxicity": ("comments", _comments), "properties": ("comments", _comments), "sentiment": ("sentiment", _sentiment),
    "scifact": ("scifact", _scifact), "earnings": ("calls", _calls)}


def load_data(cfg: DictConfig) -> dict[str, Any]:
    """Every data set the configured probes read (properties reads the toxicity and sentiment texts)."""
    data: dict[str, Any] = {}
    for probe in cfg.probes:
        needs = [LOADERS[probe]] if probe in LOADERS else []
        if probe == "properties":
            needs.append(LOADERS["sentiment"])
        for key, load in needs:
            if key not in data:
                data[key] = load(cfg)
    return data


# ---- the probes -------------------------------------------------------------------------------------------
def run_probe(name: str, cfg: DictConfig, data: dict[str, Any], sides: list[Side]) -> ProbeResult:
    """One probe of the suite on the loaded data."""
    n_boot, seed, bar = int(cfg.bootstrap), int(cfg.seed), cfg.embed.show_progress_bar
    if name == "core":
        c = cfg.core
        emb = get_embedder(sides[0].embed)
        sources = [CorpusSource(str(s.path), str(s.text_field), float(s.share)) for s in c.sources]
        windows = list(islice(sample_windows(emb.host, sources, emb.window, seed, held_out=True,
                                             held_out_every=int(c.held_out_every)), int(c.max_windows)))
        if sides[0].representation == "sae_sentence":
            texts = [emb.host.tokenizer.decode(w) for w in windows]
            return sentence_core_probe(sides[0].transformer(), texts)
        return core_probe(emb, windows, dense_density=float(c.dense_density), ce_windows=int(c.ce_windows),
                          batch_size=int(cfg.embed.batch_size))
    if name == "toxicity":
        t, d = cfg.toxicity, data["comments"]
        return toxicity_probe(d["texts"], d["y"], sides, calib_fraction=float(t.calib_fraction),
                              val_fraction=float(t.val_fraction), toxic_rate=float(t.toxic_rate),
                              C=check_regularization(t.C), n_boot=n_boot, seed=seed, source=str(t.path))
    if name == "sentiment":
        d = data["sentiment"]
        return sentiment_probe(*d["originals"], *d["counterfactuals"], sides, n_folds=int(cfg.sentiment.n_folds),
                               C=check_regularization(cfg.sentiment.C), n_boot=n_boot, seed=seed)
    if name == "scifact":
        s = cfg.scifact
        return retrieval_probe(data["scifact"], sides, alpha=float(s.alpha), hybrid_dense=str(s.hybrid_dense),
                               depth=int(s.depth), n_boot=n_boot, seed=seed, show_progress_bar=bar)
    if name == "properties":
        p, c, s = cfg.properties, data["comments"], data["sentiment"]
        cad_texts, cad_y = s["originals"]
        corpora = {"jigsaw": (c["texts"], c["subtypes"]),
                   "cad": (cad_texts, {label: cad_y == i for i, label in enumerate(s["classes"])})}
        return property_probe(corpora, sides, n_examples=int(p.n_examples), draws=int(p.draws),
                              n_latents=int(p.n_latents), method=str(p.method), C=float(p.C), n_boot=n_boot,
                              seed=seed, show_progress_bar=bar)
    if name == "earnings":
        e, d = cfg.earnings, data["calls"]
        return earnings_probe(d["texts"], d["y"], d["dates"], sides, classifiers=list(e.classifiers),
                              selection=list(e.selection), k_grid=list(e.k_grid), n_splits=int(e.n_splits),
                              seed=seed, n_jobs=cfg.n_jobs)
    raise ConfigError(f"unknown probe {name!r}; valid: {', '.join(PROBES)}")


class ProbeRun(TaskRun):
    """The suite's parent run: the probes' rows make its table (`<probe>: <metric>` x side and gap)."""

    def __init__(self, cfg: DictConfig, run_name: str | None = None, start: float | None = None):
        super().__init__(cfg, run_name)
        self.results: dict[str, ProbeResult] = {}
        self.start = time.perf_counter() if start is None else start

    @contextlib.contextmanager
    def child(self, probe: str, params: dict[str, Any] | None = None,
              method: str | None = None) -> Iterator[dict[str, float]]:
        """A child run per probe (its rows hold every side: sae, dense, dense_last, sentence)."""
        with self.open_child(probe, {"probe": probe, "saefeat.role": "probe"}, {"probe": probe} | (params or {})) as m:
            yield m

    def table(self) -> pd.DataFrame:
        rows: dict[str, dict[str, float]] = {}
        for probe, result in self.results.items():
            rows |= result.rows(probe)
        columns = [c for side in (*SIDES, *(f"sae-{b}" for b in SIDES[1:])) for c in (side, f"{side}_lo", f"{side}_hi")]
        table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("probe")
        return table.reindex(columns=[c for c in columns if c in table.columns])

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.results:
                wall = time.perf_counter() - self.start
                table = self.table()
                mlflow.log_table(table.reset_index(), "probes.json")
                mlflow.log_figure(plot_gaps(table), "sae_gap.png")
                mlflow.log_metric("wall_seconds", wall)
                e = self.cfg.embed
                widen_when_piped(console, 200)  # eight columns of `value [lo, hi]`, one line each
                what = f"SAE {e.sae} on {e.model} ({e.pooling} pooling)" if self.cfg.representation == "sae" else \
                    f"sentence SAE {self.cfg.baselines.sentence_sae} on {self.cfg.baselines.sentence_model} " \
                    f"({self.cfg.baselines.sentence_sae_pooling} pooling)"
                print_table(_blank_missing(table), f"{self.name}: {what}",
                            console)
                n = len(self.results)
                console.print(f"{self.name}: {n} probe{'s' * (n != 1)} in {_clock(wall)} wall time")
        finally:
            self._stack.__exit__(*exc)


def _blank_missing(table: pd.DataFrame) -> pd.DataFrame:
    """The table for printing: a missing value (the baselines of the SAE's own metrics) prints as an empty cell."""
    out = table.astype(object)
    for c in table.columns:
        if not c.endswith(("_lo", "_hi")):
            out[c] = out[c].where(table[c].notna(), "")
    return out


def plot_gaps(table: pd.DataFrame):
    """Bars of the SAE's gap to `dense` (same layer) and `dense_last` per probe metric, with the paired 95%
    intervals where they exist."""
    gaps = [c for c in ("sae-dense", "sae-dense_last") if c in table.columns]
    rows = table.dropna(subset=gaps, how="all").index if gaps else []
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.8))
    width = 0.8 / max(len(gaps), 1)
    for j, col in enumerate(gaps):
        vals = table.loc[rows, col].to_numpy(float)
        lo = table.loc[rows, f"{col}_lo"].to_numpy(float) if f"{col}_lo" in table else vals
        hi = table.loc[rows, f"{col}_hi"].to_numpy(float) if f"{col}_hi" in table else vals
        err = np.nan_to_num(np.vstack([vals - lo, hi - vals]), nan=0.0).clip(0)
        ax.bar(np.arange(len(rows)) + j * width, vals, width, yerr=err, capsize=3, label=col.replace("-", " − "),
               color=("#d62728", "#1f77b4")[j])
    if not len(rows):
        ax.text(0.5, 0.5, "no probe with a baseline", ha="center", va="center", transform=ax.transAxes)
        return fig
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(rows)) + width * (len(gaps) - 1) / 2, rows, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("SAE minus baseline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def probe_sae(cfg: DictConfig) -> pd.DataFrame:
    """Run the configured probes on the configured SAE; returns the table (also printed and logged)."""
    start = time.perf_counter()
    data = load_data(cfg)
    pen = cfg.probe_penalty
    sides = probe_sides(embed_config(cfg), baseline_config(cfg), str(cfg.representation),
                        check_penalty(pen.sae), check_penalty(pen.baselines))
    e, b = cfg.embed, cfg.baselines
    tested = (str(e.sae), e.pooling) if cfg.representation == "sae" else (f"sentence-{b.sentence_sae}",
                                                                         b.sentence_sae_pooling)
    run_name = f"probe-{e.model}-{tested[0].rstrip('/').rsplit('/', 1)[-1]}-{tested[1]}" + ("-quick" if cfg.quick
                                                                                           else "")
    with ProbeRun(cfg, run_name, start) as run:
        mlflow.log_params({"sides": ",".join(s.name for s in sides)})
        for name in cfg.probes:
            with run.child(name) as metrics:
                logger.info("probe %s", name)
                result = run_probe(name, cfg, data, sides)
                metrics.update(result.flat())
            run.results[name] = result
        table = run.table()
    return table
