"""ToxicityFilter: a linear classifier over any representation, with a threshold chosen for a target
precision or recall, saved and loaded as an MLflow pyfunc model that holds settings, never host weights."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_curve
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

import saefeat
from saefeat.atomic import replace_dir
from saefeat.data import check_texts
from saefeat.embed.config import BaselineConfig, EmbedConfig
from saefeat.errors import MissingFileError, OutputExistsError, SaefeatError
from saefeat.evaluation.model_selection import check_penalty, check_regularization, fit_logistic, penalty_of
from saefeat.representations import REPRESENTATIONS, make_representation

logger = logging.getLogger(__name__)

FORMAT = "saefeat.toxicity_filter"
SETTINGS_FILE, WEIGHTS_FILE, VOCAB_FILE = "filter.json", "weights.npz", "tfidf_vocabulary.json"


def choose_threshold(y_true: Sequence[int], scores: Sequence[float], precision: float | None = None,
                     recall: float | None = None, prior: float | None = None) -> float:
    """The score threshold (flag when score >= threshold) that meets a target precision or recall.

    For a target precision, the lowest threshold whose precision reaches it (the most recall at that
    precision); for a target recall, the highest threshold whose recall reaches it. Precision is computed
    at the base rate `prior` of the deployment (default: the rate in `y_true`), from the true and false
    positive rates, so a balanced validation set can stand in for a rare-positive stream. When no
    threshold reaches the target precision, the most precise one is returned with a warning.
    """
    if (precision is None) == (recall is None):
        raise SaefeatError("give exactly one of precision= or recall=")
    target = precision if precision is not None else recall
    if not 0 < target <= 1:
        raise SaefeatError(f"the target must be in (0, 1], got {target}")
    y = np.asarray(y_true).astype(int)
    if len(np.unique(y)) < 2:
        raise SaefeatError("choosing a threshold needs both toxic (1) and non-toxic (0) examples")
    fpr, tpr, thr = roc_curve(y, np.asarray(scores, dtype=float), drop_intermediate=False)
    pi = float(y.mean()) if prior is None else float(prior)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tpr + fpr > 0, pi * tpr / (pi * tpr + (1 - pi) * fpr), 1.0)
    usable = np.isfinite(thr) & (tpr > 0)
    if recall is not None:
        return float(thr[np.flatnonzero(usable & (tpr >= recall))[0]])
    ok = np.flatnonzero(usable & (prec >= precision))
    if len(ok):
        return float(thr[ok[-1]])
    best = np.flatnonzero(usable)[np.argmax(prec[usable])]
    logger.warning("no threshold reaches precision %.3f at base rate %.3f; using the most precise one "
                   "(precision %.3f, recall %.3f)", precision, pi, prec[best], tpr[best])
    return float(thr[best])


class ToxicityFilter(ClassifierMixin, BaseEstimator):
    """Flag toxic texts with a logistic regression over `sae`, `dense`, `sentence` or `tfidf` features.

    Args:
        representation: the feature space (see `saefeat.make_representation`).
        representation_params: its settings, JSON-able: {"embed": EmbedConfig fields, "baselines":
            BaselineConfig fields}, either part optional (see `representation_settings`).
        C, penalty, max_iter: of the logistic regression (features are max-abs scaled if sparse, else
            standardised); `C` may be a grid and `penalty` ("l2", or "l1" for a sparse filter) a list, from which
            stratified 5-fold cross-validation on the training texts picks (ROC-AUC; `C_` and `penalty_` are the
            values used).
        target, target_value: the threshold is chosen on calibration data for this precision or recall.
        prior: toxic base rate at which precision is computed (default: the calibration data's own rate).

    The fitted weights are folded back onto the unscaled features (`coef_`, `intercept_`), so the latent
    weights of an `sae` filter read directly as gradient of the toxic logit per unit of activation.
    """

    def __init__(self, representation: str = "sae", representation_params: dict[str, Any] | None = None,
                 C: float | Sequence[float] = 1.0, max_iter: int = 2000, target: str = "precision",
                 target_value: float = 0.9, prior: float | None = None, penalty: str | Sequence[str] = "l2"):
        self.representation, self.representation_params = representation, representation_params
        self.C, self.penalty, self.max_iter = C, penalty, max_iter
        self.target, self.target_value, self.prior = target, target_value, prior

    # ---- fitting ---------------------------------------------------------------------------------
    def _check_settings(self) -> None:
        if self.representation not in REPRESENTATIONS:
            raise SaefeatError(f"unknown representation {self.representation!r}; valid: {', '.join(REPRESENTATIONS)}")
        if self.target not in ("precision", "recall"):
            raise SaefeatError(f"target must be 'precision' or 'recall', got {self.target!r}")

    @staticmethod
    def _check_xy(texts: Sequence[str], labels: Sequence[int], what: str) -> tuple[list[str], np.ndarray]:
        if isinstance(texts, str):
            raise SaefeatError(f"{what}: expected a list of texts, got a single string")
        texts = check_texts(list(texts), source=what, field="texts")
        y = np.asarray(labels)
        if len(y) != len(texts):
            raise SaefeatError(f"{what}: {len(texts)} texts but {len(y)} labels")
        bad = np.flatnonzero(~np.isin(y, [0, 1]))
        if len(bad):
            raise SaefeatError(f"{what}: labels must be 0/1; rows {bad[:10].tolist()} are not (e.g. {y[bad[0]]!r})")
        if len(np.unique(y)) < 2:
            raise SaefeatError(f"{what}: the labels hold one class only")
        return texts, y.astype(int)

    def fit(self, texts: Sequence[str], labels: Sequence[int], calib_texts: Sequence[str] | None = None,
            calib_labels: Sequence[int] | None = None) -> ToxicityFilter:
        """Fit the classifier; choose the threshold on (calib_texts, calib_labels) when given, else use 0.5."""
        self._check_settings()
        check_regularization(self.C)
        check_penalty(self.penalty)
        texts, y = self._check_xy(texts, labels, "training data")
        if calib_texts is not None:
            calib_texts, calib_y = self._check_xy(calib_texts, calib_labels, "calibration data")
        self.representation_ = make_representation(self.representation, *_settings(self.representation_params))
        X = self.representation_.fit_transform(texts)
        scaler = MaxAbsScaler() if sp.issparse(X) else StandardScaler()
        Xs = scaler.fit_transform(X)
        lr = fit_logistic(Xs, y, self.C, penalty=self.penalty, max_iter=self.max_iter)
        self.C_, self.penalty_ = float(lr.C), penalty_of(lr)
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        self.coef_ = lr.coef_.ravel() / scale
        mean = getattr(scaler, "mean_", None)  # w.(x - m)/s + b = (w/s).x + b - (w/s).m
        self.intercept_ = float(lr.intercept_[0]) - (float(mean @ self.coef_) if mean is not None else 0.0)
        self.classes_ = np.array([0, 1])
        self.threshold_ = 0.5
        self.fingerprint_ = _fingerprint(self.representation_)
        if calib_texts is not None:
            self.calibrate(calib_texts, calib_y)
        return self

    def calibrate(self, texts: Sequence[str], labels: Sequence[int]) -> float:
        """Choose and store `threshold_` on held-out data for the configured target precision or recall."""
        texts, y = self._check_xy(texts, labels, "calibration data")
        kw = {self.target: float(self.target_value)}
        self.threshold_ = choose_threshold(y, self.predict_proba(texts)[:, 1], prior=self.prior, **kw)
        return self.threshold_

    # ---- inference -------------------------------------------------------------------------------
    def _fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise SaefeatError("this ToxicityFilter is not fitted; call fit() or ToxicityFilter.load()")

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix | np.ndarray:
        """The features the classifier reads."""
        self._fitted()
        if isinstance(texts, str):
            raise SaefeatError("expected a list of texts, got a single string")
        return self.representation_.transform(list(texts))

    def decision_function(self, texts: Sequence[str]) -> np.ndarray:
        """The toxic logit of each text."""
        X = self.transform(texts)
        return np.asarray(X @ self.coef_).ravel() + self.intercept_

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 2) probabilities of non-toxic and toxic."""
        p = expit(self.decision_function(texts))
        return np.column_stack([1 - p, p])

    def predict(self, texts: Sequence[str], threshold: float | None = None) -> np.ndarray:
        """1 where the toxic probability reaches the threshold (default: the calibrated `threshold_`)."""
        t = self.threshold_ if threshold is None else float(threshold)
        return (self.predict_proba(texts)[:, 1] >= t).astype(int)

    def filter(self, texts: Sequence[str], threshold: float | None = None) -> list[str]:
        """The texts that pass: those not flagged as toxic, in input order."""
        texts = list(texts)
        return [t for t, flag in zip(texts, self.predict(texts, threshold)) if not flag]

    # ---- persistence -----------------------------------------------------------------------------
    def _write_files(self, folder: Path) -> None:
        self._fitted()
        settings = {"format": FORMAT, "saefeat_version": saefeat.__version__, "params": self.get_params(),
                    "intercept": self.intercept_, "threshold": self.threshold_, "fingerprint": self.fingerprint_}
        (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        arrays = {"coef": self.coef_}
        if self.representation == "tfidf":
            arrays["idf"] = self.representation_.idf_
            vocab = {k: int(v) for k, v in self.representation_.vocabulary_.items()}
            (folder / VOCAB_FILE).write_text(json.dumps(vocab))
        np.savez(folder / WEIGHTS_FILE, **arrays)

    @classmethod
    def _read_files(cls, folder: Path) -> ToxicityFilter:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
        if settings.get("format") != FORMAT:
            raise SaefeatError(f"{folder / SETTINGS_FILE}: not a saefeat toxicity filter")
        self = cls(**settings["params"])
        self._check_settings()
        with np.load(folder / WEIGHTS_FILE, allow_pickle=False) as npz:
            self.coef_ = npz["coef"]
            idf = npz["idf"] if "idf" in npz.files else None
        self.intercept_, self.threshold_ = float(settings["intercept"]), float(settings["threshold"])
        self.classes_ = np.array([0, 1])
        self.representation_ = make_representation(self.representation, *_settings(self.representation_params))
        if self.representation == "tfidf":
            self.representation_.vocabulary_ = json.loads((folder / VOCAB_FILE).read_text())
            self.representation_.idf_ = idf
        self.fingerprint_ = _fingerprint(self.representation_)
        stored = settings["fingerprint"]
        if stored != self.fingerprint_:
            raise SaefeatError(f"{folder}: the filter was fitted on {stored}, but its settings now give "
                             f"{self.fingerprint_}; its weights do not apply to these features")
        return self

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write an MLflow pyfunc model folder (settings and weights; the embedder is rebuilt on load). An existing
        folder is replaced only with `overwrite=True` and only when it holds a saefeat filter, in one swap."""
        self._fitted()
        path = Path(path)
        if path.exists():
            if not overwrite:
                raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
            if _filter_files(path) is None:
                raise OutputExistsError(f"{path} exists and is not a saefeat toxicity filter; refusing to replace it")

        def write(tmp: Path) -> None:
            files = tmp / "filter"
            files.mkdir()
            self._write_files(files)
            with _quiet_mlflow():
                mlflow.pyfunc.save_model(str(tmp / "model"), **self._pyfunc_kwargs(files))

        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            write(staging)
            replace_dir(staging / "model", path)  # the folder appears complete or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return path

    def log_model(self, name: str = "toxicity_filter") -> str:
        """Log the filter to the active MLflow run; returns the model URI."""
        self._fitted()
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / "filter"
            files.mkdir()
            self._write_files(files)
            with _quiet_mlflow():
                info = mlflow.pyfunc.log_model(name=name, **self._pyfunc_kwargs(files))
        return info.model_uri

    @staticmethod
    def _pyfunc_kwargs(files: Path) -> dict[str, Any]:
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        signature = ModelSignature(inputs=Schema([ColSpec("string")]),  # a list of texts, or one text column
                                   outputs=Schema([ColSpec("double", "toxicity"), ColSpec("long", "toxic")]))
        # models from code (no pickle); explicit requirements (inferring them would load the model in a subprocess)
        return {"python_model": str(Path(__file__).with_name("pyfunc_entry.py")), "artifacts": {"filter": str(files)},
                "signature": signature, "pip_requirements": [f"saefeat=={saefeat.__version__}"]}

    @classmethod
    def load(cls, uri: str | Path) -> ToxicityFilter:
        """Load a filter saved by `save` or `log_model` (a folder, or an MLflow URI such as runs:/ID/name).

        Only data is read (settings JSON and npz weights); no code from the folder runs, so loading an untrusted
        filter is safe. (Serving it with `mlflow.pyfunc.load_model` runs the folder's copy of the entry point.)"""
        folder = Path(uri)
        if not folder.exists():
            if "://" not in str(uri) and not str(uri).startswith("runs:/"):
                raise MissingFileError(f"{uri}: no such filter folder")
            folder = Path(mlflow.artifacts.download_artifacts(str(uri)))
        if not (folder / "MLmodel").is_file():
            raise SaefeatError(f"{uri}: not an MLflow model folder (no MLmodel file)")
        files = _filter_files(folder)
        if files is None:
            raise SaefeatError(f"{uri}: not a saefeat toxicity filter (no artifacts/filter/{SETTINGS_FILE})")
        return cls._read_files(files)


def _filter_files(folder: Path) -> Path | None:
    """The data folder of a saved filter, or None when `folder` is not one."""
    files = Path(folder) / "artifacts" / "filter"
    try:
        ok = json.loads((files / SETTINGS_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return None
    return files if ok else None


class ToxicityFilterModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a ToxicityFilter: `predict` takes a `text` column (or a list of strings)."""

    def load_context(self, context) -> None:
        self.filter = ToxicityFilter._read_files(Path(context.artifacts["filter"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text" if "text" in model_input.columns else model_input.columns[0]].tolist()
        else:
            texts = list(model_input)
        p = self.filter.predict_proba(texts)[:, 1]
        return pd.DataFrame({"toxicity": p, "toxic": (p >= self.filter.threshold_).astype(np.int64)})


def representation_settings(embed: EmbedConfig, baselines: BaselineConfig | None = None) -> dict[str, Any]:
    """`representation_params` of a filter from the typed settings (JSON-able, so saved models can rebuild it)."""
    return {"embed": embed.to_dict(), "baselines": asdict(baselines or BaselineConfig())}


def _settings(params: dict[str, Any] | None) -> tuple[EmbedConfig, BaselineConfig]:
    params = params or {}
    unknown = sorted(set(params) - {"embed", "baselines"})
    if unknown:
        raise SaefeatError(f"representation_params takes 'embed' and 'baselines' sections, got {unknown}")
    return EmbedConfig(**params.get("embed", {})), BaselineConfig(**params.get("baselines", {}))


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Silence MLflow's advice to add an input example (one would make it load the host to run it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        yield


def _fingerprint(rep: Any) -> dict[str, Any]:
    """What fixes the meaning of each feature: host weights, layer and SAE for `sae` and `dense`."""
    emb = getattr(rep, "embedder", None)
    if emb is None:
        return {}
    out = {"host_fingerprint": emb.host.fingerprint, "layer": emb.layer}
    if type(rep).__name__ == "SAEVectorizer":
        out["sae"] = emb.sae.content_hash
    return out
