"""saefeat against the real sae-lens and eai-sparsify: SAEs built and saved by the libraries themselves
(tests/interop/make_refs.py, run in the separate `.venv-interop` of `make interop-venv`) must give the libraries'
own encode / decode to 1e-5, or be refused with a SaefeatError naming the flag or site.

Skipped when the interop venv is missing (SAEFEAT_REQUIRE_INTEROP=1 makes that a failure, for CI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saefeat.errors import SaefeatError, SAEFormatError, SAESiteError
from saefeat.sae.formats import check_compatible, load_sae
from saefeat.sae.sites import read_point

REPO = Path(__file__).resolve().parent.parent
PYTHON = Path(os.environ.get("SAEFEAT_INTEROP_PYTHON", REPO / ".venv-interop" / "bin" / "python"))
TOL = 1e-5

if not PYTHON.is_file():
    reason = f"interop venv not found ({PYTHON}); build it with `make interop-venv`"
    if os.environ.get("SAEFEAT_REQUIRE_INTEROP") == "1":
        pytest.fail(reason + " (SAEFEAT_REQUIRE_INTEROP=1)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)

# name -> (site, layer) for SAEs that must load and match the library
MATCH = {
    "lens_standard_bdec1": ("resid_post", 3), "lens_standard_bdec0": ("resid_post", 3),
    "lens_jumprelu_bdec1": ("resid_post", 3), "lens_jumprelu_bdec0": ("resid_post", 3),
    "lens_topk_bdec1": ("resid_post", 3), "lens_topk_bdec0": ("resid_post", 3),
    "lens_topk_rescale": ("resid_post", 3),  # rescale_acts_by_decoder_norm, decoder norms folded at load
    "lens_topk_training_ckpt": ("resid_post", 3),  # the same flag in a trainer checkpoint (save_model)
    "lens_topk_training_inference": ("resid_post", 3),
    "lens_batchtopk_inference": ("resid_post", 3),
    "lens_batchtopk_training_ckpt": ("resid_post", 3),  # scalar topk_threshold
    "lens_matryoshka_training_ckpt": ("resid_post", 3),
    "lens_scaling_factor": ("resid_post", 3),  # an older file's scaling_factor, folded into W_dec
    "lens_scaling_factor_ones": ("resid_post", 3),
    "lens_standard_norm_expavg": ("resid_post", 3),
    "lens_jumprelu_bf16": ("resid_post", 3),  # against SAELens run in fp32 on the same bf16 file
    "lens_standard_resid_pre": ("resid_pre", 3), "lens_topk_resid_pre": ("resid_pre", 3),
    "lens_standard_resid_pre0": ("resid_pre", 0),
    "lens_standard_mlp_out": ("mlp_out", 3), "lens_jumprelu_attn_out": ("attn_out", 3),
    "lens_standard_hook_z": ("attn_z", 3),
    "sp_topk_layers3": ("resid_post", 3), "sp_topk_h3": ("resid_post", 3), "sp_multi_topk": ("resid_post", 3),
    "sp_topk_mlp": ("mlp_out", 3), "sp_topk_attn": ("attn_out", 3), "sp_topk_plain_name": ("unknown", None),
}
# name -> what the refusal must name
REFUSE = {
    "sp_groupmax": "activation='groupmax'",
    "sp_transcoder": "transcode=true",
    "sp_transcoder_skip": "transcode=true",
    "lens_standard_norm_layernorm": "normalize_activations='layer_norm'",
    "lens_gated": "architecture 'gated'",
}
# where saefeat must read for a readable site, and the point of a wrong one
POINTS = {"resid_post": (3, "output"), "resid_pre": (3, "input")}


@pytest.fixture(scope="session")
def refs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(PYTHON), str(REPO / "tests" / "interop" / "make_refs.py"), str(out)], env=env,
                         capture_output=True, text=True, timeout=900, cwd=out)
    if run.returncode:
        pytest.fail(f"make_refs.py failed ({run.returncode}):\n{run.stderr[-4000:]}", pytrace=False)
    return out


@pytest.fixture(scope="session")
def cases(refs) -> dict[str, dict]:
    doc = json.loads((refs / "cases.json").read_text())
    return {c["name"]: c for c in doc["cases"]}


@pytest.fixture(scope="session")
def x(refs) -> torch.Tensor:
    return torch.from_numpy(np.load(refs / "x.npy"))


def test_every_reference_case_is_checked(cases):
    assert set(cases) == set(MATCH) | set(REFUSE)


@pytest.mark.parametrize("name", sorted(MATCH))
def test_matches_the_library(name, cases, refs, x):
    """encode(x), decode(library code) and the embedder's encode_sparse agree with the library to 1e-5."""
    ref = np.load(refs / "refs" / f"{name}.npz")
    sae = load_sae(cases[name]["folder"])
    want_enc, want_dec = torch.from_numpy(ref["enc"]), torch.from_numpy(ref["dec"])
    with torch.no_grad():
        enc = sae.encode(x)
        dec = sae.decode(want_enc)
        rows, cols, vals = sae.encode_sparse(x)
    sparse = torch.zeros_like(enc).index_put_((rows, cols), vals)
    assert float((enc - want_enc).abs().max()) <= TOL
    assert float((dec - want_dec).abs().max()) <= TOL
    assert float((sparse - want_enc).abs().max()) <= TOL
    assert bool(((enc != 0) == (want_enc != 0)).all())
    assert (sae.cfg.site, sae.cfg.layer) == MATCH[name]


@pytest.mark.parametrize("name", sorted(REFUSE))
def test_refused_by_name(name, cases):
    with pytest.raises(SAEFormatError) as err:
        load_sae(cases[name]["folder"])
    assert REFUSE[name] in str(err.value)


@pytest.mark.parametrize("name", sorted(MATCH))
def test_site_decides_where_saefeat_reads(name, cases):
    """resid_post L is read at block L's output, resid_pre L at its input; any other site is refused by name,
    and check_compatible refuses a wrong block."""
    sae = load_sae(cases[name]["folder"])
    site, layer = MATCH[name]
    if site in POINTS and layer == 3:
        assert read_point(sae.cfg) == POINTS[site]
        block = 3 if site == "resid_post" else 2  # resid_pre of block 3 is block 2's output
        check_compatible(sae, "minilm", 384, block, "output")
        with pytest.raises(SAESiteError, match="trained on layer 3"):
            check_compatible(sae, "minilm", 384, block + 1, "output")
    elif site == "resid_pre":
        assert read_point(sae.cfg) == (0, "input")  # the embeddings' output
        with pytest.raises(SAESiteError):
            check_compatible(sae, "minilm", 384, 0, "output")
    else:
        for call in (lambda: read_point(sae.cfg), lambda: check_compatible(sae, "minilm", 384, 3)):
            with pytest.raises(SAESiteError) as err:
                call()
            assert f"site {site!r}" in str(err.value) and repr(sae.cfg.hook_name) in str(err.value)


def test_refusals_are_saefeat_errors():
    assert issubclass(SAEFormatError, SaefeatError) and issubclass(SAESiteError, SaefeatError)


def test_hand_made_scaling_factor_file_is_one_sae_lens_6_cannot_read(cases):
    """sae-lens 6 has no scaling_factor parameter, so that case is hand-made: it says so, and saefeat reads it."""
    assert cases["lens_scaling_factor"]["sae_lens_reads_it"] != "yes"
    assert cases["lens_scaling_factor_ones"]["sae_lens_reads_it"] == "yes"


def test_interop_venv_keeps_its_own_torch():
    """The reference venv runs the CPU torch the project pins, not one sae-lens resolved on its own."""
    out = subprocess.run([str(PYTHON), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                         text=True, timeout=300)
    assert out.stdout.strip().startswith("2.13.0") and "+cpu" in out.stdout, out.stdout + out.stderr
    assert sys.executable != str(PYTHON)
