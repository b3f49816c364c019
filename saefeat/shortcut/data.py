"""Shortcut benchmarks: labelled texts (single or sentence pairs), counterfactual pairs, and their checks.

Every loader validates before any model work starts: missing columns, empty texts, missing labels and
labels outside a benchmark's label set raise a `DataError` naming the file, the row and the field. Rows are
numbered from 0 over the data rows (the header is not a row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from saefeat.data import DataError, check_texts, read_table
from saefeat.errors import MissingFileError, SaefeatError

PAIR_SEPARATOR = " [SEP] "  # premise and hypothesis are embedded as one text; [SEP] is a content token here


class DatasetUnavailable(MissingFileError):
    """A benchmark file that is not on this machine (MNLI, HANS, QQP, PAWS, FEVER train); says where to put it."""


@dataclass
class TextDataset:
    """Labelled texts from one file: `texts[i]` has `labels[i]` and came from data row `rows[i]` of `source`."""

    texts: list[str]
    labels: list[str]
    source: str
    rows: list[int]
    name: str = ""
    groups: list[str] | None = None  # pair ids (batch_id) where the file pairs rows

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_set(self) -> list[str]:
        return sorted(set(self.labels))

    def y(self, classes: Sequence[str]) -> np.ndarray:
        """Labels as indices into `classes`."""
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[label] for label in self.labels], dtype=np.int64)

    def subset(self, idx: Sequence[int] | np.ndarray) -> TextDataset:
        idx = [int(i) for i in idx]
        return TextDataset([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.source,
                           [self.rows[i] for i in idx], self.name,
                           None if self.groups is None else [self.groups[i] for i in idx])

    def head(self, n: int | None, seed: int = 0) -> TextDataset:
        """A stratified random subset of at most n rows (all rows when n is None); for quick runs."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        labels = np.array(self.labels)
        picked: list[int] = []
        for c in self.label_set:
            idx = np.flatnonzero(labels == c)
            take = max(1, round(n * len(idx) / len(labels)))
            picked += rng.choice(idx, min(take, len(idx)), replace=False).tolist()
        return self.subset(sorted(picked))


@dataclass
class PairedDataset:
    """Original texts and their counterfactual edits, aligned: `counterfactual[i]` is the edit of `original[i]`."""

    original: TextDataset
    counterfactual: TextDataset
    pair_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.original)


def _rows_str(rows: Sequence[int]) -> str:
    rows = list(rows)
    return ", ".join(map(str, rows[:10])) + (f" ... ({len(rows)} rows)" if len(rows) > 10 else "")


def _unquote(text: str) -> str:
    """Undo CSV-style quoting inside a TSV field (CAD quotes reviews that contain quotes: "a ""b"" c")."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def read_labeled(path: str | Path, text_field: str | Sequence[str], label_field: str,
                 label_map: Mapping[str, str] | None = None, group_field: str | None = None,
                 drop_labels: Sequence[str] = (), name: str = "", separator: str = PAIR_SEPARATOR) -> TextDataset:
    """Read a labelled table (CSV/TSV/JSONL/Parquet); `text_field` may name two fields of a sentence pair.

    `label_map` renames labels (values not in it are kept); rows whose label is in `drop_labels` (e.g. SNLI's
    "-" for no gold label) are skipped. Empty texts and missing labels raise a DataError naming file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetUnavailable(f"{path}: file not found")
    fields = [text_field] if isinstance(text_field, str) else list(text_field)
    df = read_table(path, [*fields, label_field, *([group_field] if group_field else [])])
    labels = df[label_field].map(lambda v: None if v is None or (isinstance(v, float) and v != v) else str(v).strip())
    missing = np.flatnonzero(labels.isna() | (labels == "")).tolist()
    if missing:
        raise DataError(f"{path}, field {label_field!r}: label missing in row(s) {_rows_str(missing)}")
    keep = ~labels.isin(list(drop_labels))
    rows = np.flatnonzero(keep.to_numpy()).tolist()
    tsv = path.name.lower().removesuffix(".gz").endswith(".tsv")
    parts = [check_texts([_unquote(t) if tsv and isinstance(t, str) else t for t in df[f].tolist()],
                         source=str(path), field=f, allow_empty=False) for f in fields]
    texts = [separator.join(p[i] for p in parts) for i in rows]
    out_labels = [label_map.get(v, v) if label_map else v for v in labels.iloc[rows]]
    groups = [str(g) for g in df[group_field].iloc[rows]] if group_field else None
    return TextDataset(texts, out_labels, str(path), rows, name or path.stem, groups)


def check_label_set(data: TextDataset, allowed: Sequence[str], what: str = "the training labels") -> None:
    """Every label of `data` must be in `allowed`; the first offending rows are named."""
    allowed_set = set(allowed)
    bad = [(r, lab) for r, lab in zip(data.rows, data.labels) if lab not in allowed_set]
    if bad:
        shown = "; ".join(f"row {r}: {lab!r}" for r, lab in bad[:5])
        raise DataError(f"{data.source}: label(s) not in {what} {sorted(allowed_set)}: {shown}"
                        + (f" ... ({len(bad)} rows)" if len(bad) > 5 else ""))


def check_label_sets(train: TextDataset, *evals: TextDataset) -> list[str]:
    """The sorted label set of `train`; each evaluation set must hold exactly the same labels."""
    classes = train.label_set
    if len(classes) < 2:
        raise DataError(f"{train.source}: the training labels hold one class only ({classes})")
    for ev in evals:
        check_label_set(ev, classes, f"the training labels of {train.source}")
        absent = sorted(set(classes) - set(ev.labels))
        if absent:
            raise DataError(f"{ev.source}: label(s) {absent} of the training file {train.source} never occur "
                            f"here; the evaluation labels {ev.label_set} differ from the training labels")
    return classes


def pair_up(data: TextDataset) -> PairedDataset:
    """Split a file of (original, counterfactual) rows sharing a group id into aligned halves.

    Each group must hold exactly two rows with different labels; the first row of a group is the original.
    """
    if data.groups is None:
        raise DataError(f"{data.source}: pairing is required but the data has no pair-id column")
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(data.groups):
        by_group.setdefault(g, []).append(i)
    bad = [(g, idx) for g, idx in by_group.items() if len(idx) != 2]
    if bad:
        g, idx = bad[0]
        rows = [data.rows[i] for i in idx]
        raise DataError(f"{data.source}: pairing is required but pair id {g!r} has {len(idx)} row(s) "
                        f"(row(s) {_rows_str(rows)}); every id needs exactly 2 ({len(bad)} ids are unpaired)")
    same = [(g, idx) for g, idx in by_group.items() if data.labels[idx[0]] == data.labels[idx[1]]]
    if same:
        g, idx = same[0]
        raise DataError(f"{data.source}: pair id {g!r} (rows {data.rows[idx[0]]}, {data.rows[idx[1]]}) has the same "
                        f"label {data.labels[idx[0]]!r} twice; a counterfactual pair must flip the label")
    first = [idx[0] for idx in by_group.values()]
    second = [idx[1] for idx in by_group.values()]
    return PairedDataset(data.subset(first), data.subset(second), list(by_group))


# ---- the benchmarks -------------------------------------------------------------------------------------

SENTIMENT = {"Positive": "positive", "Negative": "negative"}
FEVER_LABELS = {"SUPPORTS": "SUPPORTS", "REFUTES": "REFUTES"}


def load_cad_sentiment(root: str | Path, split: str = "train", kind: str = "orig") -> TextDataset:
    """CAD IMDb sentiment: `kind` orig (original reviews) or new (the counterfactual edits); split train/dev/test."""
    if kind not in ("orig", "new"):
        raise SaefeatError(f"kind must be 'orig' or 'new', got {kind!r}")
    path = Path(root) / "cad" / "sentiment" / kind / f"{split}.tsv"
    return read_labeled(path, "Text", "Sentiment", SENTIMENT, name=f"cad_sentiment_{kind}_{split}")


def load_cad_sentiment_pairs(root: str | Path, split: str = "train") -> PairedDataset:
    """CAD sentiment originals aligned with their counterfactuals (combined/paired/<split>_paired.tsv)."""
    path = Path(root) / "cad" / "sentiment" / "combined" / "paired" / f"{split}_paired.tsv"
    return pair_up(read_labeled(path, "Text", "Sentiment", SENTIMENT, group_field="batch_id",
                                name=f"cad_sentiment_paired_{split}"))


def load_cad_nli(root: str | Path, split: str = "train", kind: str = "original") -> TextDataset:
    """CAD SNLI pairs: kind original, revised_premise or revised_hypothesis."""
    if kind not in ("original", "revised_premise", "revised_hypothesis"):
        raise SaefeatError(f"kind must be original, revised_premise or revised_hypothesis, got {kind!r}")
    path = Path(root) / "cad" / "NLI" / kind / f"{split}.tsv"
    return read_labeled(path, ("sentence1", "sentence2"), "gold_label", drop_labels=("-",),
                        name=f"cad_nli_{kind}_{split}")


def load_fever_symmetric(root: str | Path, version: str = "v0.2", split: str = "dev") -> TextDataset:
    """FEVER-Symmetric (evidence, claim) pairs: v0.1 split full/generated, v0.2 split dev/test."""
    base = Path(root) / "fever_symmetric"
    if version == "v0.1":
        path = base / "symmetric_v0.1" / f"fever_symmetric_{split}.jsonl"
        return read_labeled(path, ("evidence_sentence", "claim"), "label", FEVER_LABELS,
                            name=f"fever_symmetric_v0.1_{split}")
    if version == "v0.2":
        path = base / "symmetric_v0.2" / f"fever_symmetric_{split}.jsonl"
        return read_labeled(path, ("evidence", "claim"), "gold_label", FEVER_LABELS,
                            name=f"fever_symmetric_v0.2_{split}")
    raise SaefeatError(f"version must be 'v0.1' or 'v0.2', got {version!r}")


def _local(path: str | Path | None, what: str, hint: str) -> Path:
    if path is None or not Path(path).is_file():
        raise DatasetUnavailable(f"{what} not found at {path}; it does not ship with saefeat: {hint}")
    return Path(path)


def load_mnli(path: str | Path | None, binary: bool = False) -> TextDataset:
    """MNLI from a local GLUE TSV or the multinli_1.0 JSONL (sentence1, sentence2, gold_label).

    binary=True merges neutral and contradiction into non-entailment, HANS's label set.
    """
    p = _local(path, "MNLI", "put the GLUE MNLI train.tsv/dev_matched.tsv (or multinli_1.0_*.jsonl) there")
    label_map = {"neutral": "non-entailment", "contradiction": "non-entailment"} if binary else None
    return read_labeled(p, ("sentence1", "sentence2"), "gold_label", label_map, drop_labels=("-",), name="mnli")


def load_hans(path: str | Path | None) -> TextDataset:
    """HANS (heuristics_evaluation_set.txt: gold_label entailment/non-entailment, sentence1, sentence2)."""
    p = _local(path, "HANS", "put tommccoy1/hans heuristics_evaluation_set.txt there (rename to .tsv)")
    return read_labeled(p, ("sentence1", "sentence2"), "gold_label", name="hans")


def load_qqp(path: str | Path | None) -> TextDataset:
    """QQP from a local GLUE TSV (question1, question2, is_duplicate)."""
    p = _local(path, "QQP", "put the GLUE QQP train.tsv/dev.tsv there")
    return read_labeled(p, ("question1", "question2"), "is_duplicate", name="qqp")


def load_paws(path: str | Path | None) -> TextDataset:
    """PAWS-QQP or PAWS-Wiki from a local TSV (sentence1, sentence2, label 0/1)."""
    p = _local(path, "PAWS", "put the PAWS dev_and_test.tsv (or dev.tsv) there")
    return read_labeled(p, ("sentence1", "sentence2"), "label", name="paws")


def load_fever(path: str | Path | None) -> TextDataset:
    """FEVER (evidence, claim) pairs in the FEVER-Symmetric authors' JSONL (claim, evidence, gold_label)."""
    p = _local(path, "FEVER pairs", "put fever.train.jsonl / fever.dev.jsonl (claim, evidence, gold_label) there")
    return read_labeled(p, ("evidence", "claim"), "gold_label", name="fever")


@dataclass
class Benchmark:
    """A shortcut benchmark: training data, the in-domain evaluation set and the out-of-domain ones."""

    name: str
    train: TextDataset
    in_domain: TextDataset
    ood: dict[str, TextDataset]
    pairs: PairedDataset | None = None  # counterfactual pairs of training texts, where the benchmark has them
    classes: list[str] = field(default_factory=list)

    def sample(self, max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> Benchmark:
        """Cap the training set and each evaluation set (stratified, see `TextDataset.head`) in place.

        The counterfactual pairs are cut to those of the training originals kept; returns the benchmark.
        """
        self.train = self.train.head(max_train, seed)
        self.in_domain = self.in_domain.head(max_eval, seed)
        self.ood = {k: v.head(max_eval, seed) for k, v in self.ood.items()}
        if self.pairs is not None and max_train is not None:
            keep = set(self.train.texts)
            idx = [i for i, t in enumerate(self.pairs.original.texts) if t in keep]
            self.pairs = PairedDataset(self.pairs.original.subset(idx), self.pairs.counterfactual.subset(idx),
                                       [self.pairs.pair_ids[i] for i in idx])
        return self

    def parts(self) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
        """Texts and labels (indices into `classes`) of each part, keyed `train`, `in_domain` and `ood:<name>`."""
        texts = {"train": self.train.texts, "in_domain": self.in_domain.texts}
        y = {"train": self.train.y(self.classes), "in_domain": self.in_domain.y(self.classes)}
        for name, ds in self.ood.items():
            y[f"ood:{name}"], texts[f"ood:{name}"] = ds.y(self.classes), ds.texts
        return texts, y


def load_benchmark(name: str, data_dir: str | Path, paths: Mapping[str, str | None] | None = None,
                   use_pairs: bool = True) -> Benchmark:
    """Load and validate a benchmark by name (cad_sentiment, cad_nli, mnli_hans, fever, qqp_paws).

    `paths` gives local files for the benchmarks that do not ship (keys like mnli_train, hans, paws).
    """
    root = Path(data_dir) / "shortcut"
    paths = dict(paths or {})
    pairs = None
    if name == "cad_sentiment":
        train = load_cad_sentiment(root, "train", "orig")
        in_domain = load_cad_sentiment(root, "dev", "orig")
        ood = {"counterfactual": load_cad_sentiment(root, "dev", "new")}
        if use_pairs:
            pairs = load_cad_sentiment_pairs(root, "train")
    elif name == "cad_nli":
        train = load_cad_nli(root, "train", "original")
        in_domain = load_cad_nli(root, "dev", "original")
        ood = {k: load_cad_nli(root, "dev", k) for k in ("revised_premise", "revised_hypothesis")}
    elif name == "mnli_hans":
        train = load_mnli(paths.get("mnli_train"), binary=True)
        in_domain = load_mnli(paths.get("mnli_dev"), binary=True)
        ood = {"hans": load_hans(paths.get("hans"))}
    elif name == "fever":
        train = load_fever(paths.get("fever_train"))
        in_domain = load_fever(paths.get("fever_dev"))
        ood = {"symmetric_v0.1": load_fever_symmetric(root, "v0.1", "full"),
               "symmetric_v0.2": load_fever_symmetric(root, "v0.2", "dev")}
    elif name == "qqp_paws":
        train = load_qqp(paths.get("qqp_train"))
        in_domain = load_qqp(paths.get("qqp_dev"))
        ood = {"paws": load_paws(paths.get("paws"))}
    else:
        raise SaefeatError(f"unknown benchmark {name!r}; valid: cad_sentiment, cad_nli, mnli_hans, fever, qqp_paws")
    classes = check_label_sets(train, in_domain, *ood.values())
    if pairs is not None:
        check_label_set(pairs.original, classes, f"the training labels of {train.source}")
    return Benchmark(name, train, in_domain, ood, pairs, classes)


def label_frame(data: TextDataset) -> pd.DataFrame:
    """The dataset as a DataFrame (row, label, text) for logging."""
    return pd.DataFrame({"row": data.rows, "label": data.labels, "text": data.texts})
