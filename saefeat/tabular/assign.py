"""Concept columns for the training rows that were not encoded: a classifier of each concept column, trained on
the encoded rows' table columns, and how often it agrees with encoding on encoded rows it never saw.

Encoding every row of a large table costs an SAE pass per row; the synthesizer needs the concept columns of every
training row it fits on. A LightGBM classifier per concept column (table columns in, concept value out) fills
them in, and its agreement with the encoded concepts on a held-out share of the encoded rows says how far to
trust the filled-in columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from saefeat.errors import SaefeatError
from saefeat.tabular.evaluate import CLASSIFIER_DEFAULTS, TableFeaturizer
from saefeat.tabular.schema import TableSchema


def _fit(X: pd.DataFrame, y: np.ndarray, seed: int, n_jobs: int):
    from lightgbm import LGBMClassifier

    return LGBMClassifier(**CLASSIFIER_DEFAULTS, random_state=seed, n_jobs=n_jobs, verbose=-1).fit(X, y)


def assign_concepts(encoded: pd.DataFrame, rest: pd.DataFrame, schema: TableSchema, columns: Sequence[str],
                    seed: int = 0, check_share: float = 0.2, n_jobs: int = -1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`rest` with the concept `columns` of `encoded` predicted from the table columns, and one agreement row
    per column: `agreement` (share of held-out encoded rows whose predicted value is the encoded one), `majority`
    (the share of its most common value, what a constant guess agrees), and the row counts.

    The classifier checked on the held-out share is then refitted on every encoded row to fill `rest`.
    """
    if not 0 < check_share < 1:
        raise SaefeatError(f"encode.check_share must be in (0, 1), got {check_share}")
    feat = TableFeaturizer(schema).fit(encoded)
    X_enc, X_rest = feat.transform(encoded), feat.transform(rest)
    rng = np.random.default_rng(seed)
    held = np.zeros(len(encoded), bool)
    held[rng.choice(len(encoded), max(1, int(round(check_share * len(encoded)))), replace=False)] = True
    out, rows = rest.copy(), []
    for col in columns:
        y = encoded[col].astype(str).to_numpy()
        values = np.unique(y)
        if len(values) == 1:  # nothing to learn: every encoded row has the same value
            out[col] = values[0]
            rows.append({"column": col, "agreement": 1.0, "majority": 1.0, "n_fit": int((~held).sum()),
                         "n_checked": int(held.sum()), "n_assigned": len(rest)})
            continue
        check = _fit(X_enc[~held], y[~held], seed, n_jobs)
        agree = float(np.mean(check.predict(X_enc[held]) == y[held]))
        majority = float(pd.Series(y[held]).value_counts(normalize=True).iloc[0])
        out[col] = _fit(X_enc, y, seed, n_jobs).predict(X_rest) if len(rest) else []
        rows.append({"column": col, "agreement": agree, "majority": majority, "n_fit": int((~held).sum()),
                     "n_checked": int(held.sum()), "n_assigned": len(rest)})
    return out, pd.DataFrame(rows)
