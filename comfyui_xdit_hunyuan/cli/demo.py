"""`demo`: HunyuanDiT end to end with no downloads. Random weights built in memory on the workers (or a
real checkpoint with --ckpt) sample random HunyuanDiT-shaped conditioning through the worker pool, with
any parallel degrees; prints the configuration (with how exact the plan's result is), one line per step and
the sampling time, and writes the latent, run.json and a latent-space preview (outputs.py).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outputs import preview_writer, write_outputs
from .printout import describe_model, print_settings
from .session import PoolSession, run_guarded
from .settings import (Settings, common_settings, latent_hw, prepare_out, preflight, resolve_plan,
                       sampling_inputs)
from .usage import EXIT_OK, UsageError, checking
from .weights import checkpoint_ref, param_count, random_ref


@dataclass
class DemoModel:
    arch: Any                          # model.HunyuanDiTConfig
    weights: Any                       # job.WeightsRef
    rows: list[tuple[str, list[str]]]  # its rows of the printout
    info: dict                         # its part of run.json
    cond_seed: int                     # seed of the random conditioning


def demo_model(args: argparse.Namespace, s: Settings) -> DemoModel:
    """--ckpt, else the random weights of --preset (the CPU or GPU default) and --weights-seed."""
    if args.ckpt:
        if args.preset or args.weights_seed is not None:
            raise UsageError("--preset and --weights-seed choose random weights; drop them when loading --ckpt")
        from comfyui_xdit_hunyuan.model.loading import inspect_source
        path = Path(args.ckpt).expanduser()
        with checking():
            arch = inspect_source(path)
        rows = [("model", [f"{path} ({describe_model(arch, param_count(arch))})"])]
        return DemoModel(arch, checkpoint_ref(path), rows, {"source": str(path.resolve()), "config": arch.to_dict()},
                         cond_seed=0)
    from comfyui_xdit_hunyuan.tiny import preset

    name = args.preset or s.defaults["preset"]
    if args.preset is None:
        s.defaulted.add("preset")
    seed = args.weights_seed or 0
    if seed < 0:
        raise UsageError(f"--weights-seed {seed}: use a whole number >= 0")
    arch = preset(name)
    ref = random_ref(seed, name)
    hint = ("; --preset full for the released size" if not s.gpu and name != "full"
            else "; --preset small for a quick run" if s.gpu and name == "full" else "")
    default = f" (default on {'GPU' if s.gpu else 'CPU'}{hint})" if args.preset is None else ""
    params = param_count(arch)
    return DemoModel(arch, ref, [("model", [f"random weights, preset '{name}'{default}, weights seed {seed}",
                                            describe_model(arch, params)])],
                     {"source": ref.source, "preset": name, "params": params, "config": arch.to_dict()}, seed)


def run_demo(args: argparse.Namespace) -> int:
    from comfyui_xdit_hunyuan.job import Job
    from comfyui_xdit_hunyuan.tiny import random_cond

    s = common_settings(args)
    model = demo_model(args, s)
    arch = model.arch
    hw = latent_hw(s)
    resolve_plan(s, arch, hw)
    latent, noise, sigmas = sampling_inputs(s, arch, hw)

    def cond(seed_offset: int, used: float):
        c = random_cond(arch, seed=1000 * seed_offset + model.cond_seed, used=used, hw=(s.height, s.width))
        if not arch.size_cond:
            c.image_meta_size = None
        return c

    job = Job(weights=model.weights, positive=[cond(1, 0.6)], negative=[cond(2, 0.2)], latent=latent, noise=noise,
              sigmas=sigmas, sampler=s.sampler, guidance=s.guidance, seed=s.seed, preview_every=s.preview_every,
              job_id="demo")
    preflight(s, job, arch)
    prepare_out(s)
    text = ("text", [f"random conditioning: BERT {arch.text_len} x {arch.text_dim}, mT5 {arch.text_len_t5} x "
                     f"{arch.text_dim_t5} (a positive and a negative)"])
    print_settings("xDiT HunyuanDiT demo", s, hw, arch.patch_size, [*model.rows, text])

    def body() -> int:
        session = PoolSession(s.pool, s.plan, verbose=args.verbose)
        try:
            session.start()
            result = session.run(job, on_preview=preview_writer(s))
        finally:
            session.close()
        write_outputs(s, result, model.info)
        return EXIT_OK
    return run_guarded(body)
