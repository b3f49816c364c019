"""Where `StatsWorker` runs: in this process (`local`) or as a Ray Data actor pool (`ray`).

Both take the shards still to do and yield each finished shard's record as it lands; the worker itself writes
the shard, so the driver only keeps the manifest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from saefeat.engine.worker import StatsWorker
from saefeat.errors import SaefeatError


@dataclass(frozen=True)
class Shard:
    """Consecutive input rows embedded and written together."""

    index: int
    first_row: int
    ids: list[str]
    texts: list[str]


@dataclass(frozen=True)
class RayOptions:
    """How the Ray backend runs: `address` of an existing cluster (None starts Ray on this machine),
    `concurrency` actors, each with `num_cpus` CPUs (its torch threads) and `num_gpus` GPUs; `num_cpus_total`
    caps a Ray started here (None = all cores)."""

    address: str | None = None
    concurrency: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    num_cpus_total: int | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise SaefeatError(f"ray.concurrency must be >= 1, got {self.concurrency}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise SaefeatError(f"ray.num_cpus must be > 0 and ray.num_gpus >= 0, got {self.num_cpus}, "
                               f"{self.num_gpus}")


def run_local(shards: list[Shard], spec: dict[str, Any], folder: str) -> Iterator[dict[str, Any]]:
    """Embed the shards one after the other in this process."""
    if not shards:
        return
    worker = StatsWorker(spec, folder)
    for s in shards:
        yield worker.embed_shard(s.index, s.first_row, s.ids, s.texts)


def ray_available() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _start_ray(options: RayOptions) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from an offline machine
    logging.getLogger("ray").setLevel(logging.WARNING)  # its per-dataset INFO lines; the driver shows one bar
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # incl. "progress bars disabled": ours replaces them
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if options.address:
        ray.init(address=options.address, **kwargs)
    else:
        ray.init(num_cpus=options.num_cpus_total, **kwargs)


def run_ray(shards: list[Shard], spec: dict[str, Any], folder: str, options: RayOptions) -> Iterator[dict[str, Any]]:
    """Embed the shards on a Ray Data actor pool: one row per shard, `map_batches` with `StatsWorker` as a
    callable class (`concurrency` actors that each load the model once); records stream back as shards finish.
    Actors that die are restarted and their shard is retried."""
    if not shards:
        return
    if not ray_available():
        raise SaefeatError("backend=ray needs Ray Data: pip install 'saefeat[ray]' (or 'ray[data]')")
    import ray
    import ray.data

    _start_ray(options)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one bar of documents and tokens
    ctx.execution_options.preserve_order = False  # records carry their shard; any order lands the same files
    items = [{"shard": s.index, "first_row": s.first_row, "ids": s.ids, "texts": s.texts} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    out = ds.map_batches(
        StatsWorker, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.concurrency),
        fn_constructor_kwargs={"spec": spec, "folder": folder, "threads": max(1, int(options.num_cpus))},
        num_cpus=options.num_cpus, num_gpus=options.num_gpus, max_restarts=-1, max_task_retries=-1)
    for row in out.iter_rows():
        yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
