"""MODEL -> the HunyuanDiT architecture the workers build; a MODEL whose patches would change what KSampler
computes in a way the workers cannot reproduce (CFG functions, wrappers, another model sampling) is
rejected by name. LoRA and merge patches are fine: weights.py applies them as ComfyUI does."""
from __future__ import annotations

import logging

import torch

from ..job import JobError
from ..model.config import HunyuanDiTConfig, NotHunyuanDiTError
from ..sampling import DiscreteVSampling

log = logging.getLogger("xdit_hunyuan")


def _class_names(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def model_kind(model) -> str:
    inner = getattr(model, "model", None)
    cfg = getattr(inner, "model_config", None)
    name = type(inner).__name__ if inner is not None else type(model).__name__
    return f"{name} ({type(cfg).__name__})" if cfg is not None and type(cfg).__name__ != name else name


# What TorchCompileModel adds (comfy_api.torch_helpers): a wrapper of the model call and its settings. Neither
# changes the result, so both are accepted.
TORCH_COMPILE_WRAPPER = "torch.compile"
TORCH_COMPILE_OPTION = "torch_compile_kwargs"

# model_options keys and patcher features that change what KSampler computes; the message says which
# kind of node sets them.
_MODEL_OPTION_HINTS = {
    "sampler_cfg_function": "a CFG-changing node (RescaleCFG, PerpNeg, ...)",
    "sampler_post_cfg_function": "a post-CFG node (e.g. PAG, SAG, CFGNorm, APG)",
    "sampler_pre_cfg_function": "a pre-CFG node",
    "sampler_calc_cond_batch_function": "a node that replaces the conditioning batch",
    "model_function_wrapper": "a model wrapper node",
    "denoise_mask_function": "an inpainting / differential diffusion node",
    "disable_cfg1_optimization": "a CFG-changing node",
    "context_handler": "a context-window node",
}


def check_model(model) -> HunyuanDiTConfig:
    """The MODEL must be a plain HunyuanDiT (LoRA / merge patches allowed); returns its config.

    Rejects, by name, model options, wrappers and object patches that would change KSampler's result and
    that the workers cannot reproduce."""
    inner = getattr(model, "model", None)
    if inner is None or "HunyuanDiT" not in _class_names(inner):
        raise JobError(f"the MODEL is {model_kind(model)}, not HunyuanDiT; load a HunyuanDiT checkpoint "
                       f"(e.g. hunyuan_dit_1.2.safetensors) or use KSampler for this model")
    dm = getattr(inner, "diffusion_model", None)
    if dm is None:
        raise JobError("the MODEL has no diffusion model; load the checkpoint again")
    try:
        cfg = HunyuanDiTConfig.from_state_dict(dict(dm.state_dict()))
    except NotHunyuanDiTError as e:
        raise JobError(f"the MODEL's weights are not a HunyuanDiT this pack can run: {e}") from e

    found, compiled = [], False
    opts = getattr(model, "model_options", {}) or {}
    for k, v in opts.items():
        if k == TORCH_COMPILE_OPTION:     # TorchCompileModel's settings; the workers compile on their own
            compiled = True
        elif k == "transformer_options":
            for tk, tv in (v or {}).items():
                if tv:
                    found.append(f"transformer_options['{tk}'] (a model patch node)")
        elif v is not None and v != [] and v != {} and v is not False:
            found.append(f"model_options['{k}'] ({_MODEL_OPTION_HINTS.get(k, 'a model patch node')})")
    for wtype, by_key in (getattr(model, "wrappers", None) or {}).items():
        for key, fns in (by_key or {}).items():
            if not fns:
                continue
            if key == TORCH_COMPILE_WRAPPER:
                compiled = True
                continue
            found.append(f"a '{wtype}' wrapper '{key}'")
    for ctype, by_key in (getattr(model, "callbacks", None) or {}).items():
        for key, fns in (by_key or {}).items():
            if fns:
                found.append(f"a '{ctype}' callback '{key}'")
    for name in (getattr(model, "object_patches", None) or {}):
        if name != "model_sampling":
            found.append(f"an object patch of '{name}'")
    if getattr(model, "weight_wrapper_patches", None):
        found.append(f"weight wrappers on {len(model.weight_wrapper_patches)} weights")
    for what in ("injections", "additional_models"):
        if any(getattr(model, what, None) or {}):
            found.append(f"{what.replace('_', ' ')} ({', '.join(getattr(model, what))})")
    if found:
        raise JobError(f"the MODEL carries {'; '.join(found)}, which the xDiT workers cannot reproduce; remove "
                       f"the node that adds it between the loader and this sampler (LoRA loaders are fine), or use "
                       f"KSampler")
    check_model_sampling(model, cfg)
    if compiled:
        log.info("xDiT: the MODEL went through TorchCompileModel; the workers do not use ComfyUI's compiled "
                 "model, they compile their own (the compile option of the xDiT Parallel Config node)")
    return cfg


def check_model_sampling(model, cfg: HunyuanDiTConfig) -> None:
    """The workers use HunyuanDiT's own discrete v-prediction schedule; a MODEL whose model sampling was
    changed (ModelSamplingDiscrete and similar) gets an error, since KSampler would use the new one."""
    get = getattr(model, "get_model_object", None)
    ms = get("model_sampling") if get is not None else getattr(getattr(model, "model", None), "model_sampling", None)
    if ms is None:
        return
    bases = [b.__name__ for b in type(ms).__bases__]
    problem = None
    if bases != ["ModelSamplingDiscrete", "V_PREDICTION"]:
        problem = f"it is {' + '.join(bases) or type(ms).__name__}"
    elif getattr(ms, "zsnr", False):
        problem = "zero terminal SNR (zsnr) is on"
    elif float(getattr(ms, "sigma_data", 1.0)) != 1.0:
        problem = f"sigma_data is {ms.sigma_data}"
    else:
        table = DiscreteVSampling.for_model(cfg).sigmas.double()
        sig = getattr(ms, "sigmas", None)
        if sig is None or sig.shape != table.shape or not torch.allclose(sig.double().cpu(), table, rtol=1e-5, atol=0):
            problem = (f"its noise schedule is not HunyuanDiT {cfg.version}'s scaled-linear schedule "
                       f"(linear_end {getattr(ms, 'linear_end', '?')}, expected {cfg.beta_end})")
    if problem:
        raise JobError(f"the MODEL's model sampling was changed ({problem}); the xDiT workers implement "
                       f"HunyuanDiT's own discrete v-prediction schedule only: remove the ModelSampling* node, or "
                       f"use KSampler")


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compute_dtype(model) -> str | None:
    """The dtype KSampler computes this MODEL in ("fp16", "bf16", "fp32"): ComfyUI's manual-cast dtype when it
    stores the weights in another one (fp8 storage), else the weights' own; None when neither is known."""
    inner = getattr(model, "model", None)
    dtype = getattr(inner, "manual_cast_dtype", None)
    if dtype is None and hasattr(inner, "get_dtype"):
        dtype = inner.get_dtype()
    return _DTYPE_NAMES.get(dtype)
