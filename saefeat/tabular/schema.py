"""Column types of a table: inferred, overridable, and validated before any expensive work."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from saefeat.data import DataError
from saefeat.errors import SaefeatError

NUMERICAL, CATEGORICAL = "numerical", "categorical"
MISSING_POLICIES = ("keep", "drop", "error")


@dataclass
class TableSchema:
    """Types of the columns of a table with a binary target.

    `types` maps every column (target included) to "numerical" or "categorical"; `integers` lists the numerical
    columns whose values are all whole numbers; `classes` are the target's two values, minority first.
    """

    types: dict[str, str]
    target: str
    integers: set[str] = field(default_factory=set)
    classes: tuple[str, str] = ("", "")

    @property
    def columns(self) -> list[str]:
        return list(self.types)

    @property
    def features(self) -> list[str]:
        return [c for c in self.types if c != self.target]

    @property
    def numerical(self) -> list[str]:
        return [c for c, t in self.types.items() if t == NUMERICAL]

    @property
    def categorical(self) -> list[str]:
        return [c for c, t in self.types.items() if t == CATEGORICAL]

    @property
    def minority(self) -> str:
        return self.classes[0]

    def with_column(self, name: str, kind: str = CATEGORICAL) -> TableSchema:
        """A copy with one more column (e.g. a concept column)."""
        if name in self.types:
            raise SaefeatError(f"column {name!r} is already in the table")
        return TableSchema(self.types | {name: kind}, self.target, set(self.integers), self.classes)

    def sdv_metadata(self):
        """The table's SDV `Metadata` (single table named "table")."""
        from sdv.metadata import Metadata

        cols = {c: {"sdtype": t} for c, t in self.types.items()}
        return Metadata.load_from_dict({"METADATA_SPEC_VERSION": "V1", "tables": {"table": {"columns": cols}}})


def _is_number(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    try:
        float(str(value))
        return True
    except ValueError:
        return False


def _check_names(names: Sequence[str], have: Sequence[str], what: str, source: str) -> None:
    unknown = [c for c in names if c not in have]
    if unknown:
        raise DataError(f"{source}: unknown column(s) {unknown} in {what}; the table has {list(have)}")


def prepare_table(df: pd.DataFrame, target: str, columns: Sequence[str] | None = None,
                  categorical: Sequence[str] = (), numerical: Sequence[str] = (),
                  na_values: Sequence[str] = ("?",), missing: str = "keep",
                  source: str = "table") -> tuple[pd.DataFrame, TableSchema]:
    """Validate a table and infer its column types.

    Args:
        df: the raw table (as read by `saefeat.data.read_table`).
        target: the binary label column.
        columns: columns to keep (None: all); the target is always kept.
        categorical, numerical: columns whose type is set rather than inferred.
        na_values: cell values read as missing (Adult writes `?`).
        missing: "keep" (missing cells stay missing; the synthesizer models them), "drop" (rows with a missing
            cell are dropped) or "error".
        source: name used in error messages (the file path).

    Returns the cleaned table (numerical columns as float, categorical as str with NaN for missing; the original
    row index is kept) and its schema. Raises a DataError naming the column for: unknown columns, a column set to
    two types, a target with fewer or more than two classes, a column mixing numbers and text, or missing values
    under missing="error".
    """
    if missing not in MISSING_POLICIES:
        raise DataError(f"missing={missing!r}; valid: {', '.join(MISSING_POLICIES)}")
    _check_names([target], df.columns, "data.target", source)
    keep = list(df.columns) if columns is None else list(dict.fromkeys([*columns, target]))
    _check_names(keep, df.columns, "data.columns", source)
    _check_names(list(categorical), keep, "data.categorical", source)
    _check_names(list(numerical), keep, "data.numerical", source)
    both = sorted(set(categorical) & set(numerical))
    if both:
        raise DataError(f"{source}: column(s) {both} are listed in both data.categorical and data.numerical")
    if target in numerical:
        raise DataError(f"{source}: the target column {target!r} must be categorical (a class label)")
    if len(df) == 0:
        raise DataError(f"{source}: the table has no rows")

    out = df[keep].copy()
    markers = {str(v) for v in na_values}
    for c in keep:
        col = out[c]
        if col.dtype == object or pd.api.types.is_string_dtype(col):
            stripped = col.map(lambda v: v.strip() if isinstance(v, str) else v)
            out[c] = stripped.mask(stripped.map(lambda v: isinstance(v, str) and (v in markers or v == "")))

    na = out.isna().sum()
    with_na = {c: int(n) for c, n in na.items() if n}
    if with_na and missing == "error":
        raise DataError(f"{source}: missing values in column(s) "
                        + ", ".join(f"{c!r} ({n} rows)" for c, n in with_na.items())
                        + "; set data.missing=keep or data.missing=drop")
    if target in with_na:
        raise DataError(f"{source}: the target column {target!r} has {with_na[target]} missing values")
    if with_na and missing == "drop":
        out = out.dropna()
        if len(out) == 0:
            raise DataError(f"{source}: every row has a missing value (columns {list(with_na)}); "
                            "data.missing=drop leaves nothing")

    types: dict[str, str] = {}
    integers: set[str] = set()
    for c in keep:
        col = out[c]
        values = col.dropna()
        if c in categorical or c == target or col.dtype == bool:
            kind = CATEGORICAL
        elif pd.api.types.is_numeric_dtype(col):
            kind = NUMERICAL
        else:
            is_num = values.map(_is_number)
            if c in numerical and not is_num.all():
                i = is_num.to_numpy().argmin()
                raise DataError(f"{source}: column {c!r} is set numerical but holds text, e.g. "
                                f"{values.iloc[i]!r} in row {values.index[i]}")
            if is_num.any() and not is_num.all():
                i = is_num.to_numpy().argmin()
                j = is_num.to_numpy().argmax()
                raise DataError(
                    f"{source}: column {c!r} mixes numbers and text ({int(is_num.sum())} numbers, "
                    f"{int((~is_num).sum())} text values, e.g. {values.iloc[j]!r} in row {values.index[j]} and "
                    f"{values.iloc[i]!r} in row {values.index[i]}); add the marker of a missing value to "
                    f"data.na_values, or set data.categorical=[{c}]")
            kind = NUMERICAL if is_num.all() and len(values) else CATEGORICAL
        if kind == NUMERICAL:
            out[c] = pd.to_numeric(col, errors="raise").astype(float)
            vals = out[c].dropna().to_numpy()
            if len(vals) and np.all(np.isfinite(vals)) and np.all(vals == np.round(vals)):
                integers.add(c)
        else:
            out[c] = col.map(lambda v: v if pd.isna(v) else str(v)).astype(object)
        types[c] = kind

    counts = out[target].value_counts()
    if len(counts) != 2:
        raise DataError(f"{source}: target column {target!r} has {len(counts)} class(es) "
                        f"({', '.join(map(repr, counts.index[:5]))}); this task needs exactly two")
    classes = (str(counts.index[1]), str(counts.index[0]))  # value_counts sorts descending: minority last
    return out, TableSchema(types, target, integers, classes)
