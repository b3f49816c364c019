"""Synthesizers compared on the shared UCI Adult table, every one fitted on all training rows.

    python benchmarks/tabular_synth_bench.py [--methods gaussian_copula,tvae,ctgan,arf] [--epochs 100]

The split is the tabular task's (`data.holdout=0.2`, seed 0): 26,048 training rows, 6,513 held-out rows that no
synthesizer sees. Each synthesizer samples as many rows as it was fitted on. Utility is train-on-synthetic /
test-on-real (TSTR) against train-on-real (TRTR) with the same held-out rows and the same classifier: LightGBM with
the task's fixed settings and, when it is installed, CatBoost with fixed settings (the classifier the published
tab-ddpm evaluation uses). Fidelity is sdmetrics' quality report against held-out rows; privacy is the DCR ratio
(median distance to the closest training row, synthetic over held-out; >= 0.8 is the task's publishing floor) and
sdmetrics' DCR overfitting protection. `arf` is the adversarial random forest of arfpy (Watson et al. 2023), an
LLM-free modern synthesizer; it has no conditional sampling, so the task cannot condition it on concepts.
Concept conditioning is measured by the task itself (`saefeat run task=tabular synth.method=...`).
Prints the CPU and one row per synthesizer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def fit_sample(method: str, train: pd.DataFrame, schema, epochs: int, seed: int) -> pd.DataFrame:
    """Fit `method` on `train` and sample as many rows."""
    if method == "arf":
        from arfpy import arf

        if not hasattr(np, "in1d"):  # arfpy 0.1.1 calls np.in1d, which numpy 2.4 removed (np.isin replaces it)
            np.in1d = np.isin
        np.random.seed(seed)
        x = train[schema.columns].copy()
        for c in schema.categorical:  # arfpy has no missing values: a category of their own, mapped back
            x[c] = x[c].astype(object).where(x[c].notna(), "<missing>").astype(str)
        model = arf.arf(x=x, verbose=False)
        model.forde()
        out = model.forge(n=len(train))[schema.columns]
        for c in schema.categorical:
            out[c] = out[c].astype(str).replace("<missing>", np.nan)
        for c in schema.numerical:
            out[c] = out[c].astype(float)
        out.index = pd.Index([f"synthetic-{i}" for i in range(len(out))])
        return out
    from saefeat.tabular.synth import ConditionalSynthesizer

    return ConditionalSynthesizer(schema, method, epochs, seed).fit(train).sample(len(train))


def catboost_auc(train: pd.DataFrame, holdout: pd.DataFrame, schema, seed: int) -> float:
    from catboost import CatBoostClassifier
    from sklearn.metrics import roc_auc_score

    cats = [c for c in schema.features if c in schema.categorical]

    def frame(df: pd.DataFrame) -> pd.DataFrame:
        out = df[schema.features].copy()
        for c in cats:
            out[c] = out[c].astype(object).where(out[c].notna(), "<missing>").astype(str)
        return out

    y = (train[schema.target].astype(str) == schema.minority).astype(int)
    clf = CatBoostClassifier(iterations=500, learning_rate=0.1, depth=6, random_seed=seed, verbose=0,
                             thread_count=-1, allow_writing_files=False).fit(frame(train), y, cat_features=cats)
    truth = (holdout[schema.target].astype(str) == schema.minority).astype(int)
    return float(roc_auc_score(truth, clf.predict_proba(frame(holdout))[:, 1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="gaussian_copula,tvae,ctgan,arf")
    ap.add_argument("--epochs", type=int, default=100, help="TVAE and CTGAN epochs (the task's default)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from saefeat.data import read_table
    from saefeat.provenance import cpu_description
    from saefeat.tabular.evaluate import fidelity, privacy, split_holdout, utility
    from saefeat.tabular.schema import prepare_table

    try:
        import catboost  # noqa: F401
        has_catboost = True
    except ImportError:
        has_catboost = False
    path = Path(args.data_dir) / "tabular" / "adult_train.csv"
    table, schema = prepare_table(read_table(path), "income", source=str(path))
    train_idx, hold_idx = split_holdout(table, schema.target, 0.2, args.seed)
    train, holdout = table.loc[train_idx], table.loc[hold_idx]
    print(f"CPU: {cpu_description()}; {len(train):,} training rows, {len(holdout):,} held-out rows of {path.name}; "
          f"TVAE/CTGAN {args.epochs} epochs", flush=True)
    ref = {"trtr_lgbm": utility(train, train, holdout, schema, args.seed, n_boot=200)["trtr"]["roc_auc"]}
    if has_catboost:
        ref["trtr_catboost"] = catboost_auc(train, holdout, schema, args.seed)
    print(f"TRTR ROC-AUC: LightGBM {ref['trtr_lgbm']:.4f}" +
          (f", CatBoost {ref['trtr_catboost']:.4f}" if has_catboost else " (CatBoost not installed)"), flush=True)
    header = (f"{'synthesizer':16s} {'fit s':>7s} {'TSTR lgbm':>10s} {'gap':>7s} "
              + (f"{'TSTR cat':>9s} {'gap':>7s} " if has_catboost else "")
              + f"{'fidelity':>8s} {'DCR ratio':>9s} {'sdm overfit':>11s} {'copies':>7s}")
    print(header, flush=True)
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        synthetic = fit_sample(method, train, schema, args.epochs, args.seed)
        fit_s = time.perf_counter() - t0
        tstr = utility(train, synthetic, holdout, schema, args.seed, n_boot=200)["tstr"]["roc_auc"]
        fid, _ = fidelity(train, synthetic, holdout, schema, reference=False, seed=args.seed)
        priv = privacy(train, synthetic, holdout, schema)
        row = f"{method:16s} {fit_s:7.0f} {tstr:10.4f} {tstr - ref['trtr_lgbm']:+7.4f} "
        if has_catboost:
            cat = catboost_auc(synthetic, holdout, schema, args.seed)
            row += f"{cat:9.4f} {cat - ref['trtr_catboost']:+7.4f} "
        row += (f"{fid['fidelity_overall']:8.3f} {priv['dcr_ratio']:9.3f} "
                f"{priv['sdm_dcr_overfitting_protection']:11.3f} {priv['synthetic_exact_copies']:7.2%}")
        print(row, flush=True)


if __name__ == "__main__":
    main()
