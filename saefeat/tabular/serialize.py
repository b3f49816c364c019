"""Rows as text, as in GReaT ("age is 39, workclass is State-gov, ..."), and text back to rows."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from saefeat.errors import SaefeatError

if TYPE_CHECKING:
    from saefeat.tabular.schema import TableSchema


class RowSerializer:
    """Turn table rows into sentences and parse sentences back into rows.

    Each present cell becomes `"<name> is <value>"`, joined with `", "` in column order; a missing cell is left
    out. `inverse_transform` recovers every column it finds by name, so `inverse_transform(transform(df))`
    equals `df` on the serialised columns (numbers as float, other values as str, missing as NaN).

    Args:
        columns: the columns to write, in order.
        numerical: the columns parsed back as numbers.
        integers: numerical columns written without a decimal point.
        pretty_names: write `marital status` for `marital_status`.
    """

    sep, verb = ", ", " is "

    def __init__(self, columns: Sequence[str], numerical: Sequence[str] = (), integers: Sequence[str] = (),
                 pretty_names: bool = True):
        self.columns = list(columns)
        if not self.columns:
            raise SaefeatError("RowSerializer needs at least one column")
        unknown = [c for c in [*numerical, *integers] if c not in self.columns]
        if unknown:
            raise SaefeatError(f"numerical/integer column(s) {unknown} are not among the serialised columns")
        self.numerical, self.integers, self.pretty_names = set(numerical), set(integers), pretty_names
        self.names = {c: self._name(c) for c in self.columns}
        by_name: dict[str, str] = {}
        for c, n in self.names.items():
            if not n:
                raise SaefeatError(f"column {c!r} has an empty name once written")
            if n in by_name:
                raise SaefeatError(f"columns {by_name[n]!r} and {c!r} are both written as {n!r}")
            by_name[n] = c
        self._by_name = by_name
        alternatives = "|".join(re.escape(n) for n in sorted(by_name, key=len, reverse=True))
        self._pattern = re.compile(f"(?:^|(?<={re.escape(self.sep)}))({alternatives}){re.escape(self.verb)}")

    @classmethod
    def for_schema(cls, schema: TableSchema, include_target: bool = False, pretty_names: bool = True) -> RowSerializer:
        """A serializer of the schema's feature columns (and the target, with `include_target`), typed by it."""
        cols = schema.columns if include_target else schema.features
        return cls(cols, [c for c in schema.numerical if c in cols], [c for c in schema.integers if c in cols],
                   pretty_names)

    def _name(self, column: str) -> str:
        return " ".join(str(column).replace("_", " ").split()) if self.pretty_names else str(column)

    def _value(self, column: str, v: object) -> str:
        if column in self.numerical:
            x = float(v)
            if column in self.integers and x.is_integer():
                return str(int(x))
            return repr(x)
        return str(v)

    def transform(self, df: pd.DataFrame) -> list[str]:
        """One sentence per row."""
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise SaefeatError(f"the table lacks serialised column(s) {missing}")
        texts = []
        for row in df[self.columns].itertuples(index=False, name=None):
            parts = [f"{self.names[c]}{self.verb}{self._value(c, v)}"
                     for c, v in zip(self.columns, row) if not _is_missing(v)]
            texts.append(self.sep.join(parts))
        return texts

    def inverse_transform(self, texts: Sequence[str], errors: str = "raise") -> pd.DataFrame:
        """Rows parsed from sentences; a column whose name is absent is NaN.

        Names are read in column order, so a value that happens to contain another column's name does not split.
        A numerical value that is not a number raises a ValueError naming the row and column, or becomes NaN
        with errors="coerce".
        """
        if errors not in ("raise", "coerce"):
            raise SaefeatError(f"errors={errors!r}; valid: raise, coerce")
        order = {c: i for i, c in enumerate(self.columns)}
        rows = []
        for r, text in enumerate(texts):
            hits, last = [], -1
            for m in self._pattern.finditer(text):
                col = self._by_name[m.group(1)]
                if order[col] > last:
                    hits.append((col, m.start(), m.end()))
                    last = order[col]
            row: dict[str, object] = {}
            for i, (col, _, end) in enumerate(hits):
                stop = hits[i + 1][1] - len(self.sep) if i + 1 < len(hits) else len(text)
                row[col] = self._parse(text[end:stop], col, r, errors)
            rows.append(row)
        out = pd.DataFrame(rows, columns=self.columns, index=range(len(rows)))
        for c in self.columns:
            out[c] = out[c].astype(float) if c in self.numerical else out[c].astype(object)
        return out

    def _parse(self, value: str, column: str, row: int, errors: str) -> object:
        if column not in self.numerical:
            return value
        try:
            return float(value)
        except ValueError:
            if errors == "coerce":
                return np.nan
            raise SaefeatError(f"row {row}, column {column!r}: {value!r} is not a number") from None


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA
