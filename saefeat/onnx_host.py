"""The host truncated after one block, exported once to ONNX and run with ONNX Runtime on CPU.

The exported graph reads `input_ids` and `attention_mask` and returns the residual stream after block `layer`,
as `HostModel.residual` does; the blocks after it are not in the graph. The export traces the eager attention
(the SDPA trace ran about 1.6x slower under int8), and ONNX Runtime's transformer optimizer then fuses attention,
skip-layer-norm and bias-GELU, kept only where the fused graph gives the unfused one's outputs. `int8` quantizes
the weights of every MatMul (and fused attention) per output channel, and the activations per batch (ONNX
Runtime's dynamic quantization). Exports are cached by host fingerprint, layer, precision, export version and
library versions, and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saefeat.atomic import atomic_write
from saefeat.errors import SaefeatError
from saefeat.hosts import HostModel

logger = logging.getLogger(__name__)

EXPORT_VERSION = 2  # 2: eager-attention trace, fused by the transformer optimizer
ONNX_PRECISIONS = ("fp32", "int8")


def onnx_capable(host: HostModel) -> bool:
    """Hosts the exporter supports: encoders (BERT-style). Causal LMs run on the torch backend."""
    return not host.is_causal


class _Truncated(nn.Module):
    """The host's forward, returning block `layer`'s output (captured by `HostModel.hook`)."""

    def __init__(self, host: HostModel, layer: int):
        super().__init__()
        self.host, self.model, self.layer = host, host.model, layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self.host.hook(self.layer) as cap:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        return cap.value


@contextlib.contextmanager
def _blocks_cut_after(host: HostModel, layer: int):
    """Temporarily drop the blocks after `layer` from the host, so the export holds only what is read."""
    parent, attr = _owner_of(host.model, host.blocks)
    setattr(parent, attr, nn.ModuleList(list(host.blocks)[: layer + 1]))
    try:
        yield
    finally:
        setattr(parent, attr, host.blocks)


@contextlib.contextmanager
def quiet_onnx_tools():
    """ONNX Runtime's quantizer and optimizer log each tensor they touch (to the root logger, at INFO) and a
    standing "consider pre-processing" advice; keep both out of the user's log while they run."""
    names = ("", "fusion_utils", "fusion_base", "onnx_model", "onnx_model_bert", "onnxruntime.transformers")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _eager_attention(model: nn.Module):
    """Trace the host with eager attention (restored afterwards): its pattern is the one ONNX Runtime fuses."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _fuse(raw: str, target: str, host: HostModel, feeds: dict[str, np.ndarray], valid: np.ndarray) -> bool:
    """Write `raw` with its attention, layer norms and GELUs fused (ONNX Runtime's BERT optimizer) to `target`,
    if the fused graph reproduces the raw one on `feeds` (positions `valid`); return whether it was written."""
    import onnxruntime as ort

    cfg = host.model.config
    heads, hidden = getattr(cfg, "num_attention_heads", 0), getattr(cfg, "hidden_size", 0)
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        with quiet_onnx_tools():
            optimize_model(raw, model_type="bert", num_heads=heads, hidden_size=hidden).save_model_to_file(target)
        runs = [ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feeds)[0][valid]
                for p in (raw, target)]
    except Exception as e:  # the optimizer knows BERT-like graphs; anything else stays unfused
        logger.warning("ONNX Runtime's optimizer could not fuse %s (%s); the export stays unfused", host.name, e)
        return False
    err = float(np.abs(runs[1] - runs[0]).max() / max(float(np.abs(runs[0]).max()), 1e-6))
    if err > 1e-4:
        logger.warning("the fused export of %s differs from the unfused one (relative %.1e); it stays unfused",
                       host.name, err)
        return False
    return True


def _owner_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if child is target:
                return module, name
    raise SaefeatError("the host's block list is not a child of its model")


def export_path(host: HostModel, layer: int, precision: str, root: Path) -> Path:
    """Where the export of (host, layer, precision) is cached."""
    import onnxruntime
    import transformers

    key = f"{host.fingerprint}|{layer}|{precision}|{EXPORT_VERSION}|{torch.__version__}|{transformers.__version__}|" \
          f"{onnxruntime.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return root / "onnx" / f"{Path(host.name).name}-L{layer}-{precision}-{digest}.onnx"


def export_truncated(host: HostModel, layer: int, precision: str, target: Path, fresh_source: bool = False) -> Path:
    """Export the host up to block `layer` (and quantize it for int8) to `target`, atomically. int8 quantizes the
    cached fp32 export, exported first where missing (or again with `fresh_source`)."""
    if precision not in ONNX_PRECISIONS:
        raise SaefeatError(f"ONNX export precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
    if not onnx_capable(host):
        raise SaefeatError(f"backend=onnx supports encoder hosts; {host.name} is a causal LM (use backend=torch)")
    host.check_layer(layer)
    ids, att = host.pad_batch([host.wrap(list(range(1000, 1008)))[0], host.wrap(list(range(1000, 1004)))[0]])
    module = _Truncated(host, layer).eval()

    feeds = {"input_ids": ids.cpu().numpy().astype(np.int64), "attention_mask": att.cpu().numpy().astype(np.int64)}

    def write_fp32(path: str) -> None:
        with tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
            raw = str(Path(tmp) / "raw.onnx")
            with _blocks_cut_after(host, layer), _eager_attention(host.model), torch.no_grad(), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (ids.cpu(), att.cpu()), raw, input_names=["input_ids", "attention_mask"],
                                  output_names=["residual"], opset_version=17, dynamo=False,
                                  dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                                "attention_mask": {0: "batch", 1: "tokens"},
                                                "residual": {0: "batch", 1: "tokens"}})
            if not _fuse(raw, path, host, feeds, feeds["attention_mask"].astype(bool)):
                Path(raw).replace(path)

    def write_int8(path: str) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32 = export_path(host, layer, "fp32", target.parent.parent)
        if fresh_source or not fp32.is_file():
            export_truncated(host, layer, "fp32", fp32)
        # the fused ops are outside shape inference, so their outputs' type is given (float)
        with quiet_onnx_tools():
            quantize_dynamic(str(fp32), path, weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

    logger.info("exporting %s up to block %d to ONNX (%s): %s", host.name, layer, precision, target)
    atomic_write(target, write_fp32 if precision == "fp32" else write_int8)
    return target


def cpu_session(path: Path, rebuild: Callable[[], object], what: str):
    """An ONNX Runtime CPU session of the cached export `path`, with saefeat's thread settings. A damaged cache file
    is derived, so it is rebuilt (`rebuild()` writes `path` again) and read once more."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # no spinning between runs: torch's threads run the SAE step and pooling on the same cores right after
    # (with spinning on, the two pools fight and a pass runs up to 1.8x slower on 2 cores)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except (InvalidProtobuf, InvalidGraph, Fail) as e:
        logger.warning("cached %s %s is unreadable (%s); writing it again", what, path, e)
        rebuild()
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxHost:
    """`residual(input_ids, attention_mask)` of a host truncated after block `layer`, on ONNX Runtime (CPU)."""

    def __init__(self, host: HostModel, layer: int, precision: str, cache_root: Path):
        self.host, self.layer, self.precision = host, layer, precision
        self.path = export_path(host, layer, precision, Path(cache_root))
        if not self.path.is_file():
            export_truncated(host, layer, precision, self.path)
        self.session = cpu_session(
            self.path, lambda: export_truncated(host, layer, precision, self.path, fresh_source=True), "ONNX export")

    def residual(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Residual stream after block `layer`, (B, T, d) float32 on CPU."""
        feeds = {"input_ids": input_ids.cpu().numpy().astype(np.int64),
                 "attention_mask": attention_mask.cpu().numpy().astype(np.int64)}
        return torch.from_numpy(self.session.run(None, feeds)[0])
