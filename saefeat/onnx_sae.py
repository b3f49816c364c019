"""A TopK SAE's encoder matmul in int8 on ONNX Runtime, for the `backend=onnx precision=int8` CPU path.

The graph is one MatMul and one Add: `input_scale` is folded into W_enc and `b_enc - b_dec @ W_enc` into the bias,
so it returns the SAE's pre-activations; the per-row top-k stays in saefeat's selection (`saefeat.sae.topk`).
W_enc is quantized per latent (per output channel) and the activations per call (ONNX Runtime's dynamic
quantization). On a CPU without native bf16 this is the SAE step's one large cost (a 16k-latent encoder is ~6M
multiply-adds per token), and int8 runs it several times faster than torch fp32 while keeping most selected latents
(`benchmarks/embed_bench.py` prints the drift). Exports are cached by the SAE's content hash and written atomically.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from saefeat.atomic import atomic_write
from saefeat.errors import SaefeatError
from saefeat.onnx_host import cpu_session, quiet_onnx_tools
from saefeat.sae.model import SAE

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1
STEP_NAME = "onnx-int8"  # how the SAE step is named in cache keys and run records


def export_path(sae: SAE, root: Path) -> Path:
    """Where the int8 encoder of `sae` is cached."""
    import onnxruntime

    if not sae.content_hash:
        raise SaefeatError("the int8 SAE encoder is cached by the SAE's content hash, and this SAE has none")
    key = f"{sae.content_hash}|{sae.cfg.input_scale}|{sae.cfg.apply_b_dec_to_input}|{EXPORT_VERSION}|" \
          f"{onnxruntime.__version__}"
    return Path(root) / "onnx" / f"sae-{sae.d_in}x{sae.d_sae}-int8-{hashlib.sha256(key.encode()).hexdigest()[:12]}.onnx"


def folded_encoder(sae: SAE) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with x @ W + b equal to `sae.pre_acts(x)`, in float32."""
    with torch.no_grad():
        W = sae.W_enc.detach().float().cpu()
        b = sae.b_enc.detach().float().cpu()
        if sae.cfg.apply_b_dec_to_input:
            b = b - sae.b_dec.detach().float().cpu() @ W
        W = W * sae.cfg.input_scale
    return W.numpy(), b.numpy()


def export_encoder(sae: SAE, target: Path) -> Path:
    """Write the int8-quantized pre-activation graph of `sae` to `target`, atomically."""
    import tempfile

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    W, b = folded_encoder(sae)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", sae.d_in])
    out = helper.make_tensor_value_info("pre_acts", TensorProto.FLOAT, ["rows", sae.d_sae])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xW"]), helper.make_node("Add", ["xW", "b"], ["pre_acts"])],
        "sae_encoder", [x], [out], [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8

    def write(path: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = str(Path(tmp) / "encoder-fp32.onnx")
            onnx.save(model, fp32)
            with quiet_onnx_tools():
                quantize_dynamic(fp32, path, weight_type=QuantType.QInt8, per_channel=True)

    logger.info("quantizing the SAE encoder (%d -> %d) to int8 for ONNX Runtime: %s", sae.d_in, sae.d_sae, target)
    atomic_write(target, write)
    return target


class OnnxSAEEncoder:
    """`encode_topk_rows(x)` of a TopK SAE with the encoder matmul in int8 on ONNX Runtime (CPU)."""

    def __init__(self, sae: SAE, cache_root: Path):
        if not sae.is_topk:
            raise SaefeatError(f"the int8 SAE step supports TopK SAEs; this is a {sae.cfg.architecture} SAE")
        self.sae = sae
        self.path = export_path(sae, cache_root)
        if not self.path.is_file():
            export_encoder(sae, self.path)
        self.session = cpu_session(self.path, lambda: export_encoder(sae, self.path), "int8 SAE encoder")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of 2-D inputs, (rows, d_sae) float32 on CPU."""
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"x": feed})[0])

    def encode_topk_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, latent ids), each (rows, k), ReLU'd: `SAE.encode_topk_rows` with the int8 matmul."""
        return self.sae.encode_topk_rows(x.cpu(), pre_acts=self.pre_acts)
