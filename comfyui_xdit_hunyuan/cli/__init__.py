"""Command line: ``python -m comfyui_xdit_hunyuan demo|generate|bench [options]``.

demo
    Runs HunyuanDiT end to end with no downloads: random weights built in memory on the workers (or a
    real checkpoint with --ckpt) on random HunyuanDiT-shaped conditioning, through the worker pool with
    any parallel degrees. Prints the resolved configuration (with how exact its result is), one line per
    step, the sampling time, and writes the latent (ComfyUI SaveLatent format), a JSON of the run and a
    latent-space preview PNG.
generate
    A prompt through a diffusers-format HunyuanDiT directory: BERT + mT5 (transformers) encode the text,
    our model samples on the pool, the diffusers VAE decodes; writes a PNG.
bench
    comfyui_xdit_hunyuan/bench.py: latency of the parallel configurations (its own options).

The flags are the ComfyUI nodes' input names (xDiT Parallel Config's and KSampler's). Every option is
checked before any worker process starts: a bad one exits with code 2 and a message that says what to
change. A failure of the workers exits with code 1, Ctrl+C with 130. Heavy packages (transformers,
diffusers) are imported only by `generate`, when it needs them.

One concern per module:
    usage.py      exit codes, UsageError, the engine's input names -> flags (OPTION_NAMES)
    parser.py     the options (argparse), the renamed flags of earlier versions
    settings.py   the options checked: Settings, the resolved plan, the sampling inputs, the job's preflight
    exactness.py  how close the plan's result is to the serial run (PipeFusion's measured deviation)
    printout.py   the configuration printed before the workers start
    session.py    the worker pool of one command, the timed job, failures -> exit codes
    outputs.py    latent.safetensors, preview.png, run.json
    weights.py    the weights a job names (checkpoint identity, random weights), parameter count
    demo.py, generate.py   the two commands (generate's text encoders and VAE: comfyui_xdit_hunyuan/text_vae.py)
"""
from __future__ import annotations

import argparse
import sys

from .demo import run_demo
from .generate import run_generate
from .parser import build_parser
from .usage import EXIT_FAILED, EXIT_USAGE, OPTION_NAMES, PROG, UsageError, in_option_words

__all__ = ["main", "build_parser", "OPTION_NAMES", "UsageError", "in_option_words"]


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench_error", None):
        print(f"{PROG} bench: the benchmark module cannot be loaded ({args.bench_error})", file=sys.stderr)
        return EXIT_FAILED
    from comfyui_xdit_hunyuan import bench
    return int(bench.main(args) or 0)


COMMANDS = {"demo": run_demo, "generate": run_generate, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from comfyui_xdit_hunyuan.worker.client import close_pools_on_sigterm
    close_pools_on_sigterm()                       # a killed run leaves no pool folder behind
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
