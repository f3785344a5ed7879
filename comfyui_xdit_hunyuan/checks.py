"""Checks of a job against a parallel plan and a model, before any worker work: the one gate.

Every job passes `validate_job` once, whoever built it (the ComfyUI node before it asks for the pool, the
pool client for any job that did not pass it yet: the command line, the benchmark), so a bad job is rejected
with a message that says what to change and never reaches a worker. Front ends convert their inputs and
name what they cannot use; shapes, batch sizes, finiteness and the sampler name are checked here. `model_config` reads a weights source's shape cheaply (safetensors headers only).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from .job import COND_KEYS, CondEntry, Job, JobError
from .model import HunyuanDiTConfig
from .plan import ParallelConfig, check_job


def model_config(source) -> HunyuanDiTConfig:
    """The config of a weights source ("random:<seed>:<preset>", a path, or a state dict) without
    loading tensor data. Raises NotHunyuanDiTError / CheckpointError (ValueErrors) for bad sources."""
    from .tiny import parse_random_source, preset
    random = parse_random_source(source)
    if random is not None:
        return preset(random[1])
    from .model.loading import inspect_source
    return inspect_source(source)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. Any NaN or Inf element makes the sum NaN or Inf, so a finite sum proves the
    tensor finite; only a non-finite sum (or an overflow of finite values) needs the elementwise test.
    torch.isfinite(t).all() alone took ~20 ms per conditioning tensor on CPUs: 0.1-0.2 s per job."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise JobError(f"{what} contains NaN or Inf values; check the node or file that produced it")


def check_conditioning(entries: list[CondEntry], which: str, cfg: HunyuanDiTConfig, batch: int) -> None:
    """JobError unless every entry fits a model of shape `cfg` and a latent batch of `batch`."""
    for e in entries:
        _check_entry(e, which, cfg, batch)


def _check_entry(e: CondEntry, which: str, cfg: HunyuanDiTConfig, batch: int) -> None:
    for key in COND_KEYS:
        t = getattr(e, key, None)
        if not isinstance(t, torch.Tensor):
            raise JobError(f"the {which} conditioning lacks '{key}'; encode the prompt with a HunyuanDiT "
                           f"CLIP (BERT + mT5)")
        if t.shape[0] not in (1, batch):
            raise JobError(f"the {which} conditioning '{key}' has batch {t.shape[0]} but the latent has batch "
                           f"{batch}; use conditioning of batch 1 or {batch}")
        _finite(t, f"the {which} conditioning '{key}'")
    ctx, t5 = e.context, e.encoder_hidden_states_t5
    if ctx.ndim != 3 or t5.ndim != 3 or ctx.shape[-1] != cfg.text_dim or t5.shape[-1] != cfg.text_dim_t5:
        raise JobError(f"the {which} conditioning has text widths {ctx.shape[-1]} (BERT) and {t5.shape[-1]} (mT5) "
                       f"but the model expects {cfg.text_dim} and {cfg.text_dim_t5} ([batch, tokens, width]); "
                       f"encode the prompt with the CLIP of this HunyuanDiT checkpoint")
    if e.text_embedding_mask.shape[-1] != e.context.shape[1] or \
            e.text_embedding_mask_t5.shape[-1] != e.encoder_hidden_states_t5.shape[1]:
        raise JobError(f"the {which} conditioning's attention masks do not match its token counts")
    if cfg.size_cond and e.image_meta_size is None:
        raise JobError(f"this HunyuanDiT (v1.0/v1.1) needs image_meta_size in the {which} conditioning "
                       f"([[height, width, target height, target width, crop top, crop left]] in pixels)")
    if e.image_meta_size is not None:
        _finite(e.image_meta_size, f"the {which} image_meta_size")
    if not (isinstance(e.strength, (int, float)) and math.isfinite(e.strength) and e.strength >= 0):
        raise JobError(f"the {which} conditioning strength {e.strength!r} must be a finite number >= 0")


def validate_job(job: Job, plan: ParallelConfig, cfg: HunyuanDiTConfig) -> list:
    """Raise JobError/PlanError for a job that cannot run under `plan` on a model of shape `cfg`.
    Returns warnings (plan.Message: e.g. a wasted CFG rank) for the caller to log, and records on the job
    that it passed (job.checked), so that it is not checked twice."""
    from . import sampling

    plan.validate(num_heads=cfg.num_heads, depth=cfg.depth)
    lat, noise, sig = job.latent, job.noise, job.sigmas
    if not isinstance(lat, torch.Tensor) or lat.ndim != 4 or lat.shape[1] != cfg.in_channels:
        raise JobError(f"the latent must be [batch, {cfg.in_channels}, height/8, width/8], got "
                       f"{tuple(getattr(lat, 'shape', ()))}")
    if min(lat.shape[2:]) < 2:
        raise JobError(f"the latent {tuple(lat.shape)} is too small; use an image of at least 16x16 pixels")
    if not isinstance(noise, torch.Tensor) or noise.shape != lat.shape:
        raise JobError(f"the noise must have the latent's shape {tuple(lat.shape)}, got "
                       f"{tuple(getattr(noise, 'shape', ()))}")
    _finite(lat, "the latent")
    _finite(noise, "the noise")
    if not isinstance(sig, torch.Tensor) or sig.ndim != 1 or len(sig) < 2:
        raise JobError("sigmas must list {steps} + 1 noise levels (at least 2); got {shape}: use {steps} >= 1 "
                       "and {denoise} > 0", field="steps", shape=tuple(getattr(sig, "shape", ())))
    _finite(sig, "sigmas")
    if bool((sig < 0).any()) or bool((sig[1:] > sig[:-1]).any()):
        raise JobError("sigmas must be >= 0 and non-increasing (a schedule from high noise to low)")
    if job.sampler not in sampling.SAMPLERS:
        raise JobError("{sampler} '{value}' is not supported by the workers; use one of {choices}", field="sampler",
                       value=job.sampler, choices=", ".join(sampling.SAMPLERS))
    try:
        needed = sampling.noise_steps(job.sampler, sig, job.sampler_options)
    except ValueError as e:
        raise JobError(str(e)) from e
    if job.step_noises is not None:
        for i in needed:
            n = job.step_noises[i] if i < len(job.step_noises) else None
            if not isinstance(n, torch.Tensor) or n.shape != lat.shape:
                raise JobError(f"step_noises[{i}] must be a tensor of the latent's shape {tuple(lat.shape)}")
    if not math.isfinite(job.guidance):
        raise JobError("{guidance} {value} is not a finite number", field="guidance", value=job.guidance)
    batch = lat.shape[0]
    if not job.positive:
        raise JobError("the positive conditioning is empty; connect a CLIPTextEncode")
    if job.uses_uncond() and not job.negative:
        raise JobError("the negative conditioning is empty but {guidance} != 1 needs it; connect a CLIPTextEncode "
                       "(an empty prompt is fine)", field="negative")
    for which, entries in (("positive", job.positive), ("negative", job.negative)):
        check_conditioning(entries, which, cfg, batch)
    warnings = check_job(plan, steps=len(sig) - 1, latent_hw=tuple(lat.shape[2:]), guidance=job.guidance,
                         patch_size=cfg.patch_size)
    job.checked = (plan, cfg)
    return warnings
