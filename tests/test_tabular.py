"""Task `tabular`: serialisation, schema checks, conditional sampling and evaluation on unseen rows (real Adult)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from saefeat.data import DataError, read_table
from saefeat.tabular import ClusterConcepts, ConditionalSynthesizer, RowSerializer, label_concepts, prepare_table
from saefeat.tabular.concepts import latent_concept, resolve_latents
from saefeat.tabular.evaluate import augmentation, check_disjoint, fidelity, privacy, split_holdout, utility


@pytest.fixture(scope="module")
def adult(data_dir):
    raw = read_table(data_dir / "tabular" / "adult_train.csv")
    return raw, *prepare_table(raw.head(3000), "income", source="adult_train.csv")


def _serializer(schema, cols=None):
    cols = cols or schema.features
    return RowSerializer(cols, [c for c in schema.numerical if c in cols], [c for c in schema.integers if c in cols])


# ---- serialisation ----------------------------------------------------------------------------
def test_rows_round_trip_through_text(adult):
    _, table, schema = adult
    ser = _serializer(schema)
    texts = ser.transform(table)
    assert texts[0].startswith("age is 39, workclass is State-gov, fnlwgt is 77516")
    assert "marital status is Never-married" in texts[0]
    back = ser.inverse_transform(texts)
    assert table[schema.features].isna().any().any()  # Adult's `?` cells are missing: left out, parsed back as NaN
    pd.testing.assert_frame_equal(back, table[schema.features].reset_index(drop=True), check_dtype=False)


def test_parser_reads_the_columns_a_text_names():
    ser = RowSerializer(["age", "note", "marital_status", "score"], numerical=["age", "score"], integers=["age"])
    row = ser.inverse_transform(["note is tall, age is 5, marital status is Divorced"]).iloc[0]
    assert row["note"] == "tall, age is 5"  # names are read in column order: `age` comes before `note`
    assert row["marital_status"] == "Divorced"
    assert np.isnan(row["age"]) and np.isnan(row["score"])  # columns the text does not name are missing
    df = pd.DataFrame({"age": [3.0, np.nan], "note": ["a, b", "age is 4"], "marital_status": ["M", None],
                       "score": [0.1 + 0.2, 1e-7]})
    pd.testing.assert_frame_equal(ser.inverse_transform(ser.transform(df)), df, check_dtype=False)
    with pytest.raises(ValueError, match="row 0, column 'age'"):
        ser.inverse_transform(["age is young"])
    assert np.isnan(ser.inverse_transform(["age is young"], errors="coerce").loc[0, "age"])


# ---- schema and bad input ------------------------------------------------------------------------
def test_schema_of_adult(adult):
    _, table, schema = adult
    assert set(schema.numerical) == {"age", "fnlwgt", "education_num", "capital_gain", "capital_loss",
                                     "hours_per_week"}
    assert schema.classes == (">50K", "<=50K") and schema.minority == ">50K"
    assert table["workclass"].isna().sum() > 0 and "?" not in set(table["workclass"].dropna())


def test_bad_input_names_the_column(adult):
    raw = adult[0].head(400)
    with pytest.raises(DataError, match="'salary'"):
        prepare_table(raw, "salary")
    with pytest.raises(DataError, match="'agee'"):
        prepare_table(raw, "income", columns=["agee", "sex"])
    with pytest.raises(DataError, match="'zip'"):
        prepare_table(raw, "income", categorical=["zip"])
    with pytest.raises(DataError, match="'income' has 1 class"):
        prepare_table(raw[raw.income == "<=50K"], "income")
    mixed = raw.assign(age=raw["age"].astype(object))
    mixed.loc[mixed.index[7], "age"] = "unknown"
    with pytest.raises(DataError, match=r"column 'age' mixes numbers and text.*'unknown' in row 7"):
        prepare_table(mixed, "income")
    fixed, schema = prepare_table(mixed, "income", na_values=["?", "unknown"])  # the marker declared: handled
    assert schema.types["age"] == "numerical" and np.isnan(fixed.loc[7, "age"])
    _, schema = prepare_table(mixed, "income", categorical=["age"])  # or the column declared categorical
    assert schema.types["age"] == "categorical"
    with pytest.raises(DataError, match="'workclass'"):
        prepare_table(raw, "income", missing="error")
    dropped, _ = prepare_table(raw, "income", missing="drop")
    assert len(dropped) < len(raw) and not dropped.isna().any().any()


# ---- concepts and conditional sampling -----------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(adult):
    """250 real rows encoded with minilm and its default SAE."""
    from saefeat.embed.embedder import SAEEmbedder

    _, table, schema = adult
    rows = table.iloc[:250]
    emb = SAEEmbedder("minilm", cache_dir=False)
    return rows, emb.encode(_serializer(schema).transform(rows), batch_size=64)


@pytest.mark.parametrize("method", ["gaussian_copula", "arf"])
def test_conditional_sampling_returns_only_rows_of_the_concept(adult, encoded, method):
    _, _, schema = adult
    rows, X = encoded
    clusters = ClusterConcepts(n_clusters=3, n_signature=2, seed=0).fit(X, rows, schema)
    assert set(clusters.labels_) == {"c0", "c1", "c2"}
    assert (clusters.predict(X) == clusters.labels_).mean() > 0.95
    for c in clusters.concepts_:  # a cluster's signature latents fire more inside it than outside
        assert c.stats["shows_inside"] > c.stats["shows_outside"]
        assert c.description.startswith("latents #")
    rates = np.asarray((X > 0).mean(axis=0)).ravel()
    latent = int(np.argmin(np.abs(rates - 0.3)))  # a latent that fires on some rows only
    named, yes_no = latent_concept(X, [latent])
    table = rows.assign(sae_concept=clusters.labels_, **{named.column: yes_no})
    synth = ConditionalSynthesizer(schema.with_column("sae_concept").with_column(named.column), method).fit(table)
    for concept in [*clusters.concepts_[:2], named, *label_concepts(X, rows["income"], "income")]:
        out = synth.sample_concept(concept, 60)
        assert len(out) == 60 and (out[concept.column] == concept.value).all(), concept.name
    with pytest.raises(ValueError, match="'nope'"):
        synth.sample_conditions({"nope": "x"}, 5)
    with pytest.raises(ValueError, match="sae_concept='c9'"):
        synth.sample_conditions({"sae_concept": "c9"}, 5)
    with pytest.raises(ValueError, match="out of range"):
        latent_concept(X, [X.shape[1]])


def test_latents_by_label():
    labels = {3: "married couples", 7: "self-employed", 9: "employed by state"}
    assert resolve_latents([3, "#7", "self-emp"], labels) == [3, 7, 7]
    with pytest.raises(ValueError, match="matches 2 latents"):
        resolve_latents("employed", labels)
    with pytest.raises(ValueError, match="no latent labels"):
        resolve_latents("married", None)


# ---- evaluation on rows the synthesizer never saw --------------------------------------------------
def test_metrics_use_only_unseen_rows(adult):
    _, table, schema = adult
    table = table.iloc[:1500]
    train_idx, hold_idx = split_holdout(table, "income", 0.3, seed=0)
    assert len(train_idx.intersection(hold_idx)) == 0 and len(train_idx) + len(hold_idx) == len(table)
    train, holdout = table.loc[train_idx], table.loc[hold_idx]
    synth = ConditionalSynthesizer(schema).fit(train)
    check_disjoint(synth.train_index_, holdout.index)
    synthetic = synth.sample(len(train))
    assert not set(synthetic.index) & set(table.index)

    leaky = pd.concat([holdout, train.iloc[:5]])  # held-out rows that include training rows
    for fn in (lambda h: fidelity(train, synthetic, h, schema, reference=False),
               lambda h: utility(train, synthetic, h, schema, n_boot=10),
               lambda h: privacy(train, synthetic, h, schema),
               lambda h: augmentation(train, synthetic.iloc[:50], h, schema, n_boot=10)):
        with pytest.raises(ValueError, match="5 held-out rows are also training rows"):
            fn(leaky)

    fid, details = fidelity(train, synthetic, holdout, schema)
    assert 0.5 < fid["fidelity_column_shapes"] <= 1 and fid["fidelity_real_column_shapes"] > 0.9
    assert set(details["Column"]) == set(schema.columns)
    util = utility(train, synthetic, holdout, schema, n_boot=20, params={"n_estimators": 60})
    assert util["trtr"]["roc_auc"] > 0.8  # real rows predict income on held-out rows
    assert util["ratio"]["roc_auc"] == pytest.approx(util["tstr"]["roc_auc"] / util["trtr"]["roc_auc"])
    priv = privacy(train, synthetic, holdout, schema)
    assert priv["dcr_holdout_median"] > 0 and priv["dcr_synthetic_median"] > 0
    copy = privacy(train, train.iloc[:100], holdout, schema)  # a "synthesizer" that copies training rows
    assert copy["synthetic_exact_copies"] == 1.0 and copy["dcr_synthetic_median"] == 0.0


def test_concepts_of_rows_not_encoded_are_predicted_and_checked(adult):
    from saefeat.tabular.assign import assign_concepts

    _, table, schema = adult
    encoded, rest = table.iloc[:1200].copy(), table.iloc[1200:2000]
    encoded["older"] = np.where(encoded["age"] > 40, "yes", "no")  # a concept the table columns determine
    encoded["coin"] = np.random.default_rng(0).choice(["a", "b"], len(encoded))  # one they do not
    out, agree = assign_concepts(encoded, rest, schema, ["older", "coin"], seed=0)
    by = agree.set_index("column")
    assert by.loc["older", "agreement"] > 0.97 and by.loc["older", "n_checked"] == 240
    assert by.loc["coin", "agreement"] < 0.6  # no better than a guess: the table says so
    assert list(out.index) == list(rest.index)
    assert (out["older"] == np.where(rest["age"] > 40, "yes", "no")).mean() > 0.97


# ---- the task end to end -------------------------------------------------------------------------
def test_task_runs_end_to_end(data_dir, tmp_path):
    """On 3,000 Adult rows (a copy in tmp_path): 200 encoded, the synthesizer fitted on all 2,400 training rows
    with the concepts of the other 2,200 predicted; a privacy floor no synthesizer meets withholds the table."""
    import mlflow

    from saefeat.config import load_config
    from saefeat.tasks import get_task

    rows = tmp_path / "adult_3000.csv"
    pd.read_csv(data_dir / "tabular" / "adult_train.csv").iloc[:3000].to_csv(rows, index=False)
    cfg = load_config("tasks", ["task=tabular", f"data_dir={data_dir}", f"data.path={rows}", "encode.n_rows=200",
                                "encode.n_holdout=60", "encode.n_per_concept=10", "concepts.n_clusters=3", "n_boot=20",
                                "classifier.n_estimators=60", "synth.method=gaussian_copula",
                                "embed.show_progress_bar=false", "privacy.min_dcr_ratio=10",
                                "privacy.dcr_subsample=300", "embed.precision=fp32"])
    out = get_task("tabular")(cfg)
    # pinned at this commit (fp32); the old protocol (encode.fit_rows=encoded: TRTR and the synthesizer on the 200
    # encoded rows) gives TRTR 0.815, TSTR 0.772. TRTR is LightGBM on fixed rows: only float order moves it. TSTR
    # and the agreement also follow the SAE's clusters of 200 rows, hence wider.
    assert out["utility_trtr_roc_auc"] == pytest.approx(0.9153, abs=0.005)
    assert out["utility_tstr_roc_auc"] == pytest.approx(0.7963, abs=0.02)
    assert out["concept_assignment_agreement"] == pytest.approx(0.875, abs=0.06)
    assert out["n_synth_train_rows"] == 2400 and out["n_encoded_train_rows"] == 200
    assert 0 < out["concept_assignment_agreement"] <= 1 and out["faithfulness_concepts_eligible"] >= 0
    assert 0 <= out["faithfulness_mean_rate"] <= 1 and 0 < out["utility_ratio"] < 1.5
    assert 0 <= out["sdm_dcr_overfitting_protection"] <= 1 and 0 <= out["sdm_dcr_closer_to_training"] <= 1
    assert out["synthetic_published"] == 0.0  # the guard: a DCR ratio of 10 is out of reach
    runs = mlflow.search_runs(experiment_names=["tabular"])
    assert set(runs["tags.representation"].dropna()) == {"real", "synthetic", "augmented"}
    parent = runs[runs["tags.saefeat.role"] == "parent"].iloc[0]
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id)}
    assert {"faithfulness.json", "concepts.json", "concept_assignment.json", "real_vs_synthetic.png",
            "faithfulness.png"} <= arts
    assert "synthetic_sample.json" not in arts and parent["tags.synthetic_table"].startswith("withheld: DCR ratio")
    faith = pd.read_json(mlflow.artifacts.download_artifacts(run_id=parent.run_id, artifact_path="faithfulness.json"),
                         orient="split")
    assert (faith.not_eligible_because == "").eq(faith.meets_target.notna()).all()  # every concept: scored, or why not

    bad = load_config("tasks", ["task=tabular", f"data_dir={data_dir}", "data.categorical=[colour]"])
    with pytest.raises(DataError, match="'colour'"):
        get_task("tabular")(bad)
