"""YAML configs (the `saefeat.configs` package, configs/ in the repo) merged with `key=value` overrides (OmegaConf,
strict keys)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from saefeat.device import resolve_device
from saefeat.embed.config import BaselineConfig, EmbedConfig
from saefeat.errors import SaefeatError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


class ConfigError(SaefeatError):
    """A bad config name, key or value; the message lists what is valid."""


def configs_dir() -> Traversable:
    """The configs: the folder `$SAEFEAT_CONFIGS` when set, else the installed `saefeat.configs` package.

    The working directory is never searched, so a stray ./configs cannot replace the package's configs.
    """
    env = os.environ.get("SAEFEAT_CONFIGS")
    if env:
        folder = Path(env)
        if not (folder / "base.yaml").is_file():
            raise ConfigError(f"SAEFEAT_CONFIGS={env} is not a configs folder (no base.yaml in {folder.resolve()})")
        return folder
    return files("saefeat.configs")


def read_config(*parts: str) -> DictConfig:
    """One YAML file of the configs, e.g. `read_config("commands", "search.yaml")`."""
    node = configs_dir().joinpath(*parts)
    if not node.is_file():
        raise ConfigError(f"config file {'/'.join(parts)} not found in {configs_dir()}")
    cfg = OmegaConf.create(node.read_text(encoding="utf-8"))
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {'/'.join(parts)} is not a mapping")
    return cfg


def available(kind: str) -> list[str]:
    """Names of the YAML files in configs/<kind>/ (kind: tasks, models, train, commands)."""
    folder = configs_dir().joinpath(*kind.split("/"))
    if not folder.is_dir():
        return []
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml") and p.is_file())


_LABELS = {"tasks": "task", "models": "model", "train": "training recipe for model", "train/store": "store recipe",
           "commands": "command"}


def _load_named(kind: str, name: str) -> DictConfig:
    parts = (*kind.split("/"), f"{name}.yaml")
    if not configs_dir().joinpath(*parts).is_file():
        raise ConfigError(f"unknown {_LABELS[kind]} {name!r}; valid: {', '.join(available(kind))}")
    return read_config(*parts)


def parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """`["a.b=1", "task=x"]` -> {"a.b": "1", "task": "x"}; a token without '=' is an error."""
    out: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def _valid_keys(cfg: DictConfig, dotted: str) -> str:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = sorted(node.keys()) if isinstance(node, DictConfig) else []
    where = f"under {parent!r}" if parent else "at the top level"
    return f"valid keys {where}: {', '.join(map(str, keys))}"


def apply_overrides(cfg: DictConfig, overrides: dict[str, str]) -> DictConfig:
    """Merge overrides into a struct config: unknown keys raise a ConfigError listing valid ones."""
    OmegaConf.set_struct(cfg, True)
    for key, value in overrides.items():
        if isinstance(OmegaConf.select(cfg, key), DictConfig):  # a scalar would silently replace a whole section
            raise ConfigError(f"{key!r} is a section, not a value; set one of its keys ({key}.<key>=...); "
                              f"{_valid_keys(cfg, key + '.x')}")
        try:
            merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except (ConfigAttributeError, ConfigKeyError) as e:
            raise ConfigError(f"unknown config key {key!r}; {_valid_keys(cfg, key)}") from e
        except OmegaConfBaseException as e:
            raise ConfigError(f"bad value for {key!r}: {value!r} ({_first_line(e)})") from e
        cfg = merged
        OmegaConf.set_struct(cfg, True)
    return cfg


# keys of earlier versions, and where each went
RENAMED = {"model.path": "model (or embed.model)", "model.layer": "embed.layer", "model.window": "embed.window",
           "sae.path": "sae (or embed.sae)", "sae.k": "embed.sae_k", "embed.k": "embed.pool_k",
           "embed.dense_pooling": "baselines.dense_pooling", "embed.sentence_model": "baselines.sentence_model",
           "embed.tfidf_max_features": "baselines.tfidf_max_features"}
SHORTHANDS = {"sae": "embed.sae"}  # `sae=X` is short for embed.sae=X in every command


def _first_line(e: OmegaConfBaseException) -> str:
    return str(getattr(e, "msg", None) or e).splitlines()[0]


def load_config(kind: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Resolved config for a command: base.yaml, then the command's YAML, then configs/models/<model>.yaml when
    `model=NAME` is given, then the overrides; `embed` and `baselines` are typed (EmbedConfig, BaselineConfig).

    kind: tasks (`task=NAME` picks tasks/NAME.yaml), train (train/<model>.yaml), embed, index, describe, explain,
    probe.
    """
    ov = parse_overrides(overrides)
    for short, full in SHORTHANDS.items():
        if short in ov:
            ov[full] = ov.pop(short)
    for old, new in RENAMED.items():
        if old in ov:
            raise ConfigError(f"config key {old!r} is now {new}")
    base = read_config("base.yaml")
    model = ov.pop("model", None)
    if kind == "tasks":
        task = ov.pop("task", None) or str(base.get("task"))
        parts = [_load_named("tasks", task), {"task": task}]
    elif kind == "train" and "recipe" in ov:  # a store recipe: configs/train/store/<recipe>.yaml + its store
        recipe = ov.pop("recipe")
        if model is not None:
            raise ConfigError(f"recipe={recipe} names its host in its store recipe; drop model={model}")
        variant = _load_named("train/store", recipe)
        if "store" not in variant:
            raise ConfigError(f"configs/train/store/{recipe}.yaml describes an activation store, not an SAE; "
                              "name an SAE recipe (one with a `store:` key)")
        parts = [variant, {"store": _load_named("train/store", str(variant.store))}, {"recipe": recipe}]
    elif kind == "train":
        parts = [_load_named("train", model or "minilm")]
    elif kind in ("embed", "index", "describe", "probe"):
        parts = [_load_named("commands", kind)]
    elif kind == "explain":  # `explain` reads the cards `describe-latents` writes: both key sets
        parts = [_load_named("commands", "describe"), _load_named("commands", "explain")]
    else:
        raise ConfigError(f"unknown config kind {kind!r}")
    if model is not None:
        parts.append(_load_named("models", model))
    try:
        cfg = OmegaConf.merge(_schema(), base, *parts)
    except (ConfigAttributeError, ConfigKeyError) as e:
        raise ConfigError(f"unknown config key {e.full_key!r} in the YAML; {_valid_keys(_schema(), e.full_key)}") \
            from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value for {e.full_key!r} in the YAML ({_first_line(e)})") from e
    cfg = apply_overrides(cfg, ov)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config could not be resolved: {e}") from e
    e = embed_config(cfg)  # value checks (ranges, choices, the device) before any model work
    baseline_config(cfg)
    if e.device is not None:
        try:
            resolve_device(e.device)
        except SaefeatError as err:
            raise ConfigError(f"embed.device: {err}") from err
    return cfg


def _schema() -> DictConfig:
    return OmegaConf.create({"embed": OmegaConf.structured(EmbedConfig),
                             "baselines": OmegaConf.structured(BaselineConfig)})


def embed_config(cfg: DictConfig, **changes: object) -> EmbedConfig:
    """The run's EmbedConfig (the `embed:` section), with `changes` applied: the one route from a config to
    every embedder."""
    try:
        return EmbedConfig(**OmegaConf.to_container(cfg.embed, resolve=True)).replace(**changes)
    except SaefeatError as e:
        raise ConfigError(str(e)) from e


def baseline_config(cfg: DictConfig) -> BaselineConfig:
    """The run's BaselineConfig (the `baselines:` section)."""
    try:
        return BaselineConfig(**OmegaConf.to_container(cfg.baselines, resolve=True))
    except SaefeatError as e:
        raise ConfigError(str(e)) from e


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
