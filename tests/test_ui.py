"""`saefeat ui` over a real task run: the server answers on a loopback port with the run, its children, their
params and artifacts (MLflow's REST API, no browser), the printed link opens the comparison view, and stopping
the command stops every server process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import psutil
import pytest
import torch

from saefeat.device import resolve_runtime
from saefeat.ui import SHARED_VIEW_TAG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, **query) -> dict:
    q = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in query.items())
    with urllib.request.urlopen(f"{base}/api/2.0/mlflow/{path}?{q}", timeout=10) as r:
        return json.load(r)


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


@pytest.fixture
def task_run(data_dir):
    """A small real shortcut run (children `<method>/<representation>`) in this test's store."""
    from saefeat.config import load_config
    from saefeat.tasks.shortcut import run

    cfg = load_config("tasks", ["task=shortcut", f"data_dir={data_dir}", "max_train=24", "max_eval=16",
                                "bootstrap=20", "head.epochs=30", "head.weight_decays=[0.001]", "dbr.lambdas=[1.0]",
                                "methods=[erm,dbr_sae]", "representations=[sae,dense]", "detect.n_candidates=8",
                                "detect.n_latents=3", "detect.contexts_per_latent=3",
                                "embed.show_progress_bar=false"])
    return run(cfg)


def test_children_carry_what_ran_and_tags_that_match_their_params(task_run):
    exp = mlflow.get_experiment_by_name("shortcut")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    runs = mlflow.search_runs([exp.experiment_id])
    parent = runs[runs["tags.saefeat.role"] == "parent"].iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent.run_id]
    assert sorted(children["tags.mlflow.runName"]) == ["dbr_sae/dense", "dbr_sae/sae", "erm/dense", "erm/sae"]
    ran = resolve_runtime(torch.device("cpu"), "auto", "auto")  # bf16 torch, or int8 ONNX without native bf16
    from saefeat.config import load_config

    embed = load_config("tasks", ["task=shortcut"]).embed  # the task's defaults: minilm's layer-3 SAE, sum pooling
    for _, c in children.iterrows():
        assert c["tags.representation"] == c["params.representation"] in ("sae", "dense")
        assert c["tags.method"] == c["params.method"] and c["tags.mlflow.runName"] == f"{c['tags.method']}/" \
            f"{c['tags.representation']}"
        assert c["params.host"] == "minilm" and c["params.layer"] == str(embed.layer) == "3"
        assert (c["params.backend"], c["params.precision"]) == (ran.backend, ran.precision)  # as resolved here
        assert c["params.hook"] and len(c["params.host_fingerprint"]) == 16 and c["params.device"] == "cpu"
        assert c["metrics.fit_seconds"] > 0 and c["metrics.embed_seconds"] >= 0
        assert "metrics.lambda" not in c or c.isna()["metrics.lambda"]  # λ is a param
        sae = c["tags.representation"] == "sae"
        assert (c["params.sae_hash"] not in (None, "none")) == sae  # a dense child names no SAE
        assert c["params.pooling"] == (embed.pooling if sae else "mean") and embed.pooling == "sum"
        names = {a.path for a in mlflow.MlflowClient().list_artifacts(c.run_id)}
        assert ("shortcut_latents.html" in names) == sae  # every SAE child carries the latent report
    assert set(runs.groupby("tags.representation").groups) == {"sae", "dense"}  # one group per representation
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id)}
    assert {"comparison.json", "comparison.png", "summary.html"} <= files
    assert parent["metrics.wall_seconds"] > 0 and "metrics.seconds" not in runs


def test_ui_serves_the_run_and_stops_with_all_its_workers(task_run, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "saefeat.cli", "ui", f"port={port}",
                             "workers=1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        link = ""
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if (m := re.search(r"(http://\S+viewStateShareKey=\S+)", line)) is not None:
                link = m.group(1)
                break
            assert proc.poll() is None, line
        assert link.startswith(f"{base}/#/experiments/") and "workflowType=machine_learning" in link
        while time.time() < deadline:  # the server starts
            try:
                _get(base, "experiments/get-by-name", experiment_name="shortcut")
                break
            except OSError:
                time.sleep(0.5)
        exp = _get(base, "experiments/get-by-name", experiment_name="shortcut")["experiment"]
        key = link.split("viewStateShareKey=")[1].split("&")[0]
        tags = {t["key"]: t["value"] for t in exp["tags"]}
        view = json.loads(tags[f"{SHARED_VIEW_TAG}{key}"])  # the view the link opens: this run's children
        found = _post(base, "runs/search", {"experiment_ids": [exp["experiment_id"]],
                                            "filter": view["searchFilter"]})["runs"]
        assert sorted(r["info"]["run_name"] for r in found) == ["dbr_sae/dense", "dbr_sae/sae", "erm/dense",
                                                              "erm/sae"]
        assert "metrics.`ood_accuracy`" in view["selectedColumns"]
        assert "params.`representation`" in view["selectedColumns"]
        params = {p["key"]: p["value"] for p in found[0]["data"]["params"]}
        assert {"representation", "method", "host", "layer", "precision", "backend"} <= set(params)
        server = psutil.Process(proc.pid).children(recursive=True)  # the MLflow server and its workers
        assert server
        parent_id = found[0]["data"]["tags"][[t["key"] for t in found[0]["data"]["tags"]].index(
            "mlflow.parentRunId")]["value"]
        artifacts = {f["path"] for f in _get(base, "artifacts/list", run_id=parent_id)["files"]}
        assert {"comparison.png", "summary.html", "comparison.json"} <= artifacts
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # the command only: it must take the server's workers with it
        proc.wait(timeout=60)
    _, alive = psutil.wait_procs(server, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
