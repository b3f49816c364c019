"""Synthetic rows against real held-out rows: fidelity, utility, faithfulness, privacy, augmentation.

Every function that takes the synthesizer's training rows and held-out rows refuses to run when their indexes
overlap, so no metric is computed on a row the synthesizer saw.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

from saefeat.errors import SaefeatError
from saefeat.evaluation.metrics import classification_report
from saefeat.tabular.concepts import Concept
from saefeat.tabular.schema import TableSchema

CLASSIFIER_DEFAULTS = {"n_estimators": 300, "learning_rate": 0.05, "num_leaves": 31}


def split_holdout(df: pd.DataFrame, target: str, holdout: float = 0.2, seed: int = 0) -> tuple[pd.Index, pd.Index]:
    """Index of training and held-out rows, stratified by the target."""
    if not 0 < holdout < 1:
        raise SaefeatError(f"data.holdout must be a share between 0 and 1, got {holdout}")
    train, test = train_test_split(df.index, test_size=holdout, random_state=seed, stratify=df[target])
    return pd.Index(sorted(train)), pd.Index(sorted(test))


def check_disjoint(train_index: Sequence, holdout_index: Sequence, what: str = "held-out rows") -> None:
    """Raise a ValueError when a row is both a synthesizer training row and an evaluation row."""
    both = pd.Index(train_index).intersection(pd.Index(holdout_index))
    if len(both):
        raise SaefeatError(f"{len(both)} {what} are also training rows of the synthesizer "
                         f"(e.g. index {list(both[:5])}); evaluate on rows it never saw")


class TableFeaturizer:
    """Table -> LightGBM input: numerical columns as float, categorical ones as pandas categories.

    Categories are those of the table given to `fit` (the real training rows), so models trained on real and on
    synthetic rows see the same encoding; a value never seen there becomes missing.
    """

    def __init__(self, schema: TableSchema):
        self.schema = schema

    def fit(self, df: pd.DataFrame) -> TableFeaturizer:
        self.categories_ = {c: sorted(df[c].dropna().astype(str).unique()) for c in self.schema.categorical
                            if c != self.schema.target}
        return self

    def transform(self, df: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame(index=df.index)
        for c in self.schema.features:
            if c in self.categories_:
                out[c] = pd.Categorical(df[c].astype(object).where(df[c].notna()), categories=self.categories_[c])
            else:
                out[c] = df[c].astype(float)
        return out

    def labels(self, df: pd.DataFrame) -> np.ndarray:
        """1 for the minority class, 0 otherwise."""
        return (df[self.schema.target].astype(str) == self.schema.minority).to_numpy().astype(int)


def fit_classifier(df: pd.DataFrame, featurizer: TableFeaturizer, seed: int = 0,
                   params: Mapping[str, object] | None = None, n_jobs: int = -1):
    """A LightGBM classifier of the minority class fitted on `df` (`n_jobs` threads, -1 = all cores)."""
    from lightgbm import LGBMClassifier

    y = featurizer.labels(df)
    if len(np.unique(y)) < 2:
        raise SaefeatError(f"the classifier's training rows hold one class only ({len(y)} rows)")
    clf = LGBMClassifier(**(CLASSIFIER_DEFAULTS | dict(params or {})), random_state=seed, n_jobs=n_jobs, verbose=-1)
    return clf.fit(featurizer.transform(df), y)


def score_classifier(clf, featurizer: TableFeaturizer, holdout: pd.DataFrame, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """ROC-AUC, PR-AUC, balanced accuracy and minority F1 (with 95% intervals) on held-out rows."""
    scores = clf.predict_proba(featurizer.transform(holdout))[:, 1]
    return classification_report(featurizer.labels(holdout), scores, n_boot=n_boot, seed=seed)


def fidelity(train: pd.DataFrame, synthetic: pd.DataFrame, holdout: pd.DataFrame, schema: TableSchema,
             reference: bool = True, seed: int = 0) -> tuple[dict[str, float], pd.DataFrame]:
    """sdmetrics quality report of synthetic rows against real held-out rows.

    Returns metrics `fidelity_column_shapes`, `fidelity_column_pair_trends`, `fidelity_overall` and, with
    `reference`, the same scores for as many real training rows (`fidelity_real_*`: the ceiling that sampling
    noise leaves), plus the per-column shape scores.
    """
    from sdmetrics.reports.single_table import QualityReport

    check_disjoint(train.index, holdout.index)
    meta = {"columns": {c: {"sdtype": t} for c, t in schema.types.items()}}
    cols = schema.columns

    def report(a: pd.DataFrame, b: pd.DataFrame) -> tuple[dict[str, float], pd.DataFrame]:
        r = QualityReport()
        r.generate(a[cols], b[cols], meta, verbose=False)
        props = r.get_properties().set_index("Property")["Score"]
        return ({"column_shapes": float(props["Column Shapes"]),
                 "column_pair_trends": float(props["Column Pair Trends"]),
                 "overall": float(r.get_score())}, r.get_details("Column Shapes"))

    scores, details = report(holdout, synthetic)
    out = {f"fidelity_{k}": v for k, v in scores.items()}
    if reference:
        real = train.sample(n=min(len(train), len(synthetic)), random_state=seed)
        ref, ref_details = report(holdout, real)
        out |= {f"fidelity_real_{k}": v for k, v in ref.items()}
        details = details.merge(ref_details[["Column", "Score"]].rename(columns={"Score": "Score (real rows)"}),
                                on="Column", how="left")
    return out, details


def utility(train: pd.DataFrame, synthetic: pd.DataFrame, holdout: pd.DataFrame, schema: TableSchema,
            seed: int = 0, n_boot: int = 1000, params: Mapping[str, object] | None = None,
            n_jobs: int = -1) -> dict[str, dict]:
    """Train on synthetic, test on real (TSTR) against train on real, test on real (TRTR), with LightGBM.

    Returns {"trtr": report, "tstr": report, "ratio": {"roc_auc": tstr/trtr}}.
    """
    check_disjoint(train.index, holdout.index)
    feat = TableFeaturizer(schema).fit(train)
    trtr = score_classifier(fit_classifier(train, feat, seed, params, n_jobs), feat, holdout, n_boot, seed)
    tstr = score_classifier(fit_classifier(synthetic, feat, seed, params, n_jobs), feat, holdout, n_boot, seed)
    return {"trtr": trtr, "tstr": tstr, "ratio": {"roc_auc": tstr["roc_auc"] / trtr["roc_auc"]}}


def augmentation(train: pd.DataFrame, extra: pd.DataFrame, holdout: pd.DataFrame, schema: TableSchema,
                 seed: int = 0, n_boot: int = 1000, params: Mapping[str, object] | None = None,
                 n_jobs: int = -1) -> dict[str, dict]:
    """A classifier on the real training rows against one on those rows plus `extra` synthetic rows.

    Returns {"real": report, "augmented": report}; minority_f1 is the figure of interest.
    """
    check_disjoint(train.index, holdout.index)
    check_disjoint(train.index, extra.index, "synthetic rows (by index)")
    feat = TableFeaturizer(schema).fit(train)
    base = score_classifier(fit_classifier(train, feat, seed, params, n_jobs), feat, holdout, n_boot, seed)
    both = pd.concat([train[schema.columns], extra[schema.columns]])
    augmented = score_classifier(fit_classifier(both, feat, seed, params, n_jobs), feat, holdout, n_boot, seed)
    return {"real": base, "augmented": augmented}


def _gower_space(df: pd.DataFrame, schema: TableSchema, lo: pd.Series, span: pd.Series,
                 categories: Mapping[str, list[str]]) -> np.ndarray:
    """Rows as vectors whose L1 distance / n_columns is a Gower distance (numerical: |dx|/range, categorical:
    0 or 1; a missing cell is one more category, or lies 1 to 2 ranges away from any number)."""
    parts = []
    for c in schema.columns:
        if c in categories:
            vals = df[c].astype(object).where(df[c].notna(), "<missing>").astype(str).to_numpy()
            onehot = (vals[:, None] == np.asarray(categories[c], dtype=object)[None, :]).astype(np.float32)
            parts.append(0.5 * onehot)
        else:
            x = ((df[c].astype(float) - lo[c]) / span[c]).clip(0, 1).fillna(-1.0).to_numpy(np.float32)
            parts.append(x[:, None])
    return np.hstack(parts)


def privacy(train: pd.DataFrame, synthetic: pd.DataFrame, holdout: pd.DataFrame,
            schema: TableSchema, n_jobs: int = -1, subsample: int | None = 2000) -> dict[str, float]:
    """Distance to the closest training record (DCR, Gower distance in [0, 1]) of synthetic rows, compared with
    that of real held-out rows, which the synthesizer never saw.

    Metrics: medians of both, their ratio (>= 1: synthetic rows sit no closer to training rows than new real
    rows do), the share of exact copies of a training row in each, and the share of synthetic rows closer than
    the 5th percentile of held-out DCR (about 0.05 when the synthesizer does not memorise); then sdmetrics'
    `DCROverfittingProtection` and `DCRBaselineProtection` (`sdmetrics_dcr`).
    """
    check_disjoint(train.index, holdout.index)
    num = train[schema.numerical].astype(float)
    lo, span = num.min(), (num.max() - num.min()).replace(0, 1.0)
    cats = {c: sorted(set(train[c].dropna().astype(str)) | {"<missing>"}) for c in schema.categorical}
    space = {name: _gower_space(df, schema, lo, span, cats)
             for name, df in (("train", train), ("synthetic", synthetic), ("holdout", holdout))}
    nn = NearestNeighbors(n_neighbors=1, metric="manhattan", n_jobs=n_jobs).fit(space["train"])
    n_cols = len(schema.columns)
    dcr_syn = nn.kneighbors(space["synthetic"])[0][:, 0] / n_cols
    dcr_hold = nn.kneighbors(space["holdout"])[0][:, 0] / n_cols
    p5 = float(np.percentile(dcr_hold, 5))
    med_syn, med_hold = float(np.median(dcr_syn)), float(np.median(dcr_hold))
    out = {"dcr_synthetic_median": med_syn, "dcr_holdout_median": med_hold,
           "dcr_ratio": med_syn / med_hold if med_hold > 0 else float("nan"),
           "synthetic_exact_copies": float(np.mean(dcr_syn < 1e-9)),
           "holdout_exact_copies": float(np.mean(dcr_hold < 1e-9)),
           "synthetic_below_holdout_p5": float(np.mean(dcr_syn < p5))}
    return out | sdmetrics_dcr(train, synthetic, holdout, schema, subsample)


def sdmetrics_dcr(train: pd.DataFrame, synthetic: pd.DataFrame, holdout: pd.DataFrame, schema: TableSchema,
                  subsample: int | None = 2000, seed: int = 0) -> dict[str, float]:
    """sdmetrics' DCR scores: `sdm_dcr_overfitting_protection` (1 when synthetic rows are no closer to the
    training rows than to held-out real rows; its `closer_to_training` share should be about 0.5 for a
    synthesizer that does not memorise) and `sdm_dcr_baseline_protection` (DCR of synthetic rows relative to
    random rows, 1 = as far from the training rows as noise). `subsample` synthetic rows (one iteration)."""
    from sdmetrics.single_table import DCRBaselineProtection, DCROverfittingProtection

    meta = {"tables": {"table": {"columns": {c: {"sdtype": t} for c, t in schema.types.items()}}}}
    cols = schema.columns
    n = None if subsample is None or subsample >= len(synthetic) else int(subsample)
    np.random.seed(seed)  # sdmetrics subsamples with numpy's global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        over = DCROverfittingProtection.compute_breakdown(train[cols], synthetic[cols], holdout[cols], meta, "table",
                                                          num_rows_subsample=n)
        base = DCRBaselineProtection.compute_breakdown(train[cols], synthetic[cols], meta, "table",
                                                       num_rows_subsample=n)
    return {"sdm_dcr_overfitting_protection": float(over["score"]),
            "sdm_dcr_closer_to_training": float(over["synthetic_data_percentages"]["closer_to_training"]),
            "sdm_dcr_baseline_protection": float(base["score"])}


def faithfulness(concepts: Sequence[Concept], synthetic_X: Mapping[str, object], real_X,
                 real_members: Mapping[str, np.ndarray] | None = None, target_rate: float = 0.8,
                 max_base_rate: float = 0.3) -> pd.DataFrame:
    """Per concept: how often its latents fire in the synthetic rows sampled for it, against real data.

    Args:
        concepts: the concepts.
        synthetic_X: concept name -> pooled SAE rows of the synthetic rows sampled for that concept.
        real_X: pooled SAE rows of real held-out rows (the base rate).
        real_members: concept name -> boolean mask of `real_X` rows that belong to the concept (their rate is
            what a perfect synthesizer would reach).
    Columns: concept, kind, latents, synthetic_rate, base_rate, real_member_rate, lift, meets_target
    (synthetic_rate >= target_rate where base_rate < max_base_rate; None where the base rate is higher, with the
    reason in not_eligible_because).
    """
    rows = []
    for c in concepts:
        if c.name not in synthetic_X:
            continue
        syn = c.shows(synthetic_X[c.name])
        base = c.shows(real_X)
        members = (real_members or {}).get(c.name)
        member_rate = float(base[members].mean()) if members is not None and members.any() else float("nan")
        rate, base_rate = float(syn.mean()), float(base.mean())
        rows.append({"concept": c.name, "kind": c.kind, "latents": " ".join(f"#{i}" for i in c.latents),
                     "n_synthetic": len(syn), "synthetic_rate": rate, "base_rate": base_rate,
                     "real_member_rate": member_rate, "lift": rate / base_rate if base_rate > 0 else float("inf"),
                     "meets_target": (rate >= target_rate) if base_rate < max_base_rate else None,
                     "not_eligible_because": "" if base_rate < max_base_rate else
                     f"its latents fire in {base_rate:.0%} of real rows (>= {max_base_rate:.0%}): firing tells "
                     "little about the concept",
                     "description": c.description})
    return pd.DataFrame(rows)
