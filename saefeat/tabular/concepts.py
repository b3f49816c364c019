"""Concepts found in SAE space, each turned into a discrete condition column of the table.

Three kinds: named latents (a set of latent ids, given by id or by label), clusters of rows in SAE space
(k-means on the sparse rows), and the class label. Each concept carries the latents that test for it, so
`concept.shows(X)` tells which encoded rows carry it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import MiniBatchKMeans
from sklearn.feature_extraction.text import TfidfTransformer

from saefeat.errors import SaefeatError
from saefeat.tabular.schema import TableSchema

MATCHES = ("all", "any")


@dataclass
class Concept:
    """A value of a condition column and the SAE latents that test for it.

    Attributes:
        column: the condition column (a concept column, or the target for a label concept).
        value: the column value that carries the concept.
        kind: "latents", "cluster" or "label".
        latents: latent ids that fire on rows carrying the concept.
        match: a row shows the concept when "all" (or "any") of `latents` fire.
        description: its top latents (with labels where known) and typical column values.
    """

    column: str
    value: str
    kind: str
    latents: list[int]
    match: str = "all"
    description: str = ""
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.column}={self.value}"

    def shows(self, X: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Boolean per row of pooled SAE activations `X`: does the row fire the concept's latents?"""
        fired = np.asarray((_csr(X)[:, self.latents] > 0).toarray())
        return fired.all(axis=1) if self.match == "all" else fired.any(axis=1)


def _csr(X) -> sp.csr_matrix:
    return X.tocsr() if sp.issparse(X) else sp.csr_matrix(np.asarray(X))


def firing_rates(X, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: share of rows in `mask` where it fires, and share of the other rows."""
    B = (_csr(X) > 0).astype(np.float32)
    mask = np.asarray(mask, bool)
    inside = np.asarray(B[mask].mean(axis=0)).ravel() if mask.any() else np.zeros(B.shape[1])
    outside = np.asarray(B[~mask].mean(axis=0)).ravel() if (~mask).any() else np.zeros(B.shape[1])
    return inside, outside


def signature_latents(X, mask: np.ndarray, n: int = 2) -> list[int]:
    """The n latents whose firing rate rises most from rows outside `mask` to rows inside it."""
    inside, outside = firing_rates(X, mask)
    return [int(i) for i in np.argsort(-(inside - outside), kind="stable")[:n]]


def typical_values(table: pd.DataFrame, mask: np.ndarray, schema: TableSchema, n: int = 3) -> list[str]:
    """The column values that set rows in `mask` apart from the rest.

    Categorical: values whose share rises most (`col=value (in% vs out%)`); numerical: the columns whose median
    moves most in units of the column's interquartile range (`col median a vs b`).
    """
    mask = np.asarray(mask, bool)
    scored: list[tuple[float, str]] = []
    for c in schema.columns:
        if c not in table.columns:
            continue
        col = table[c]
        if schema.types[c] == "categorical":
            inside = col[mask].value_counts(normalize=True)
            outside = col[~mask].value_counts(normalize=True)
            for v, share in inside.items():
                lift = share - outside.get(v, 0.0)
                scored.append((lift, f"{c}={v} ({share:.0%} vs {outside.get(v, 0.0):.0%})"))
        else:
            a, b = col[mask].median(), col[~mask].median()
            iqr = col.quantile(0.75) - col.quantile(0.25)
            spread = iqr if iqr > 0 else (col.std() or 1.0)
            if pd.notna(a) and pd.notna(b):
                scored.append((abs(a - b) / spread / 2, f"{c} median {a:g} vs {b:g}"))
    scored.sort(key=lambda t: -t[0])
    return [s for _, s in scored[:n]]


def _describe(latents: Sequence[int], labels: Mapping[int, str] | None, values: Sequence[str]) -> str:
    lat = ", ".join(f"#{i}" + (f" ({labels[i]})" if labels and i in labels else "") for i in latents)
    return f"latents {lat}" + (f"; {'; '.join(values)}" if values else "")


class ClusterConcepts:
    """Concept clusters in SAE space: k-means on idf-weighted, L2-normalised pooled SAE rows.

    Latents that fire on every row (the template words of the serialised rows) get little weight from the
    idf; each cluster is described by its signature latents and the column values typical of its rows.

    Args:
        n_clusters: number of concepts.
        n_signature: latents per concept used to describe and test it.
        match: a row shows a cluster concept when "all" / "any" of its signature latents fire.
        column: name of the condition column.
        seed: random state of k-means.
    """

    def __init__(self, n_clusters: int = 8, n_signature: int = 2, match: str = "all", column: str = "sae_concept",
                 seed: int = 0):
        if n_clusters < 2:
            raise SaefeatError(f"concepts.n_clusters must be at least 2, got {n_clusters}")
        if n_signature < 1:
            raise SaefeatError(f"concepts.n_signature must be at least 1, got {n_signature}")
        if match not in MATCHES:
            raise SaefeatError(f"concepts.match={match!r}; valid: {', '.join(MATCHES)}")
        self.n_clusters, self.n_signature, self.match, self.column, self.seed = \
            n_clusters, n_signature, match, column, seed

    def _weighted(self, X) -> sp.csr_matrix:
        return self.idf_.transform(_csr(X))

    def fit(self, X, table: pd.DataFrame | None = None, schema: TableSchema | None = None,
            labels: Mapping[int, str] | None = None) -> ClusterConcepts:
        """Cluster the rows of X; with `table` and `schema`, describe each cluster by typical column values."""
        X = _csr(X)
        if X.shape[0] < self.n_clusters:
            raise SaefeatError(f"{X.shape[0]} encoded rows cannot form {self.n_clusters} clusters")
        self.idf_ = TfidfTransformer(norm="l2", use_idf=True, smooth_idf=True, sublinear_tf=False).fit(X)
        self.kmeans_ = MiniBatchKMeans(n_clusters=self.n_clusters, n_init=5, batch_size=2048,
                                       random_state=self.seed).fit(self._weighted(X))
        ids = self.kmeans_.labels_
        self.labels_ = np.array([self.value(i) for i in ids], dtype=object)
        self.concepts_: list[Concept] = []
        for c in range(self.n_clusters):
            mask = ids == c
            lat = signature_latents(X, mask, self.n_signature)
            values = typical_values(table, mask, schema) if table is not None and schema is not None else []
            concept = Concept(self.column, self.value(c), "cluster", lat, self.match, _describe(lat, labels, values))
            concept.stats = {"share": float(mask.mean()), "shows_inside": float(concept.shows(X[mask]).mean()),
                             "shows_outside": float(concept.shows(X[~mask]).mean()) if (~mask).any() else 0.0}
            self.concepts_.append(concept)
        return self

    @staticmethod
    def value(i: int) -> str:
        return f"c{i}"

    def predict(self, X) -> np.ndarray:
        """The cluster concept value ("c0", "c1", ...) nearest to each row."""
        return np.array([self.value(i) for i in self.kmeans_.predict(self._weighted(X))], dtype=object)


def latent_concept(X, latents: Sequence[int], match: str = "all", column: str | None = None,
                   labels: Mapping[int, str] | None = None) -> tuple[Concept, np.ndarray]:
    """A concept for a named set of latents and its condition column ("yes"/"no" per row of X)."""
    X = _csr(X)
    latents = [int(i) for i in latents]
    if not latents:
        raise SaefeatError("a latent concept needs at least one latent id")
    bad = [i for i in latents if not 0 <= i < X.shape[1]]
    if bad:
        raise SaefeatError(f"latent id(s) {bad} out of range: the SAE has {X.shape[1]} latents")
    if match not in MATCHES:
        raise SaefeatError(f"concepts.match={match!r}; valid: {', '.join(MATCHES)}")
    column = column or "latent_" + "_".join(map(str, latents))
    concept = Concept(column, "yes", "latents", latents, match, _describe(latents, labels, []))
    shows = concept.shows(X)
    if not shows.any():
        raise SaefeatError(f"concept {column!r}: latent(s) {latents} never fire ({match}) on the encoded rows; "
                         "pick latents that fire on some rows")
    concept.stats = {"share": float(shows.mean())}
    return concept, np.where(shows, "yes", "no").astype(object)


def label_concepts(X, y: Sequence[str], column: str, n_signature: int = 2, match: str = "all",
                   labels: Mapping[int, str] | None = None) -> list[Concept]:
    """One concept per class of the target column, tested by the latents that rise most in that class."""
    X = _csr(X)
    y = np.asarray(y, dtype=object)
    out = []
    for v in pd.unique(y):
        mask = y == v
        lat = signature_latents(X, mask, n_signature)
        c = Concept(column, str(v), "label", lat, match, _describe(lat, labels, []))
        c.stats = {"share": float(mask.mean()), "shows_inside": float(c.shows(X[mask]).mean()),
                   "shows_outside": float(c.shows(X[~mask]).mean())}
        out.append(c)
    return out


def resolve_latents(spec: int | str | Sequence[int | str], labels: Mapping[int, str] | None = None) -> list[int]:
    """Latent ids from ids or labels; a label must match exactly one latent's label (case-insensitive substring)."""
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    out: list[int] = []
    for item in items:
        if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.strip().lstrip("#").isdigit()):
            out.append(int(str(item).strip().lstrip("#")))
            continue
        if not labels:
            raise SaefeatError(f"concept latent {item!r} is a label, but no latent labels are available; "
                             "give latent ids")
        needle = str(item).lower()
        hits = [i for i, lab in labels.items() if needle in str(lab).lower()]
        if len(hits) != 1:
            shown = ", ".join(f"#{i} {labels[i]!r}" for i in hits[:8])
            raise SaefeatError(f"concept latent label {item!r} matches {len(hits)} latents"
                             + (f" ({shown})" if hits else "") + "; give a more specific label or an id")
        out.append(int(hits[0]))
    return out


def store_labels(sae_hash: str, directory: str | None = None) -> dict[int, str] | None:
    """Latent labels from the latent store of an SAE, where `saefeat describe-latents` built one (else None)."""
    from saefeat.explain.store import LatentStore

    store = LatentStore.for_sae(sae_hash, directory)
    if not (store.exists and store.meta.get("docs_done")):
        return None
    try:
        return store.labels()
    finally:
        store.close()


def named_latents(specs: Sequence[int | str | Sequence[int | str]], labels: Mapping[int, str] | None,
                  d_sae: int) -> list[list[int]]:
    """Latent ids of each named concept (ids or labels, see `resolve_latents`), checked before any encoding.

    Refuses labels without `labels`, the same latent set named twice and ids outside the SAE's `d_sae`.
    """
    specs = list(specs)
    needs_labels = any(isinstance(s, str) and not s.strip().lstrip("#").isdigit()
                       for spec in specs for s in (spec if isinstance(spec, list) else [spec]))
    if needs_labels and not labels:
        raise SaefeatError("concepts.latents names latents by label, but this SAE has no latent store with labels; "
                         "run `saefeat describe-latents` first or give latent ids")
    out = [resolve_latents(spec, labels) for spec in specs]
    if len({tuple(ids) for ids in out}) < len(out):
        raise SaefeatError(f"concepts.latents names the same latent set twice: {out}")
    bad = [i for ids in out for i in ids if not 0 <= i < d_sae]
    if bad:
        raise SaefeatError(f"concepts.latents: latent id(s) {bad} out of range; the SAE has {d_sae} latents")
    return out


def add_concept_columns(X, table: pd.DataFrame, schema: TableSchema, clusters: ClusterConcepts,
                        named: Sequence[Sequence[int]] = (), label: bool = True,
                        labels: Mapping[int, str] | None = None) -> tuple[list[Concept], pd.DataFrame, TableSchema]:
    """Every concept of the encoded rows `X` of `table`, and the table and schema with their condition columns.

    Concepts: the clusters (fitted here, column `clusters.column`), one per latent set in `named` (a yes/no
    column each) and, with `label`, one per class of the target (its column is the target itself).
    """
    clusters.fit(X, table, schema, labels)
    concepts: list[Concept] = list(clusters.concepts_)
    out = table.copy()
    out[clusters.column] = clusters.labels_
    out_schema = schema.with_column(clusters.column)
    for ids in named:
        concept, values = latent_concept(X, ids, match=clusters.match, labels=labels)
        out[concept.column] = values
        out_schema = out_schema.with_column(concept.column)
        concepts.append(concept)
    if label:
        concepts += label_concepts(X, table[schema.target].to_numpy(), schema.target, clusters.n_signature,
                                   clusters.match, labels)
    return concepts, out, out_schema


def concept_latent_importance(concepts: Sequence[Concept]) -> dict[int, float]:
    """Latent -> the largest rise of its concepts' firing rate inside the concept over outside (or the base rate),
    for every latent that tests a concept, in first-seen order."""
    latents: dict[int, float] = {}
    for c in concepts:
        rise = c.stats.get("shows_inside", 1.0) - c.stats.get("shows_outside", c.stats.get("share", 0.0))
        for i in c.latents:
            latents[i] = max(latents.get(i, -1.0), float(rise))
    return latents
