"""The `saefeat` command line: every command takes `key=value` config overrides."""

from __future__ import annotations

import functools
import logging
import os
import time

import typer
from rich.console import Console
from rich.markup import escape

from saefeat.errors import SaefeatError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="SAE features as document representations. Commands take key=value overrides.")
console = Console(stderr=True)
Overrides = typer.Argument(None, help="config overrides, e.g. model=smollm2 embed.sae_k=32")


def _friendly(fn):
    """Show saefeat's own errors (bad input: a file, row, field or key) as one line instead of a traceback
    (SAEFEAT_DEBUG=1 keeps it); anything else is a bug and raises with its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except SaefeatError as e:
            if os.environ.get("SAEFEAT_DEBUG"):
                raise
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_friendly
def run(overrides: list[str] = Overrides) -> None:
    """Run a task: `saefeat run task=earnings model=smollm2 embed.sae_k=32`."""
    from saefeat.config import load_config
    from saefeat.tasks import get_task

    start = time.perf_counter()
    cfg = load_config("tasks", overrides or [])
    get_task(cfg.task)(cfg)
    typer.echo(f"{cfg.task}: finished in {_clock(time.perf_counter() - start)} wall time")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


@app.command("train-sae")
@_friendly
def train_sae(overrides: list[str] = Overrides) -> None:
    """Train a TopK SAE: `saefeat train-sae model=minilm layer=3 d_sae=4096 k=32 output=my-sae/`."""
    from saefeat.commands.train_sae import run_training
    from saefeat.config import load_config

    run_training(load_config("train", overrides or []))


@app.command()
@_friendly
def embed(overrides: list[str] = Overrides) -> None:
    """Embed a corpus: `saefeat embed input=corpus.jsonl text_field=text output=emb.npz`."""
    from saefeat.commands.embed import embed_file
    from saefeat.config import load_config

    embed_file(load_config("embed", overrides or []))


@app.command("index")
@_friendly
def index_cmd(overrides: list[str] = Overrides) -> None:
    """Build an SAE retrieval index: `saefeat index input=corpus.jsonl output=idx/ [id_field=_id]`."""
    from saefeat.commands.search import index_file
    from saefeat.config import load_config

    index_file(load_config("index", overrides or []))


@app.command()
@_friendly
def search(index: str = typer.Argument(..., help="index folder written by `saefeat index`"),
           overrides: list[str] = Overrides) -> None:
    """Search an index: `saefeat search idx/ query="..."` or `saefeat search idx/ examples=pos.txt`."""
    from saefeat.commands.search import run_search

    run_search(index, overrides or [])


@app.command()
@_friendly
def compare(overrides: list[str] = Overrides) -> None:
    """Print the latest run's metrics per representation and log a bar chart: `saefeat compare task=earnings`."""
    from saefeat.commands.compare import compare as run_compare

    run_compare(overrides or [])


@app.command("probe-sae")
@_friendly
def probe_sae(overrides: list[str] = Overrides,
              quick: bool = typer.Option(False, "--quick", help="tiny sizes (the same as quick=true)")) -> None:
    """Score one SAE on the probing suite beside dense baselines: `saefeat probe-sae [sae=PATH] [embed.pooling=...]`."""
    from saefeat.commands.probe import probe_config
    from saefeat.commands.probe import probe_sae as run_probes

    run_probes(probe_config([*(overrides or []), *(["quick=true"] if quick else [])]))


@app.command("describe-latents")
@_friendly
def describe_latents(overrides: list[str] = Overrides) -> None:
    """Latent cards over a reference corpus: `saefeat describe-latents model=minilm sae=default corpus=default`."""
    from saefeat.commands.explain import describe_latents as run_describe
    from saefeat.commands.explain import latent_config

    run_describe(latent_config("describe", overrides or []))


@app.command()
@_friendly
def explain(overrides: list[str] = Overrides) -> None:
    """Print a latent card (`saefeat explain latent=12`) or the latents per token (`saefeat explain text="..."`)."""
    from saefeat.commands.explain import explain as run_explain
    from saefeat.commands.explain import latent_config

    run_explain(latent_config("explain", overrides or []))


@app.command()
@_friendly
def ui(overrides: list[str] = Overrides) -> None:
    """The MLflow UI on the store: `saefeat ui [store=PATH|URI] [task=earnings] [port=5000] [workers=N]`."""
    from saefeat.commands.ui import ui as run_ui

    raise typer.Exit(run_ui(overrides or []))


if __name__ == "__main__":
    app()
