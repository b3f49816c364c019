"""The SAE probing suite on one SAE, once per pooling, each beside the dense and sentence baselines.

    python benchmarks/sae_probe_bench.py [--quick] [--poolings max,log1p_topk] [sae=PATH] [model=minilm] [key=value ...]

Each pooling is one `saefeat probe-sae` run (`saefeat.commands.probe`): an MLflow parent run with a child per probe
(core SAE metrics, toxicity filter, CAD sentiment, SciFact train queries, property retrieval, earnings CV), its
table printed with the wall time. The statistics every pooling reads are cached on disk (`$SAEFEAT_CACHE`), so the
second pooling, and any later run, skips encoding. At the end, the SAE column of every pooling side by side.
"""

from __future__ import annotations

import argparse
import os
import time

import pandas as pd  # noqa: E402
from _offline import DATA  # noqa: E402  (sets the offline environment first)
from rich.console import Console  # noqa: E402

console = Console(width=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the suite's tiny sizes (quick=true)")
    parser.add_argument("--poolings", default="max,log1p_topk", help="embed.pooling of each run, comma-separated")
    parser.add_argument("overrides", nargs="*", help="config overrides of probe-sae (key=value)")
    args = parser.parse_args()

    from saefeat.commands.probe import probe_config, probe_sae
    from saefeat.provenance import cpu_description

    console.print(f"CPU: {cpu_description()}, {os.cpu_count()} cores; torch threads {_threads()}")
    tables, times = {}, {}
    for pooling in args.poolings.split(","):
        overrides = [f"data_dir={DATA}", f"embed.pooling={pooling}", *(["quick=true"] if args.quick else []),
                     *args.overrides]
        console.print(f"[bold]saefeat probe-sae {' '.join(overrides)}")
        t0 = time.perf_counter()
        tables[pooling] = probe_sae(probe_config(overrides))
        times[pooling] = time.perf_counter() - t0
    if len(tables) > 1:
        sae = pd.DataFrame({p: t["sae"] for p, t in tables.items()})
        for base in ("dense", "dense_last"):
            sae[f"{base} (baseline)"] = next(iter(tables.values()))[base]
        console.print(sae.round(3).to_string(na_rep=""))
    console.print("wall time: " + ", ".join(f"{p} {t / 60:.1f} min" for p, t in times.items()))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
