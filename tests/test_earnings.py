import gzip
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from saefeat.config import load_config
from saefeat.data import DataError


@pytest.fixture(scope="module")
def calls(data_dir):
    """A real slice: every 5th call of 4 tickers (both classes on both sides of the split), cut to 3,000 chars."""
    rows = []
    with gzip.open(data_dir / "earnings" / "earnings_calls_10tech.jsonl.gz", "rt") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({k: r[k] for k in ("id", "ticker", "report_date", "surprise_pct", "surprise_label", "text")})
    df = pd.DataFrame(rows)
    df = df[df.ticker.isin(["AMD", "AMZN", "GOOGL", "MU"])].sort_values("report_date")
    df = df.groupby("ticker").nth(list(range(1, 50, 5))).reset_index(drop=True)
    df["text"] = df["text"].str[:3000]
    return df


def _write(df, path):
    df.to_json(path, orient="records", lines=True)
    return path


def _cfg(path, *extra):
    return load_config("tasks", ["task=earnings", f"data.path={path}", "split.test_per_group=3", "cv.n_splits=2",
                                 "selection.k_grid=[8,32]", "bootstrap=50", "explain_top=3", "embed.max_tokens=256",
                                 "embed.show_progress_bar=false", *extra])


def test_earnings_end_to_end(calls, tmp_path):
    from saefeat.tasks.earnings import run

    path = _write(calls, tmp_path / "calls.jsonl")
    results = run(_cfg(path))
    assert set(results) == {"sae", "dense", "sae_sentence", "sentence", "tfidf"}
    names = {frozenset(m) for m in results.values()}
    assert len(names) == 1  # the same metric names in every representation
    for m in ("roc_auc", "roc_auc_lo", "roc_auc_hi", "pr_auc", "balanced_accuracy", "minority_f1", "spearman", "mae"):
        assert m in results["sae"]
        assert all(np.isfinite(r[m]) for r in results.values())
    assert 0 <= results["sae"]["roc_auc_lo"] <= results["sae"]["roc_auc"] <= results["sae"]["roc_auc_hi"] <= 1

    exp = mlflow.get_experiment_by_name("earnings")
    runs = mlflow.search_runs([exp.experiment_id])
    parent = runs[runs["tags.saefeat.role"] == "parent"]
    children = runs[runs["tags.mlflow.parentRunId"] == parent.run_id.iloc[0]]
    assert sorted(children["tags.representation"]) == ["dense", "sae", "sae_sentence", "sentence", "tfidf"]
    client = mlflow.tracking.MlflowClient()
    parent_files = {f.path for f in client.list_artifacts(parent.run_id.iloc[0])}
    assert {"roc.png", "comparison.json", "config.yaml"} <= parent_files
    sae_run = children[children["tags.representation"] == "sae"].run_id.iloc[0]
    assert "selected_latents.json" in {f.path for f in client.list_artifacts(sae_run)}
    assert parent["params.data.path"].iloc[0] == str(path)


_SEEN: list[tuple[int, float]] = []


def _spy_f_classif(X, y):
    """f_classif that records the rows it scores (module level: the fit cache must pickle it)."""
    from sklearn.feature_selection import f_classif

    _SEEN.append((X.shape[0], float(abs(X[:, 0]).max())))
    return f_classif(X, y)


def test_feature_selection_never_sees_test_rows(monkeypatch):
    import saefeat.evaluation.model_selection as ms
    from saefeat.tasks.earnings import fit_and_score

    rng = np.random.default_rng(0)
    n_train, n_test = 60, 20
    X = sp.random(n_train + n_test, 50, density=0.3, random_state=0, format="lil")
    # column 0 marks test rows: training values in (0, 0.5], test rows 1000; after MaxAbsScaler fitted on
    # training rows, a value above 1 can only come from a test row
    X[:n_train, 0] = rng.uniform(0.01, 0.5, (n_train, 1))
    X[n_train:, 0] = 1000.0
    X = X.tocsr()
    y = rng.integers(0, 2, n_train + n_test)
    dates = pd.date_range("2015-01-01", periods=n_train, freq="W").to_numpy()
    seen = _SEEN
    seen.clear()
    monkeypatch.setattr(ms, "f_classif", _spy_f_classif)
    cfg = _cfg("unused", "n_jobs=1")  # in process, where the spy can see every fit
    fit_and_score(X[:n_train], y[:n_train], dates, X[n_train:], y[n_train:], cfg, log_transform=False)
    assert seen, "the selector was never fitted"
    assert all(marker <= 1.0 for _, marker in seen)  # no test row ever reached the selector
    assert max(n for n, _ in seen) == n_train  # the final refit uses the training calls only
    assert min(n for n, _ in seen) < n_train  # CV fits used training folds


def test_bad_rows_are_named_before_embedding(calls, tmp_path, monkeypatch):
    import saefeat.tasks.earnings as task

    monkeypatch.setattr(task, "make_representation", lambda *a: pytest.fail("embedding started"))
    bad = calls.copy()
    bad.loc[3, "surprise_label"] = None
    bad.loc[5, "text"] = "   "
    bad.loc[7, "report_date"] = "not a date"
    with pytest.raises(DataError, match=r"surprise_label.*rows 3.*report_date.*rows 7.*text.*rows 5"):
        task.run(_cfg(_write(bad, tmp_path / "bad.jsonl")))
    one_class = calls.copy()
    one_class["surprise_label"] = 1
    with pytest.raises(DataError, match="training split holds one class only"):
        task.run(_cfg(_write(one_class, tmp_path / "one.jsonl")))
    with pytest.raises(DataError, match="missing column"):
        task.run(_cfg(_write(calls.drop(columns=["report_date"]), tmp_path / "nodate.jsonl")))


def test_the_default_temporal_split_is_one_date_cut_across_tickers(data_dir):
    """Real calls with uneven coverage (AAPL's last 3 years dropped), so tickers interleave in time. The global cut
    never trains on a call later than a test call; the per-group cut (still an option) does: that is the
    look-ahead it allows."""
    from saefeat.earnings import load_calls, split_calls

    df = load_calls(data_dir / "earnings" / "earnings_calls_10tech.jsonl.gz")
    df = df[~((df.ticker == "AAPL") & (df.report_date >= "2019-06-01"))].reset_index(drop=True)
    train, test = split_calls(df, test_per_group=8)
    d = df["report_date"]
    assert d.iloc[train].max() < d.iloc[test].min()
    assert abs(len(test) - 8 * df["ticker"].nunique()) <= 3  # sized like 8 calls per ticker (ties on the cut date)
    purged, test_p = split_calls(df, test_per_group=8, purge_days=30)
    assert np.array_equal(test_p, test) and d.iloc[purged].max() < d.iloc[test].min() - pd.Timedelta(days=30)
    old, old_test = split_calls(df, test_per_group=8, cut="per_group")
    assert d.iloc[old].max() > d.iloc[old_test].min()  # per group: some training call is later than a test call


def test_too_few_dates_for_the_folds_is_a_clear_error():
    from saefeat.errors import SaefeatError
    from saefeat.evaluation.splits import GroupedTimeSeriesSplit

    dates = pd.to_datetime(["2020-01-01", "2020-01-01", "2020-02-01", "2020-03-01"])
    with pytest.raises(SaefeatError, match="at least 5 distinct dates.*got 3.*cv.n_splits"):
        list(GroupedTimeSeriesSplit(4).split(np.zeros((4, 1)), groups=dates))
    assert len(list(GroupedTimeSeriesSplit(2).split(np.zeros((4, 1)), groups=dates))) == 2
