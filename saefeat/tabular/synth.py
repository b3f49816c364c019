"""Synthesizers with conditional sampling on concept columns: SDV's Gaussian copula, TVAE and CTGAN, and the
adversarial random forest of arfpy (ARF, Watson et al., AISTATS 2023).

SDV samples a condition with its Condition API; ARF has none, so its condition rows are drawn by rejection (rows
forged in batches, those matching the condition kept). SDV is distributed under the Business Source License 1.1
(free to use, but not to offer a commercial synthetic-data service); see
https://github.com/sdv-dev/SDV/blob/main/LICENSE. arfpy is MIT.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd

from saefeat.errors import SaefeatError
from saefeat.tabular.concepts import Concept
from saefeat.tabular.schema import TableSchema

logger = logging.getLogger(__name__)

METHODS = ("arf", "gaussian_copula", "tvae", "ctgan")
MISSING = "<missing>"  # ARF has no missing values: a missing category is a category of its own while it learns


def _arfpy():
    """arfpy's `arf` module; 0.1.1 calls np.in1d, which numpy 2.4 removed (np.isin is the same for its 1-D use)."""
    if not hasattr(np, "in1d"):
        np.in1d = np.isin
    from arfpy import arf

    return arf


def _table(out: pd.DataFrame | dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The sampled frame (SDV 2 returns {table name: frame})."""
    return next(iter(out.values())) if isinstance(out, dict) else out


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ConditionalSynthesizer:
    """An SDV single-table synthesizer that samples rows for a given condition ("500 rows of concept c").

    Args:
        schema: the column types of the training table (concept columns included, as categorical).
        method: "arf" (adversarial random forest), "gaussian_copula", "tvae" or "ctgan".
        epochs: TVAE / CTGAN training epochs (ARF runs its adversarial rounds to convergence).
        seed: random seed for fitting.
        **kwargs: passed to the SDV synthesizer.

    After `fit`, `train_index_` holds the index of the rows it was trained on, so evaluation can check that
    the rows it is scored against are not among them.
    """

    def __init__(self, schema: TableSchema, method: str = "gaussian_copula", epochs: int = 300, seed: int = 0,
                 **kwargs):
        if method not in METHODS:
            raise SaefeatError(f"synth.method={method!r}; valid: {', '.join(METHODS)}")
        self.schema, self.method, self.epochs, self.seed, self.kwargs = schema, method, epochs, seed, kwargs

    def _build(self):
        if self.method == "arf":
            return None  # built by `_fit_arf` from the data (arfpy takes the table in its constructor)
        from sdv.single_table import CTGANSynthesizer, GaussianCopulaSynthesizer, TVAESynthesizer

        for name in ("sdv", "rdt", "copulas", "SingleTableSynthesizer", "MultiTableSynthesizer", "Metadata",
                     "SingleTableMetadata"):
            logging.getLogger(name).setLevel(logging.WARNING)  # SDV logs each fit and sample as INFO event dicts

        metadata = self.schema.sdv_metadata()
        if self.method == "ctgan":
            return CTGANSynthesizer(metadata, epochs=self.epochs, verbose=False, **self.kwargs)
        if self.method == "tvae":
            return TVAESynthesizer(metadata, epochs=self.epochs, verbose=False, **self.kwargs)
        return GaussianCopulaSynthesizer(metadata, **self.kwargs)

    def fit(self, df: pd.DataFrame) -> ConditionalSynthesizer:
        """Fit on `df`, whose columns must be exactly the schema's."""
        if sorted(df.columns) != sorted(self.schema.columns):
            extra = sorted(set(df.columns) - set(self.schema.columns))
            lacking = sorted(set(self.schema.columns) - set(df.columns))
            raise SaefeatError(f"the training table does not match the schema: extra columns {extra}, "
                             f"missing columns {lacking}")
        _seed_everything(self.seed)
        if self.method == "arf":
            self.model_ = self._fit_arf(df[self.schema.columns])
        else:
            self.model_ = self._build()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SDV warns about its own defaults on every fit
                self.model_.fit({"table": df[self.schema.columns]})  # SDV 2 takes {table name: frame}
        self.train_index_ = df.index.copy()
        self.categories_ = {c: set(df[c].dropna().astype(str)) for c in self.schema.categorical}
        return self

    def _fit_arf(self, df: pd.DataFrame):
        x = df.copy()
        for c in self.schema.categorical:
            x[c] = x[c].astype(object).where(x[c].notna(), MISSING).astype(str)
        for c in self.schema.numerical:
            x[c] = x[c].astype(float)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _arfpy().arf(x=x, verbose=False, random_state=self.seed, n_jobs=-1, **self.kwargs)
            model.forde()
        return model

    def _forge(self, n: int) -> pd.DataFrame:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = self.model_.forge(n=int(n))
        for c in self.schema.categorical:
            rows[c] = rows[c].astype(str).where(rows[c].astype(str) != MISSING, np.nan)
        return rows

    def sample(self, n: int) -> pd.DataFrame:
        """n unconditional rows."""
        if self.method == "arf":
            return self._clean(self._forge(n))
        return self._clean(_table(self.model_.sample(num_rows=int(n))))

    def _sample_arf_conditions(self, values: Mapping[str, str], n: int, max_tries: int) -> pd.DataFrame:
        """Rejection sampling: forge batches, keep the rows whose columns equal `values`."""
        for col in values:
            if col not in self.categories_:
                raise SaefeatError(f"condition on {col!r}: ARF conditions on categorical columns only")
        kept, batch = [], max(4 * n, 1000)
        for _ in range(max_tries):
            rows = self._forge(batch)
            match = np.logical_and.reduce([rows[c].astype(str).to_numpy() == str(v) for c, v in values.items()])
            kept.append(rows[match])
            if sum(len(k) for k in kept) >= n:
                break
        out = pd.concat(kept)
        return out.iloc[:n]

    def sample_conditions(self, values: Mapping[str, str], n: int, max_tries_per_batch: int = 100) -> pd.DataFrame:
        """n rows whose columns equal `values` (SDV's Condition API; other columns are sampled).

        Raises a ValueError for an unknown column or a value never seen in training, and when SDV cannot
        produce any matching row.
        """
        from sdv.sampling import Condition

        for col, v in values.items():
            if col not in self.schema.types:
                raise SaefeatError(f"condition on unknown column {col!r}; columns: {self.schema.columns}")
            if col in self.categories_ and str(v) not in self.categories_[col]:
                raise SaefeatError(f"condition {col}={v!r}: value never seen in training; "
                                 f"seen: {sorted(self.categories_[col])[:20]}")
        if self.method == "arf":
            rows = self._sample_arf_conditions(values, int(n), max_tries_per_batch)
            if len(rows) == 0:
                raise SaefeatError(f"condition {dict(values)}: the arf synthesizer forged no matching row in "
                                   f"{max_tries_per_batch} batches")
            if len(rows) < n:
                logger.warning("condition %s: ARF forged %d of %d rows", dict(values), len(rows), n)
            return self._clean(rows)
        cond = Condition(num_rows=int(n), column_values=dict(values))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                rows = _table(self.model_.sample_from_conditions([cond], max_tries_per_batch=max_tries_per_batch))
            except ValueError as e:  # SDV: "Unable to sample any rows for the given conditions"
                raise SaefeatError(f"condition {dict(values)}: the {self.method} synthesizer produced no matching "
                                   f"row in {max_tries_per_batch} batches; the value is rare in what it learned "
                                   "(more synth.epochs, or fewer concepts, help)") from e
        if len(rows) < n:
            logger.warning("condition %s: SDV returned %d of %d rows", dict(values), len(rows), n)
        if len(rows) == 0:
            raise SaefeatError(f"condition {dict(values)}: the synthesizer produced no matching row")
        return self._clean(rows)

    def sample_concept(self, concept: Concept, n: int, **conditions: str) -> pd.DataFrame:
        """n rows of a concept, optionally with further column conditions."""
        return self.sample_conditions({concept.column: concept.value, **conditions}, n)

    def _clean(self, rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows[self.schema.columns].reset_index(drop=True)
        start = getattr(self, "_n_sampled", 0)
        self._n_sampled = start + len(rows)
        rows.index = pd.Index([f"synthetic-{start + i}" for i in range(len(rows))])  # never a real row's label
        for c in self.schema.categorical:
            rows[c] = rows[c].map(lambda v: v if pd.isna(v) else str(v)).astype(object)
        for c in self.schema.numerical:
            rows[c] = rows[c].astype(float)
        return rows
