"""The SAE probing suite on one SAE, once per pooling, each beside the dense and sentence baselines.

    python benchmarks/sae_probe_bench.py [--quick] [--poolings max,log1p_topk] [--random-control] [sae=PATH]
                                         [model=minilm] [key=value ...]

Each pooling is one `saefeat probe-sae` run (`saefeat.commands.probe`): an MLflow parent run with a child per probe
(core SAE metrics, toxicity filter, CAD sentiment, SciFact train queries, property retrieval, earnings CV), its
table printed with the wall time. The statistics every pooling reads are cached on disk (`$SAEFEAT_CACHE`), so the
second pooling, and any later run, skips encoding. At the end, the SAE column of every pooling side by side.
`--random-control` also scores, per pooling, an untrained TopK SAE of the same shape, k and layer
(`saefeat.sae.model.random_like`): what the trained SAE adds over a wide sparse random code.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd  # noqa: E402
from _offline import DATA  # noqa: E402  (sets the offline environment first)
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402

console = Console(width=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the suite's tiny sizes (quick=true)")
    parser.add_argument("--poolings", default="max,log1p_topk", help="embed.pooling of each run, comma-separated")
    parser.add_argument("--random-control", action="store_true",
                        help="also score an untrained SAE of the same shape (the random-code control)")
    parser.add_argument("overrides", nargs="*", help="config overrides of probe-sae (key=value)")
    args = parser.parse_args()

    from saefeat.commands.probe import probe_config, probe_sae
    from saefeat.provenance import cpu_description

    console.print(f"CPU: {cpu_description()}, {os.cpu_count()} cores; torch threads {_threads()}", markup=False)
    base = [f"data_dir={DATA}", *(["quick=true"] if args.quick else []), *args.overrides]
    control = _random_control(probe_config(base)) if args.random_control else None
    tables, times = {}, {}
    for pooling in args.poolings.split(","):
        runs = {pooling: []} | ({f"{pooling}, random SAE": [f"sae={control}"]} if control else {})
        for name, extra in runs.items():
            overrides = [*base, f"embed.pooling={pooling}", *extra]
            console.print(f"[bold]saefeat probe-sae {escape(' '.join(overrides))}")
            t0 = time.perf_counter()
            tables[name] = probe_sae(probe_config(overrides))
            times[name] = time.perf_counter() - t0
    if len(tables) > 1:
        sae = pd.DataFrame({p: t["sae"] for p, t in tables.items()})
        first = next(iter(tables.values()))
        for side in ("dense", "dense_last", "sentence", "bm25"):
            if side in first:
                sae[f"{side} (baseline)"] = first[side]
        console.print(sae.round(3).to_string(na_rep=""))
    console.print("wall time: " + ", ".join(f"{p} {t / 60:.1f} min" for p, t in times.items()))


def _random_control(cfg) -> str:
    """The tested SAE's untrained twin, saved (fp16, like the shipped SAEs) in a folder of the system's temp
    directory; seeded, so its content hash, and with it the embedding cache, is the same on every run."""
    import tempfile

    from saefeat.embed.config import EmbedConfig
    from saefeat.sae import save_sae
    from saefeat.sae.formats import resolve_sae
    from saefeat.sae.model import random_like

    e: EmbedConfig = cfg.embed
    sae = resolve_sae(e.sae, str(e.model))
    path = os.path.join(tempfile.gettempdir(), f"saefeat-random-control-{sae.content_hash[:12]}")
    save_sae(random_like(sae, seed=0), path, half=True)
    return path


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
