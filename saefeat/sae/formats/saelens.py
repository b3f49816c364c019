"""SAELens: ``cfg.json`` + ``sae_weights.safetensors``, as `save_model` / `save_inference_model` write them
(v6: settings at the top, hook and model under ``metadata``; before v6: all at the top, runner settings included).

Applied: architecture standard (ReLU or top-k activation), jumprelu, topk, and the BatchTopK / Matryoshka trainer
checkpoints (their scalar ``topk_threshold`` becomes every latent's JumpReLU threshold, as SAELens does when it
converts them for inference); ``rescale_acts_by_decoder_norm`` (decoder norms folded into the weights);
``apply_b_dec_to_input``; ``normalize_activations`` none / expected_average_only_in; an older file's
``scaling_factor`` (folded into W_dec). Everything else that changes numerics is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from saefeat.errors import SAEFormatError
from saefeat.sae.formats._common import (
    BASE_TENSORS,
    Format,
    Parsed,
    as_int,
    fold_decoder_norms,
    read_json,
    read_safetensors,
    refuse_unknown_keys,
    refuse_unknown_tensors,
    require_tensors,
)
from saefeat.sae.model import SAEConfig
from saefeat.sae.sites import parse_hook

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"

# read and applied (or refused when set to what saefeat cannot apply)
_APPLIED = {
    "architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "normalize_activations", "norm_scaling_factor",
    "reshape_activations", "k", "rescale_acts_by_decoder_norm", "activation_fn", "activation_fn_str",
    "activation_fn_kwargs", "finetuning_scaling_factor", "hook_name", "hook_point", "hook_layer", "hook_point_layer",
    "hook_head_index", "hook_point_head_index", "model_name", "context_size", "prepend_bos",
    "model_from_pretrained_kwargs", "metadata",
}
# where and how it was trained: no effect on encode or decode
_PROVENANCE = {
    "device", "sae_lens_version", "sae_lens_training_version", "model_class_name", "dataset_path",
    "dataset_trust_remote_code", "is_dataset_tokenized", "streaming", "use_cached_activations",
    "cached_activations_path", "neuronpedia_id", "seqpos_slice", "exclude_special_tokens", "hf_hook_name",
    "use_chat_formatting", "disable_concat_sequences", "sequence_separator_token", "model_kwargs", "seed",
    "run_name", "wandb_project", "wandb_entity", "wandb_id", "wandb_log_frequency", "log_to_wandb",
    "eval_every_n_wandb_logs", "checkpoint_path", "n_checkpoints", "save_final_checkpoint", "output_path",
    "resume_from_checkpoint", "from_pretrained_path", "verbose", "act_store_device", "llm_device", "autocast",
    "autocast_lm", "compile_llm", "compile_sae", "llm_compilation_mode", "sae_compilation_mode",
    "prefetch_llm_batches", "hook_eval",
}
# loss, initialisation, optimiser and schedule settings of trainer checkpoints and pre-v6 runner configs
_TRAINING = {
    "decoder_init_norm", "use_sparse_activations", "aux_loss_coefficient", "topk_threshold_lr", "l1_coefficient",
    "lp_norm", "l1_warm_up_steps", "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
    "l0_coefficient", "l0_warm_up_steps", "pre_act_loss_coefficient", "jumprelu_tanh_scale", "jumprelu_ste_to_input",
    "target_l0", "matryoshka_widths", "use_matryoshka_aux_loss", "use_ghost_grads", "normalize_sae_decoder",
    "noise_scale", "decoder_orthogonal_init", "mse_loss_normalization", "decoder_heuristic_init",
    "init_encoder_as_decoder_transpose", "scale_sparsity_penalty_by_decoder_norm", "b_dec_init_method",
    "expansion_factor", "lr", "lr_scheduler_name", "lr_warm_up_steps", "lr_end", "lr_decay_steps",
    "n_restart_cycles", "train_batch_size", "train_batch_size_tokens", "feature_sampling_window",
    "feature_sampling_method", "resample_batches", "feature_reinit_scale", "dead_feature_window",
    "dead_feature_estimation_method", "dead_feature_threshold", "tokens_per_buffer", "n_batches_in_buffer",
    "total_training_tokens", "training_tokens", "total_training_steps", "store_batch_size",
    "store_batch_size_prompts", "n_eval_batches", "eval_batch_size_prompts", "activations_mixing_fraction",
    "n_batches_for_norm_estimate", "adam_beta1", "adam_beta2",
}
_META_APPLIED = {"hook_name", "hook_layer", "hook_head_index", "model_name", "context_size", "prepend_bos",
                 "model_from_pretrained_kwargs"}
_META_PROVENANCE = _PROVENANCE | {"training_architecture", "training_architecture_details"}
# architectures whose config class has rescale_acts_by_decoder_norm (TopKSAEConfig and its training subclasses)
_RESCALE_ARCHS = ("topk", "batchtopk", "matryoshka_batchtopk")
_SUPPORTED = ("standard", "relu", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk")


def detect(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def parse(path: Path) -> Parsed:
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    cfg = read_json(cfg_path)
    refuse_unknown_keys(cfg, _APPLIED | _PROVENANCE | _TRAINING, cfg_path)
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SAEFormatError(f"{cfg_path}: metadata must be an object")
    refuse_unknown_keys(meta, _META_APPLIED | _META_PROVENANCE, cfg_path, "metadata key")

    def get(key: str, *old: str) -> Any:
        for k in (key, *old):
            if meta.get(k) is not None:
                return meta[k]
            if cfg.get(k) is not None:
                return cfg[k]
        return None

    lens_arch = cfg.get("architecture", "standard")
    if lens_arch not in _SUPPORTED:
        raise SAEFormatError(f"{path}: SAELens architecture {lens_arch!r} is not supported (standard/relu, "
                             "jumprelu, topk, and batchtopk / matryoshka_batchtopk trainer checkpoints)")
    act = get("activation_fn", "activation_fn_str") or "relu"
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    refuse_unknown_keys(act_kwargs, {"k"}, cfg_path, "activation_fn_kwargs key")
    if act not in ("relu", "topk"):
        raise SAEFormatError(f"{cfg_path}: activation_fn={act!r} is not supported (relu, topk)")
    for key in ("d_in", "d_sae"):
        if cfg.get(key) is None:
            raise SAEFormatError(f"{cfg_path}: lacks {key!r}")
    if lens_arch in ("standard", "relu"):
        arch = "topk" if act == "topk" else "relu"
    elif lens_arch in ("batchtopk", "matryoshka_batchtopk"):
        arch = "jumprelu"  # its k is the training-time average; inference uses the learnt threshold
    else:
        arch = lens_arch
    k = None
    if arch == "topk":
        k = as_int(cfg.get("k") if cfg.get("k") is not None else act_kwargs.get("k"), "k", cfg_path)
        if not k:
            raise SAEFormatError(f"{cfg_path}: a top-k SAE needs k")

    weights = read_safetensors(w_path)
    require_tensors(weights, BASE_TENSORS, w_path, f"SAELens {lens_arch} SAE")
    notes: list[str] = []
    _apply_scaling_factor(cfg, weights, w_path, notes)
    scale = _input_scale(cfg, weights, cfg_path)

    if lens_arch in ("batchtopk", "matryoshka_batchtopk"):
        _batchtopk_threshold(weights, w_path, lens_arch)
    elif arch == "jumprelu" and "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    known = (*BASE_TENSORS, "threshold") if arch == "jumprelu" else BASE_TENSORS
    what = f"SAELens {lens_arch} SAE"
    refuse_unknown_tensors(weights, known, w_path, what)
    require_tensors(weights, known, w_path, what)

    if cfg.get("rescale_acts_by_decoder_norm"):
        if lens_arch not in _RESCALE_ARCHS:
            raise SAEFormatError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not defined for SAELens "
                                 f"architecture {lens_arch!r} (only {_RESCALE_ARCHS}); refusing it")
        fold_decoder_norms(weights, cfg_path, "rescale_acts_by_decoder_norm=true")
        notes.append("rescale_acts_by_decoder_norm")

    hook = get("hook_name", "hook_point")
    site, hook_layer = parse_hook(hook)
    layer = as_int(get("hook_layer", "hook_point_layer"), "hook_layer", cfg_path)
    if layer is not None and hook_layer is not None and layer != hook_layer:
        raise SAEFormatError(f"{cfg_path}: hook_layer={layer} contradicts hook_name={hook!r}")
    head = get("hook_head_index", "hook_point_head_index")
    if head is not None:
        raise SAEFormatError(f"{cfg_path}: hook_head_index={head!r} (an SAE on one attention head) is not supported")
    reshape = cfg.get("reshape_activations", "none") or "none"
    if reshape not in ("none", "hook_z") or (reshape == "hook_z" and site != "attn_z"):
        raise SAEFormatError(f"{cfg_path}: reshape_activations={reshape!r} with hook {hook!r} is not supported")
    _refuse_centered_host(get("model_from_pretrained_kwargs"), cfg_path)
    context = as_int(get("context_size"), "context_size", cfg_path)
    if context is not None and get("prepend_bos") is not False:
        context -= 1  # SAELens counts the BOS token it prepends; saefeat counts content tokens

    try:
        conf = SAEConfig(
            d_in=as_int(cfg.get("d_in"), "d_in", cfg_path), d_sae=as_int(cfg.get("d_sae"), "d_sae", cfg_path),
            architecture=arch, k=k, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            input_scale=scale, host=get("model_name"), layer=layer if layer is not None else hook_layer,
            hook_name=hook, site=site, context_size=context, source_format="saelens",
            extra={"folded": notes} if notes else {},
        )
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from e
    return Parsed(conf, weights, [cfg_path, w_path])


def _apply_scaling_factor(cfg: dict[str, Any], weights: dict[str, torch.Tensor], where: Path,
                          notes: list[str]) -> None:
    """Older SAELens multiplied feature activations by ``scaling_factor`` before decoding when
    ``finetuning_scaling_factor`` was set: fold it into the decoder rows. All ones means no scaling."""
    flag = bool(cfg.get("finetuning_scaling_factor"))
    s = weights.pop("scaling_factor", None)
    if s is None:
        if flag:
            raise SAEFormatError(f"{where}: finetuning_scaling_factor=true but the file has no scaling_factor tensor")
        return
    if torch.all(s == 1):
        return
    if not flag:
        raise SAEFormatError(f"{where}: tensor 'scaling_factor' is not all ones but finetuning_scaling_factor is "
                             "not set; SAELens refuses this file too")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise SAEFormatError(f"{where}: scaling_factor together with rescale_acts_by_decoder_norm is not supported")
    if s.shape != weights["W_dec"].shape[:1]:
        raise SAEFormatError(f"{where}: tensor scaling_factor has shape {tuple(s.shape)}, expected "
                             f"({weights['W_dec'].shape[0]},)")
    weights["W_dec"] = (weights["W_dec"].double() * s.double()[:, None]).to(weights["W_dec"].dtype)
    notes.append("scaling_factor")


def _input_scale(cfg: dict[str, Any], weights: dict[str, torch.Tensor], where: Path) -> float:
    """The input scale `normalize_activations` asks for (SAELens folds the same factor into its weights)."""
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool) or norm is None:  # before v6: a bool
        norm = "expected_average_only_in" if norm else "none"
    tensor = weights.pop("norm_scaling_factor", None)
    if norm == "expected_average_only_in":
        value = cfg.get("norm_scaling_factor")
        if value is None and tensor is not None:
            value = float(tensor.reshape(-1)[0]) if tensor.numel() == 1 else None
            if value is None:
                raise SAEFormatError(f"{where}: tensor norm_scaling_factor must hold one value")
        return float(value) if value is not None else 1.0
    if norm != "none":
        raise SAEFormatError(f"{where}: normalize_activations={norm!r} is not supported")
    if tensor is not None or cfg.get("norm_scaling_factor") is not None:
        raise SAEFormatError(f"{where}: norm_scaling_factor is given but normalize_activations is 'none'")
    return 1.0


def _batchtopk_threshold(weights: dict[str, torch.Tensor], where: Path, arch: str) -> None:
    """A BatchTopK trainer checkpoint's scalar threshold, as every latent's JumpReLU threshold."""
    t = weights.pop("topk_threshold", None)
    if t is None:
        if "threshold" in weights:
            return
        raise SAEFormatError(f"{where}: a SAELens {arch} checkpoint needs tensor 'topk_threshold' (or 'threshold'); "
                             f"the file holds {sorted(weights)}")
    if t.numel() != 1:
        raise SAEFormatError(f"{where}: tensor topk_threshold must hold one value, has shape {tuple(t.shape)}")
    if "threshold" in weights:
        raise SAEFormatError(f"{where}: both topk_threshold and threshold are present")
    weights["threshold"] = torch.full((weights["b_enc"].shape[0],), float(t.reshape(-1)[0]), dtype=torch.float64)


def _refuse_centered_host(kwargs: Any, where: Path) -> None:
    """TransformerLens' center_writing_weights changes the residual stream itself: saefeat reads the model's own."""
    if isinstance(kwargs, dict) and kwargs.get("center_writing_weights"):
        raise SAEFormatError(f"{where}: model_from_pretrained_kwargs.center_writing_weights=true: the SAE was "
                             "trained on TransformerLens' mean-centred residual stream, saefeat reads the model's own")


FORMAT = Format("saelens", detect, (CONFIG, WEIGHTS), parse)
