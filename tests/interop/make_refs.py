"""Reference SAEs for tests/test_sae_interop.py, made with the real sae-lens and eai-sparsify packages.

Run with the interop venv (``make interop-venv``), never the project's:

    .venv-interop/bin/python tests/interop/make_refs.py OUT

Each case is built with the library's own classes, given random weights (decoder rows of unequal, non-unit norm,
non-zero biases, positive thresholds), saved with the library's own save method and read back with the library's
own loader, whose encode / decode on one fixed input are the references. Writes ``OUT/x.npy``, ``OUT/cases.json``
(name, folder, library versions, notes) and ``OUT/refs/<name>.npz`` (``enc``: the dense code of x, ``dec``: the
decoding of that code).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

D_IN, D_SAE, K, ROWS = 384, 512, 16, 64
OUT = Path(sys.argv[1])
(OUT / "refs").mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)


def fill(module: torch.nn.Module, seed: int) -> None:
    """Random weights a trained SAE could have: the defaults (zero biases, unit decoder rows) hide bugs."""
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "topk_threshold":
                value = torch.full(t.shape, 0.35)
            elif leaf == "threshold":
                value = uniform(t.shape, 0.05, 0.6)
            elif leaf == "log_threshold":
                value = uniform(t.shape, 0.05, 0.6).log()
            elif t.dim() == 2:
                value = torch.randn(t.shape, generator=gen) / D_IN**0.5
                if leaf == "W_dec":  # rows of norm 0.25 .. 1.75
                    value *= uniform((t.shape[0], 1), 0.25, 1.75) / value.norm(dim=-1, keepdim=True)
            else:
                value = 0.3 * torch.randn(t.shape, generator=gen)
            t.copy_(value.to(t.dtype))


X = 0.1 + torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(0))  # unit scale: fp32 noise ~1e-6
cases: list[dict] = []


def record(name: str, folder: Path, enc: torch.Tensor, dec: torch.Tensor, **notes: object) -> None:
    enc, dec = enc.detach().float().reshape(ROWS, -1), dec.detach().float().reshape(ROWS, -1)
    np.savez(OUT / "refs" / f"{name}.npz", enc=enc.numpy(), dec=dec.numpy())
    cases.append({"name": name, "folder": str(folder), **notes})


# ------------------------------------------------------------------------------------------------------ SAELens
import sae_lens  # noqa: E402
from sae_lens import SAE, TrainingSAE  # noqa: E402
from sae_lens.saes import sae as lens_sae  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

LENS = {"library": "sae-lens", "version": sae_lens.__version__}


def lens(name: str, cls: str, hook: str = "blocks.3.hook_resid_post", save: str = "save_model", seed: int = 0,
         x: torch.Tensor | None = None, ref_dtype: str | None = None, **cfg_kw: object) -> Path:
    """An SAELens SAE of class `cls`, saved with `save`; the reference is the library's reload of the folder.
    A trainer checkpoint (`save_model` of a training class) is read back with TrainingSAE."""
    sae_cls = getattr(sae_lens, cls)
    cfg = getattr(sae_lens, f"{cls}Config")(d_in=D_IN, d_sae=D_SAE, metadata=lens_sae.SAEMetadata(
        hook_name=hook, model_name="minilm", context_size=128), **cfg_kw)
    model = sae_cls(cfg)
    fill(model, seed)
    folder = OUT / "saes" / name
    getattr(model, save)(folder)
    training = issubclass(sae_cls, TrainingSAE) and save == "save_model"
    ref = (TrainingSAE if training else SAE).load_from_disk(folder, dtype=ref_dtype).eval()
    xin = X if x is None else x
    with torch.no_grad():
        enc = ref.encode(xin)
        record(name, folder, enc, ref.decode(enc), **LENS, saved_with=f"{cls}.{save}")
    return folder


for b in (True, False):
    tag = f"bdec{int(b)}"
    lens(f"lens_standard_{tag}", "StandardSAE", apply_b_dec_to_input=b, seed=1 + b)
    lens(f"lens_jumprelu_{tag}", "JumpReLUSAE", apply_b_dec_to_input=b, seed=3 + b)
    lens(f"lens_topk_{tag}", "TopKSAE", k=K, apply_b_dec_to_input=b, seed=5 + b)
lens("lens_topk_rescale", "TopKSAE", k=K, rescale_acts_by_decoder_norm=True, seed=7)
lens("lens_topk_training_ckpt", "TopKTrainingSAE", k=K, seed=8)  # rescale_acts_by_decoder_norm=True by default
lens("lens_topk_training_inference", "TopKTrainingSAE", save="save_inference_model", k=K, seed=9)
lens("lens_batchtopk_inference", "BatchTopKTrainingSAE", save="save_inference_model", k=K, seed=10)
lens("lens_standard_resid_pre", "StandardSAE", hook="blocks.3.hook_resid_pre", seed=11)
lens("lens_topk_resid_pre", "TopKSAE", hook="blocks.3.hook_resid_pre", k=K, seed=12)
lens("lens_standard_resid_pre0", "StandardSAE", hook="blocks.0.hook_resid_pre", seed=13)
lens("lens_standard_mlp_out", "StandardSAE", hook="blocks.3.hook_mlp_out", seed=14)
lens("lens_jumprelu_attn_out", "JumpReLUSAE", hook="blocks.3.hook_attn_out", seed=15)
lens("lens_standard_hook_z", "StandardSAE", hook="blocks.3.attn.hook_z", reshape_activations="hook_z", seed=16,
     x=X.reshape(ROWS, 6, 64))
lens("lens_standard_norm_expavg", "StandardSAE", normalize_activations="expected_average_only_in", seed=17)
lens("lens_standard_norm_layernorm", "StandardSAE", normalize_activations="layer_norm", seed=18)
lens("lens_jumprelu_bf16", "JumpReLUSAE", dtype="bfloat16", ref_dtype="float32", seed=19)
lens("lens_gated", "GatedSAE", seed=20)


def batchtopk_checkpoint(name: str, cls: str, seed: int, **cfg_kw: object) -> None:
    """A BatchTopK-family trainer checkpoint (`save_model`: scalar topk_threshold, decoder norms unfolded). Its
    inference behaviour is what SAELens makes of it for inference: `save_inference_model` of the reloaded
    checkpoint, read back as an inference SAE (JumpReLU)."""
    sae_cls = getattr(sae_lens, cls)
    model = sae_cls(getattr(sae_lens, f"{cls}Config")(d_in=D_IN, d_sae=D_SAE, k=K, metadata=lens_sae.SAEMetadata(
        hook_name="blocks.3.hook_resid_post", model_name="minilm"), **cfg_kw))
    fill(model, seed)
    folder = OUT / "saes" / name
    model.save_model(folder)
    converted = OUT / "converted" / name
    TrainingSAE.load_from_disk(folder).save_inference_model(converted)
    ref = SAE.load_from_disk(converted).eval()
    with torch.no_grad():
        enc = ref.encode(X)
        record(name, folder, enc, ref.decode(enc), **LENS, saved_with=f"{cls}.save_model",
               reference=f"{type(ref).__name__} from save_inference_model")


batchtopk_checkpoint("lens_batchtopk_training_ckpt", "BatchTopKTrainingSAE", seed=21)
batchtopk_checkpoint("lens_matryoshka_training_ckpt", "MatryoshkaBatchTopKTrainingSAE", seed=22,
                     matryoshka_widths=[128, 512])


def scaling_factor_case(name: str, scale: torch.Tensor, flag: bool, seed: int) -> None:
    """Older SAELens files hold `scaling_factor` (d_sae,), multiplied into the activations before decoding when
    `finetuning_scaling_factor` is set. sae-lens 6 has no such parameter and cannot write it, so the file is a
    StandardSAE's own, with the tensor and the flag added by hand; the reference is the library's encode, and its
    decode of the code multiplied by the factor (what older SAELens computed)."""
    folder = lens(name, "StandardSAE", seed=seed)
    ref = SAE.load_from_disk(folder).eval()
    with torch.no_grad():
        enc = ref.encode(X)
        dec = ref.decode(enc * scale) if flag else ref.decode(enc)
    tensors = load_file(str(folder / "sae_weights.safetensors")) | {"scaling_factor": scale.contiguous()}
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | {"finetuning_scaling_factor": flag}))
    try:
        SAE.load_from_disk(folder)
        lens_reads = "yes"
    except Exception as e:  # recorded: whether sae-lens 6 itself reads the hand-made file
        lens_reads = f"{type(e).__name__}: {e}"
    cases.pop()  # replace lens()'s record: same folder, now with the factor
    record(name, folder, enc, dec, **LENS, saved_with="StandardSAE.save_model + scaling_factor added by hand",
           sae_lens_reads_it=lens_reads)


gen = torch.Generator().manual_seed(23)
scaling_factor_case("lens_scaling_factor", 0.5 + 1.5 * torch.rand(D_SAE, generator=gen), True, seed=24)
scaling_factor_case("lens_scaling_factor_ones", torch.ones(D_SAE), False, seed=25)

# ----------------------------------------------------------------------------------------------------- sparsify
import sparsify  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

SPARSIFY = {"library": "eai-sparsify", "version": sparsify.__version__}


def sparse_coder(name: str, hookpoint: str, seed: int, **cfg_kw: object) -> None:
    model = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, **cfg_kw))
    fill(model, seed)
    folder = OUT / "saes" / name / hookpoint
    model.save_to_disk(folder)
    ref = SparseCoder.load_from_disk(folder)
    with torch.no_grad():
        top = ref.encode(X)
        enc = torch.zeros(ROWS, D_SAE).scatter_(-1, top.top_indices, top.top_acts)
        record(name, folder, enc, ref.decode(top.top_acts, top.top_indices), **SPARSIFY,
               saved_with="SparseCoder.save_to_disk")


sparse_coder("sp_topk_layers3", "layers.3", seed=30)
sparse_coder("sp_topk_mlp", "layers.3.mlp", seed=31)
sparse_coder("sp_topk_attn", "layers.3.self_attn", seed=32)
sparse_coder("sp_topk_h3", "h.3", seed=33)
sparse_coder("sp_topk_plain_name", "my_sae", seed=34)
sparse_coder("sp_groupmax", "layers.3", seed=35, activation="groupmax")
sparse_coder("sp_transcoder", "layers.3.mlp", seed=36, transcode=True)
sparse_coder("sp_transcoder_skip", "layers.3.mlp", seed=37, transcode=True, skip_connection=True)
sparse_coder("sp_multi_topk", "layers.3", seed=38, multi_topk=True)

np.save(OUT / "x.npy", X.numpy())
(OUT / "cases.json").write_text(json.dumps(
    {"torch": torch.__version__, "sae_lens": sae_lens.__version__, "sparsify": sparsify.__version__,
     "cases": cases}, indent=1))
print(f"{len(cases)} cases in {OUT}")
