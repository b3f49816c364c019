"""The shortcut task's target on CAD sentiment: DBR's out-of-domain gain over ERM and its in-domain cost.

    python benchmarks/shortcut_bench.py [key=value ...]      # any `saefeat run task=shortcut` override

Runs the task (one MLflow parent run, a child per method x representation), then prints, per
representation and DBR variant, the change in counterfactual (OOD) and original-dev (in-domain) accuracy
against ERM, and whether the issue's target holds: OOD +3 points or more at an in-domain cost of 1 point
or less. Everything is chosen on in-domain data only; the OOD set is only read for this report.
"""

from __future__ import annotations

import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str]) -> None:
    from saefeat.config import load_config
    from saefeat.tasks.shortcut import run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config("tasks", ["task=shortcut", *argv])
    t0 = time.time()
    results = run(cfg)
    wall = time.time() - t0
    print(f"\nshortcut benchmark ({cfg.benchmark}, mode={cfg.mode}, masking={cfg.masking}), wall {wall:.0f} s")
    print(f"{'child run':<16}{'in-domain':>10}{'OOD':>8}{'gap':>8}{'λ':>7}{'ΔOOD':>8}{'Δin':>8}  target")
    for rep in cfg.representations:
        base = results[f"erm/{rep}"]
        for method in cfg.methods:
            r = results[f"{method}/{rep}"]
            d_ood = 100 * (r["ood_accuracy"] - base["ood_accuracy"])
            d_in = 100 * (r["in_domain_accuracy"] - base["in_domain_accuracy"])
            met = "" if method == "erm" else ("met" if d_ood >= 3 and d_in >= -1 else "not met")
            print(f"{method + '/' + rep:<16}{100 * r['in_domain_accuracy']:>10.1f}{100 * r['ood_accuracy']:>8.1f}"
                  f"{100 * r['gap']:>8.1f}{r['lambda']:>7.2g}{d_ood:>8.1f}{d_in:>8.1f}  {met}")


if __name__ == "__main__":
    main(sys.argv[1:])
