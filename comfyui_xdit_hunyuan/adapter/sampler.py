"""The sampler node's flow: convert ComfyUI's inputs, resolve the degrees for this image, build the job, pass it
through the one gate (checks.validate_job) before any pool work, run it on the pool, hand the LATENT back.

It takes from ComfyUI, and never re-implements: the initial noise (`comfy.sample.prepare_noise`), the sigma
schedule (`comfy.samplers.KSampler(...).sigmas`, so every scheduler, denoise < 1 and the samplers that drop
the penultimate sigma behave as in KSampler), the per-step noises of ancestral/SDE samplers (ComfyUI's own
noise samplers), and the MODEL's weights with its patches applied by ComfyUI's own patch code.
"""
from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from ..checks import validate_job
from ..config import PoolConfig, RunConfig, parse_devices
from ..job import CondEntry, Job, JobCancelled, JobError, PoolError
from ..model.config import HunyuanDiTConfig
from ..plan import ParallelConfig, PlanError, load_table, resolve
from .backend import ComfyBackend
from .config_node import build_parallel_config
from .conditioning import convert_conditioning
from .inputs import in_input_words
from .latent import convert_latent
from .model import check_model, compute_dtype
from .samplers import check_sampler_inputs, noise_plan
from .stats import format_pool_stats

log = logging.getLogger("xdit_hunyuan")


@dataclass
class Prepared:
    """The node's inputs converted, with the degrees for this image."""
    samples: torch.Tensor
    arch: HunyuanDiTConfig
    positive: list[CondEntry]
    negative: list[CondEntry]
    engine_sampler: str
    plan: ParallelConfig
    sigmas: torch.Tensor


def prepare(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
            parallel, *, backend: ComfyBackend, cuda_count: int | None = None) -> Prepared:
    """The inputs converted, in the order a user fixes them; raises JobError / PlanError."""
    engine_sampler = check_sampler_inputs(steps, cfg, sampler_name, scheduler, denoise,
                                          schedulers=backend.scheduler_names(),
                                          comfy_samplers=backend.sampler_names())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
        raise JobError(f"seed must be a whole number from 0 to 2^64-1, got {seed!r}")
    if not isinstance(parallel, RunConfig):
        raise JobError("the 'parallel' input is not an xDiT parallel configuration; connect an xDiT Parallel "
                       "Config node")
    samples = convert_latent(latent_image)
    arch = check_model(model)
    pos = convert_conditioning(positive, "positive", tuple(samples.shape))
    neg = convert_conditioning(negative, "negative", tuple(samples.shape))
    sigmas = backend.sigmas(model, steps, sampler_name, scheduler, denoise)
    if not bool(torch.isfinite(sigmas).all()):
        raise JobError(f"scheduler '{scheduler}' gave non-finite sigmas for {steps} steps; choose another scheduler")
    plan = parallel.parallel
    if len(sigmas) > 1:
        devices = parallel.pool.devices
        plan = resolve(plan, devices, len(parse_devices(devices, cuda_count)), tuple(samples.shape[2:]),
                       not math.isclose(cfg, 1.0), num_heads=arch.num_heads, depth=arch.depth,
                       table=load_table(parallel.pool.auto_table))
    return Prepared(samples, arch, pos, neg, engine_sampler, plan, sigmas)


def pool_config(pool: PoolConfig, model, backend: ComfyBackend) -> PoolConfig:
    """The pool for this MODEL: dtype "auto" is the dtype ComfyUI chose for it (what KSampler computes in:
    fp16 on most GPUs, fp32 on the CPU), so the pack runs the same arithmetic (where ComfyUI says nothing, the
    workers' own default: bf16 on GPUs, fp32 on the CPU); the compile caches live in ComfyUI's user folder
    unless the config names another."""
    changes = {}
    if pool.dtype == "auto" and compute_dtype(model):
        changes["dtype"] = compute_dtype(model)
    if pool.cache_dir is None:
        changes["cache_dir"] = backend.cache_root()
    return replace(pool, **changes) if changes else pool


def start_spare_workers(backend: ComfyBackend | None = None) -> list[str]:
    """ComfyUI's start (the pack's entry point): spare workers for the pool of the config node's defaults
    (every GPU, the compile caches in ComfyUI's user folder), so that the first image's pool starts from
    processes that imported, made their CUDA context and warmed up meanwhile (worker/spares.py). Nothing on a
    machine without a GPU, nothing with XDIT_HUNYUAN_SPARE_WORKERS=off. Returns the slots started."""
    backend = backend or ComfyBackend()
    pool = build_parallel_config().pool
    return backend.start_spares(replace(pool, cache_dir=pool.cache_dir or backend.cache_root()))


def build_job(model, seed: int, cfg: float, latent_image: Mapping, p: Prepared, *,
              backend: ComfyBackend, previews: bool) -> Job:
    # drawn in the LATENT's own dtype, as prepare_noise does for KSampler
    noise = backend.noise(p.samples.to(latent_image["samples"].dtype), seed, latent_image.get("batch_index"))
    step_noises = None
    kind, steps = noise_plan(p.engine_sampler, p.sigmas)
    if kind is not None:
        step_noises = backend.step_noises(model, kind, tuple(p.samples.shape), p.sigmas, seed, steps)
    return Job(weights=backend.weights(model), positive=p.positive, negative=p.negative, latent=p.samples,
               noise=noise.to("cpu", torch.float32).contiguous(), sigmas=p.sigmas, sampler=p.engine_sampler,
               guidance=float(cfg), seed=int(seed), step_noises=step_noises, preview_every=1 if previews else 0,
               job_id=uuid.uuid4().hex[:12])


def gate(job: Job, p: Prepared) -> list[str]:
    """checks.validate_job, its errors and warnings in the nodes' input names (the engine's guidance is cfg)."""
    try:
        warnings = validate_job(job, p.plan, p.arch)
    except (JobError, PlanError) as e:
        words = in_input_words(e)
        if words == str(e):
            raise
        raise type(e)("{words}", field=e.field, words=words) from e
    return [in_input_words(w) for w in warnings]


def run_sampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                parallel, *, node_id: str | None = None, backend: ComfyBackend | None = None) -> dict:
    """The sampler node: checks everything, then runs one job on the pool for `parallel`. Returns the
    LATENT dict (a copy of latent_image with new samples, as KSampler returns it)."""
    backend = backend or ComfyBackend()
    p = prepare(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                parallel, backend=backend)
    out = dict(latent_image)
    if len(p.sigmas) <= 1:
        # denoise 0: KSampler returns the input latent untouched (no model call)
        out["samples"] = p.samples
        return out
    progress = backend.progress(model, len(p.sigmas) - 1, node_id)
    job = build_job(model, seed, cfg, latent_image, p, backend=backend,
                    previews=getattr(progress, "wants_previews", False))
    for w in gate(job, p):                           # before the pool: a bad job never costs a pool restart
        log.warning("xDiT: %s", w)
    pool = backend.get_pool(pool_config(parallel.pool, model, backend))
    log.info("xDiT: %s, %d steps %s on %s, latent %s", p.engine_sampler, job.steps, p.plan.describe(),
             parallel.pool.devices, tuple(p.samples.shape))
    try:
        samples = pool.run(job, p.plan, on_progress=progress, cancel=backend.interrupted, model_config=p.arch)
    except JobCancelled:
        backend.raise_interrupted()
        raise
    except JobError as e:
        raise JobError(f"the xDiT workers rejected the job: {in_input_words(e)}") from e
    except PoolError as e:
        raise PoolError(f"the xDiT worker pool failed: {e} (it is restarted for the next run)") from e
    finally:
        stats = getattr(pool, "last_stats", None)
        if stats:
            log.info("xDiT pool after job %s: %s", job.job_id, format_pool_stats(stats))
    if not isinstance(samples, torch.Tensor) or tuple(samples.shape) != tuple(p.samples.shape):
        raise PoolError(f"the xDiT workers returned {getattr(samples, 'shape', type(samples).__name__)} instead of "
                        f"a latent of shape {tuple(p.samples.shape)}")
    out["samples"] = samples.to("cpu", torch.float32)
    return out
