"""The options of demo and generate, checked: `Settings`, everything a run needs before any worker starts.

Three steps, each raising UsageError (exit code 2) with the flag to change:
- `common_settings(args)`: devices, degrees and sampling options alone;
- `resolve_plan(s, arch, hw)`: the concrete degrees for this model and latent size (auto filled in);
- `preflight(s, job, arch)`: the whole job as the pool client will check it (checks.validate_job), so
  an error the workers would give is said here, in flags, and the plan's warnings are kept.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .usage import OPTION_NAMES, UsageError, checking, in_option_words

# What a run defaults to, by where its workers run.
CPU_DEFAULTS = {"preset": "small", "steps": 8, "size": 256}
GPU_DEFAULTS = {"preset": "full", "steps": 50, "size": 1024}
DEGREES = ("cfg_degree", "ulysses_degree", "ring_degree", "pipefusion_degree")   # ParallelConfig fields
SEED_MAX = 2 ** 64 - 1


@dataclass
class Settings:
    """The options of a run after every check, before any worker starts."""
    command: str
    devices: list[str]
    gpu: bool
    pool: Any                          # config.PoolConfig: what the worker processes run with
    parallel: Any                      # plan.ParallelConfig as the user gave it (strategy filled in)
    steps: int
    width: int
    height: int
    guidance: float                    # the classifier-free guidance scale (--cfg)
    sampler: str
    scheduler: str
    seed: int
    preview_every: int
    out: Path
    defaulted: set = field(default_factory=set)   # option names whose value is the CPU/GPU default
    plan: Any = None                   # the resolved plan.ParallelConfig (resolve_plan)
    warnings: list = field(default_factory=list)  # the plan's warnings, in flags (preflight)

    @property
    def dtype_name(self) -> str:
        return self.pool.dtype if self.pool.dtype != "auto" else ("bf16" if self.gpu else "fp32")

    @property
    def defaults(self) -> dict:
        return GPU_DEFAULTS if self.gpu else CPU_DEFAULTS


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) in pixels from 'WxH' or 'N'."""
    s = text.strip().lower().replace("×", "x")
    parts = s.split("x") if "x" in s else [s, s]
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--size '{text}': write WIDTHxHEIGHT in pixels (e.g. 1024x768) or one number for "
                         f"a square (e.g. 1024)")
    w, h = (int(p) for p in parts)
    for name, v in (("width", w), ("height", h)):
        if v < 16 or v % 8:
            ok = max(16, round(v / 8) * 8)
            raise UsageError(f"--size '{text}': the {name} {v} must be a multiple of 8 pixels and at least 16 "
                             f"(the VAE works on 8x8 pixel blocks); use e.g. {ok}")
    return w, h


def common_settings(args: argparse.Namespace) -> Settings:
    """Devices, parallel options and sampling options, checked (the model-independent part)."""
    from comfyui_xdit_hunyuan.compile_cache import default_root
    from comfyui_xdit_hunyuan.config import PoolConfig, env_overrides, parse_devices
    from comfyui_xdit_hunyuan.plan import ParallelConfig

    with checking():
        devices = parse_devices(args.devices)
    gpu = devices[0].startswith("cuda")
    defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    defaulted = set()

    degrees = {f: getattr(args, f) for f in DEGREES if getattr(args, f) is not None}
    strategy = args.strategy or ("manual" if degrees else "auto")
    if strategy == "auto" and degrees:
        given = " ".join(OPTION_NAMES[f] for f in DEGREES if f in degrees)
        raise UsageError(f"--strategy auto chooses the degrees itself; drop {given}, or use --strategy manual")
    # spare workers off: a one-shot run has no next pool to start (and a benchmark's jobs must not share the GPU
    # with a spare's warm-up)
    pool = PoolConfig(devices=args.devices, attention=args.attention, dtype=args.dtype, compile=bool(args.compile),
                      cache_dir=str(default_root()), spare_workers="off").with_overrides(env_overrides(os.environ))
    parallel = ParallelConfig(strategy=strategy, num_pipeline_patch=args.num_pipeline_patch,
                              warmup_steps=args.warmup_steps, **degrees)
    # parallel.validate() runs in resolve_plan(), with the model's own head count and depth
    steps = args.steps
    if steps is None:
        steps = defaults["steps"]
        defaulted.add("steps")
    if steps < 1:
        raise UsageError(f"--steps {steps}: sample with at least 1 step (e.g. --steps {defaults['steps']})")
    if args.size is None:
        width = height = defaults["size"]
        defaulted.add("size")
    else:
        width, height = parse_size(args.size)
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise UsageError(f"--cfg {args.cfg}: use a finite guidance scale >= 0 (5.0 is usual; 1.0 skips the "
                         f"negative prompt)")
    if not 0 <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed {args.seed}: use a whole number from 0 to 2^64-1")
    if args.preview_every < 0:
        raise UsageError(f"--preview-every {args.preview_every}: use 0 (final preview only) or N >= 1")
    return Settings(command=args.command, devices=devices, gpu=gpu, pool=pool, parallel=parallel, steps=steps,
                    width=width, height=height, guidance=float(args.cfg), sampler=args.sampler_name,
                    scheduler=args.scheduler, seed=int(args.seed), preview_every=int(args.preview_every),
                    out=Path(args.out), defaulted=defaulted)


def latent_hw(s: Settings, vae_factor: int = 8) -> tuple[int, int]:
    return s.height // vae_factor, s.width // vae_factor


def resolve_plan(s: Settings, arch, hw: tuple[int, int]) -> None:
    """The concrete degrees for a model of architecture `arch` and a latent of size hw (sets s.plan)."""
    from comfyui_xdit_hunyuan.plan import load_table, resolve

    with checking():
        s.plan = resolve(s.parallel, s.pool.devices, len(s.devices), hw, not math.isclose(s.guidance, 1.0),
                         num_heads=arch.num_heads, depth=arch.depth, table=load_table(s.pool.auto_table))


def sampling_inputs(s: Settings, arch, hw: tuple[int, int]):
    """(latent, noise, sigmas) as KSampler makes them for an empty latent of size hw."""
    import torch

    from comfyui_xdit_hunyuan import sampling

    ms = sampling.DiscreteVSampling.for_model(arch)
    try:
        sigmas = sampling.sigmas_for_denoise(ms, s.scheduler, s.steps, 1.0, sampler=s.sampler)
    except ValueError as e:
        raise UsageError(f"--scheduler {s.scheduler} with --steps {s.steps}: {in_option_words(e)}") from e
    if not bool(torch.isfinite(sigmas).all()):
        raise UsageError(f"--scheduler {s.scheduler} gives non-finite sigmas for --steps {s.steps}; choose another "
                         f"scheduler or more steps")
    latent = torch.zeros(1, arch.in_channels, *hw)
    return latent, sampling.prepare_noise(latent, s.seed), sigmas


def preflight(s: Settings, job, arch) -> None:
    """The job checked as the pool client checks it (on the model's architecture, before any worker):
    its errors as UsageError, its warnings kept in s.warnings, both in this command line's flags."""
    from comfyui_xdit_hunyuan.checks import validate_job

    with checking():
        warnings = validate_job(job, s.plan, arch)
    s.warnings = [in_option_words(w) for w in warnings]


def prepare_out(s: Settings) -> None:
    try:
        s.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {s.out}: cannot create the folder ({e.strerror}); choose a writable folder") from e
    if not os.access(s.out, os.W_OK):
        raise UsageError(f"--out {s.out}: the folder is not writable; choose another one")
