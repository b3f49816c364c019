"""`saefeat train-sae`: a recipe in, a tracked training run and a saved SAE out.

Two routes. `model=NAME` runs the quick in-memory trainer of configs/train/<model>.yaml (a streaming buffer; an
interrupted run starts again, and its seed gives the same SAE). `recipe=NAME` runs an SAE recipe of
configs/train/store/: its activation store is written (or finished) first, then the SAE trains from it with
checkpoints; rerunning the same command after an interruption, kill -9 included, resumes both phases and gives the
SAE an uninterrupted run gives.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from omegaconf import DictConfig

from saefeat.config import to_dict
from saefeat.errors import MissingFileError, SaefeatError
from saefeat.hosts import load_host
from saefeat.sae.activations import CorpusSource
from saefeat.sae.formats import DEFAULTS_DIR, SAEFEAT_META, save_sae
from saefeat.sae.model import SAE
from saefeat.sae.store import ActivationStore, store_config, write_store
from saefeat.sae.train import StoreTrainConfig, TrainConfig, train_from_store, train_sae
from saefeat.tracking import start_run


def train_config(cfg: DictConfig) -> TrainConfig:
    """The trainer's settings from a recipe (configs/train/<model>.yaml merged with overrides)."""
    if cfg.architecture != "topk":
        raise SaefeatError(f"architecture={cfg.architecture!r}: `train-sae` trains topk SAEs")
    t = cfg.train
    return TrainConfig(
        layer=int(cfg.layer), d_sae=int(cfg.d_sae), k=int(cfg.k), total_tokens=int(t.total_tokens),
        batch_size=int(t.batch_size), lr=float(t.lr), warmup_steps=int(t.warmup_steps), aux_coef=float(t.aux_coef),
        dead_tokens=int(t.dead_tokens), seq_len=int(t.seq_len), buffer_tokens=int(t.buffer_tokens),
        batch_windows=int(t.batch_windows), eval_windows=int(t.eval_windows), held_out_every=int(t.held_out_every),
        bf16=bool(t.bf16), seed=int(cfg.seed),
        sources=[CorpusSource(str(s.path), str(s.text_field), float(s.share)) for s in cfg.data.sources],
    )


def _outside_package(path: Path, key: str) -> None:
    if path.resolve().is_relative_to(DEFAULTS_DIR.resolve().parent):
        raise SaefeatError(f"{key}={path} is inside the installed package ({DEFAULTS_DIR.parent}); "
                           "choose a folder of your own")


def output_folder(cfg: DictConfig, tc: TrainConfig) -> Path:
    """Where the SAE goes: `output`, or a new folder under the working directory; never inside the package, and
    an existing folder only with overwrite=true when it holds an SAE saefeat wrote."""
    name = f"sae-{Path(str(cfg.embed.model)).name}-L{tc.layer}-{cfg.architecture}{tc.k}-{tc.d_sae}"
    out = Path(cfg.output) if cfg.output else Path.cwd() / name
    _outside_package(out, "output")
    if out.exists() and any(out.iterdir()):
        if not (out / SAEFEAT_META).is_file():
            raise SaefeatError(f"output={out} exists and is not an SAE folder saefeat wrote; choose another")
        if not cfg.overwrite:
            raise SaefeatError(f"output={out} already holds an SAE; pass overwrite=true to replace it")
    return out


def run_training(cfg: DictConfig) -> tuple[SAE, dict[str, float], Path]:
    """Train an SAE as the recipe says, log it to MLflow and save it (saefeat layout)."""
    if "store" in cfg:
        return run_store_training(cfg)
    tc = train_config(cfg)
    out = output_folder(cfg, tc)  # checked before any training
    for s in tc.sources:
        if not Path(s.path).is_file():
            raise MissingFileError(f"training corpus not found: {s.path} (set data_dir= or data.sources)")
    model = str(cfg.embed.model)
    host = load_host(model, device=cfg.embed.device)
    name = f"{model}-L{tc.layer}-topk{tc.k}-{tc.d_sae}"
    with start_run(cfg.tracking.experiment or "sae-training", name, to_dict(cfg),
                   tags={"host": model, "layer": str(tc.layer)}):
        sae, metrics = train_sae(host, tc, log=lambda m, step: mlflow.log_metrics(m, step=step))
        save_sae(sae, out, meta={"recipe": to_dict(cfg), "metrics": metrics}, half=bool(cfg.half))
        _log_saved(sae, metrics, out)
    return sae, metrics, out


def _log_saved(sae: SAE, metrics: dict[str, float], folder: Path) -> None:
    """Tag the active MLflow run with the SAE, attach its folder, and print where it went with its metrics."""
    mlflow.set_tag("sae_hash", sae.content_hash)
    mlflow.log_artifacts(str(folder), artifact_path="sae")
    print(f"saved {sae.describe()} to {folder}")
    for k, v in metrics.items():
        print(f"  {k}: {v:.4f}")


def write_recipe_store(cfg: DictConfig) -> ActivationStore:
    """Write, finish or extend the activation store an SAE recipe (`recipe=NAME`) trains from."""
    s = cfg.store
    _outside_package(Path(s.output), "store.output")
    store_doc = {k: v for k, v in to_dict(s).items() if k not in ("model", "output", "runs_dir")}
    sc = store_config(store_doc)  # checked before the host loads
    host = load_host(str(s.model), device=cfg.embed.device)
    store = write_store(host, sc, s.output, show_progress_bar=bool(cfg.embed.show_progress_bar))
    last = store.manifest.get("last_write", {"tokens": 0, "seconds": 0.0})
    print(f"store {store.folder}: {store.train_tokens:,} training + {store.manifest['eval']['tokens']:,} held-out "
          f"tokens of layers {store.layers}" + (f"; its last write added {last['tokens']:,} tokens in "
                                                f"{last['seconds']:.0f} s" if last["tokens"] else ""), flush=True)
    return store


def run_store_training(cfg: DictConfig) -> tuple[SAE, dict[str, float], Path]:
    """The store route: write the recipe's store where unfinished, then train from it (resuming a checkpoint)."""
    try:
        tc = StoreTrainConfig(**to_dict(cfg.train))  # checked before any host or store work
    except TypeError as e:
        raise SaefeatError(f"recipe {cfg.recipe}: its `train` section is not a store-trained SAE's ({e})") from None
    out = Path(cfg.output)
    _outside_package(out, "output")
    if tc.init_from and not Path(tc.init_from).exists():  # before the store is written, which takes minutes
        raise MissingFileError(f"train.init_from={tc.init_from}: no SAE there (recipe {cfg.recipe} fine-tunes it)")
    store = write_recipe_store(cfg)
    name = f"{cfg.store.model}-L{tc.layer}-{tc.architecture}{tc.k}-{tc.d_sae}"
    with start_run(cfg.tracking.experiment or "sae-training", name, to_dict(cfg),
                   tags={"host": str(cfg.store.model), "layer": str(tc.layer), "recipe": str(cfg.recipe),
                         "run_folder": str(out.resolve())}):
        sae, metrics, saved = train_from_store(ActivationStore(store.folder), tc, out, half=bool(cfg.half),
                                               log=lambda m, step: mlflow.log_metrics(m, step=step),
                                               meta={"recipe": to_dict(cfg)}, device=cfg.embed.device,
                                               overwrite=bool(cfg.overwrite),
                                               show_progress_bar=bool(cfg.embed.show_progress_bar))
        _log_saved(sae, metrics, saved)
    return sae, metrics, saved
