"""The `train-sae` command: a config in, a tracked training run and a saved SAE out."""

from __future__ import annotations

from pathlib import Path

import mlflow
from omegaconf import DictConfig

from saefeat.config import to_dict
from saefeat.hosts import load_host
from saefeat.sae.activations import CorpusSource
from saefeat.sae.formats import save_sae
from saefeat.sae.model import SAE
from saefeat.sae.train import TrainConfig, train_sae
from saefeat.tracking import start_run


def train_config(cfg: DictConfig) -> TrainConfig:
    t = cfg.train
    return TrainConfig(
        layer=int(cfg.layer), d_sae=int(cfg.sae.d_sae), k=int(cfg.sae.k), total_tokens=int(t.total_tokens),
        batch_size=int(t.batch_size), lr=float(t.lr), warmup_steps=int(t.warmup_steps), aux_coef=float(t.aux_coef),
        dead_tokens=int(t.dead_tokens), seq_len=int(t.seq_len), buffer_tokens=int(t.buffer_tokens),
        batch_windows=int(t.batch_windows), eval_windows=int(t.eval_windows), held_out_every=int(t.held_out_every),
        bf16=bool(t.bf16), seed=int(cfg.seed),
        sources=[CorpusSource(str(s.path), str(s.text_field), float(s.share)) for s in cfg.data.sources],
    )


def run_training(cfg: DictConfig) -> tuple[SAE, dict[str, float], Path]:
    """Train an SAE as the config says, log it to MLflow and save it (saefeat layout) to `cfg.output`."""
    tc = train_config(cfg)
    for s in tc.sources:
        if not Path(s.path).is_file():
            raise FileNotFoundError(f"training corpus not found: {s.path} (set data_dir= or data.sources)")
    host = load_host(cfg.model.path, device=cfg.get("device"))
    name = f"{cfg.model.path}-L{tc.layer}-topk{tc.k}-{tc.d_sae}"
    with start_run(cfg.tracking.experiment or "sae-training", name, to_dict(cfg),
                   tags={"host": str(cfg.model.path), "layer": str(tc.layer)}):
        sae, metrics = train_sae(host, tc, log=lambda m, step: mlflow.log_metrics(m, step=step))
        out = save_sae(sae, cfg.output, meta={"recipe": to_dict(cfg), "metrics": metrics}, half=bool(cfg.half))
        mlflow.set_tag("sae_hash", sae.content_hash)
        mlflow.log_artifacts(str(out), artifact_path="sae")
    print(f"saved {sae.describe()} to {out}")
    for k, v in metrics.items():
        print(f"  {k}: {v:.4f}")
    return sae, metrics, Path(out)
