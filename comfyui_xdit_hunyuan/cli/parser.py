"""The command line's options: `demo`, `generate` and `bench` (bench.py's own options).

The flags are the ComfyUI nodes' input names: the parallel ones xDiT Parallel Config's (--cfg-degree,
--ulysses-degree, --ring-degree, --pipefusion-degree, --num-pipeline-patch, --warmup-steps, --compile ...),
the sampling ones KSampler's (--seed, --steps, --cfg, --sampler-name, --scheduler), with the nodes' defaults
where a command line can have them (the steps and the size depend on where the workers run). The flags of
earlier versions are not aliases: each is an error naming the flag that replaced it (--guidance 4 ->
"renamed to --cfg"), so no old command line runs with another meaning.
"""
from __future__ import annotations

import argparse

from .settings import CPU_DEFAULTS, GPU_DEFAULTS
from .usage import EXIT_USAGE, PROG

# earlier flag -> (its replacement, why)
RENAMED = {
    "--guidance": ("--cfg", "KSampler's name for the guidance scale"),
    "--ulysses": ("--ulysses-degree", "the parallel config node's input name"),
    "--ring": ("--ring-degree", "the parallel config node's input name"),
    "--pipefusion": ("--pipefusion-degree", "the parallel config node's input name"),
    "--patches": ("--num-pipeline-patch", "the parallel config node's input name"),
    "--warmup": ("--warmup-steps", "the parallel config node's input name"),
}


class Parser(argparse.ArgumentParser):
    """argparse with a short error: the message and where to find the options (exit code 2). No
    abbreviations: a flag is written whole, as --help shows it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


class Renamed(argparse.Action):
    """A flag of an earlier version, hidden from --help: using it is an error naming its replacement."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs="?",
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        new, why = RENAMED[option_string]
        hint = " (the CFG-parallel degree, which --cfg was before, is now --cfg-degree)" if new == "--cfg" else ""
        raise argparse.ArgumentError(self, f"renamed to {new}, {why}{hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, description="HunyuanDiT with xDiT-style hybrid parallelism on a pool of worker processes.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()

    demo = sub.add_parser(
        "demo", parents=[common], help="run end to end on random weights (no downloads) or --ckpt",
        description="Sample a HunyuanDiT through the worker pool with no downloads: random weights built in\n"
                    "memory on the workers (or a real checkpoint with --ckpt) and random conditioning shaped\n"
                    "like HunyuanDiT's text encoders. Writes latent.safetensors (ComfyUI SaveLatent format),\n"
                    "run.json and preview.png into --out.",
        epilog=f"examples:\n  {PROG} demo\n  {PROG} demo --devices cpu:4 --cfg-degree 2 --ulysses-degree 2\n"
               f"  {PROG} demo --devices 0,1,2,3 --cfg-degree 2 --pipefusion-degree 2 --size 2048",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_options(demo)

    gen = sub.add_parser(
        "generate", parents=[common], help="a prompt through a diffusers-format HunyuanDiT directory -> PNG",
        description="Encode a prompt with the directory's BERT and mT5 (transformers), sample with our\n"
                    "HunyuanDiT on the worker pool, decode with its VAE (diffusers). Writes image.png,\n"
                    "latent.safetensors, run.json and preview.png into --out.",
        epilog=f"example:\n  {PROG} generate --model-dir HunyuanDiT-v1.2-Diffusers --prompt 'a red fox in "
               f"the snow' --devices 0,1 --cfg-degree 2 --cfg 6",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_options(gen)
    add_bench_parser(sub)
    return parser


def common_options() -> argparse.ArgumentParser:
    """The options of demo and generate: the parallel config node's inputs, KSampler's, the output."""
    from comfyui_xdit_hunyuan.config import DTYPES
    from comfyui_xdit_hunyuan.model.attention import BACKENDS
    from comfyui_xdit_hunyuan.plan import STRATEGIES
    from comfyui_xdit_hunyuan.sampling import SAMPLERS, SCHEDULERS

    common = Parser(add_help=False)
    par = common.add_argument_group("parallelism (the xDiT Parallel Config node's inputs; checked before any "
                                    "worker starts)")
    par.add_argument("--devices", default="all", metavar="SPEC",
                     help="'all' (every visible GPU; one CPU worker when there is none), '0,1' or "
                          "'cuda:0,cuda:1' (those GPUs), 'cpu:N' (N CPU worker processes). Default: all")
    par.add_argument("--strategy", choices=STRATEGIES,
                     help="auto: degrees chosen for the device count and image size; manual: the degrees "
                          "given below. Default: auto, or manual when a degree is given")
    par.add_argument("--cfg-degree", type=int, metavar="N",
                     help="CFG-parallel degree, 1 or 2 (2: the negative and the positive prompt on different "
                          "devices; wasted when --cfg is 1)")
    par.add_argument("--ulysses-degree", type=int, metavar="N",
                     help="Ulysses sequence-parallel degree (must divide the 16 attention heads)")
    par.add_argument("--ring-degree", type=int, metavar="N", help="Ring-attention sequence-parallel degree")
    par.add_argument("--pipefusion-degree", type=int, metavar="N",
                     help="PipeFusion pipeline degree (stages of transformer blocks); approximate after the "
                          "warm-up steps")
    par.add_argument("--num-pipeline-patch", type=int, default=0, metavar="N",
                     help="PipeFusion patches per image, >= the pipeline degree (0: one per stage). Default: 0")
    par.add_argument("--warmup-steps", type=int, default=1, metavar="N",
                     help="PipeFusion synchronous warm-up steps before pipelining (= --steps: exact). Default: 1")
    par.add_argument("--attention", choices=BACKENDS, default="auto",
                     help="attention kernel. Default: auto (the fastest available)")
    par.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="compute dtype of the workers. Default: auto (bf16 on GPU, fp32 on CPU)")
    par.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                     help="torch.compile the model on the GPU workers (CPU workers run eager). Default: off "
                          "(eager steps with CUDA graphs measured as fast)")
    for old in ("--ulysses", "--ring", "--pipefusion", "--patches", "--warmup"):
        par.add_argument(old, action=Renamed)

    smp = common.add_argument_group("sampling (KSampler's inputs)")
    smp.add_argument("--seed", type=int, default=0, help="noise seed. Default: 0")
    smp.add_argument("--steps", type=int, metavar="N",
                     help=f"sampling steps. Default: {CPU_DEFAULTS['steps']} on CPU, {GPU_DEFAULTS['steps']} on GPU")
    smp.add_argument("--cfg", type=float, default=5.0, metavar="SCALE",
                     help="classifier-free guidance scale (1.0 skips the negative prompt). Default: 5.0")
    smp.add_argument("--sampler-name", "--sampler", choices=SAMPLERS, default="euler", metavar="NAME",
                     help=f"one of: {', '.join(SAMPLERS)}. Default: euler")
    smp.add_argument("--scheduler", choices=SCHEDULERS, default="normal", metavar="NAME",
                     help=f"one of: {', '.join(SCHEDULERS)}. Default: normal")
    smp.add_argument("--size", metavar="WxH",
                     help=f"image size in pixels, 'WxH' or 'N' for NxN, multiples of 8. "
                          f"Default: {CPU_DEFAULTS['size']} on CPU, {GPU_DEFAULTS['size']} on GPU")
    smp.add_argument("--preview-every", type=int, default=0, metavar="N",
                     help="also write a latent preview PNG every N steps (0: only the final one). Default: 0")
    smp.add_argument("--guidance", action=Renamed)

    out = common.add_argument_group("output")
    out.add_argument("--out", default="out", metavar="DIR", help="output folder. Default: ./out")
    out.add_argument("-v", "--verbose", action="store_true", help="show the workers' own output")
    return common


def add_demo_options(demo: argparse.ArgumentParser) -> None:
    from comfyui_xdit_hunyuan.tiny import PRESETS

    model = demo.add_argument_group("model")
    model.add_argument("--ckpt", metavar="PATH",
                       help="a HunyuanDiT checkpoint instead of random weights: ComfyUI checkpoint, bare "
                            "safetensors, original .pt or diffusers transformer/ directory")
    model.add_argument("--preset", choices=tuple(PRESETS),
                       help=f"random-weight model size. Default: {CPU_DEFAULTS['preset']} on CPU (real text "
                            f"widths, 6 small blocks), {GPU_DEFAULTS['preset']} on GPU (the released size)")
    model.add_argument("--weights-seed", type=int, metavar="N",
                       help="seed of the random weights and conditioning. Default: 0")


def add_generate_options(gen: argparse.ArgumentParser) -> None:
    inp = gen.add_argument_group("model and prompt")
    inp.add_argument("--model-dir", required=True, metavar="DIR",
                     help="a diffusers HunyuanDiT directory: transformer/, text_encoder/ (BERT), "
                          "text_encoder_2/ (mT5), tokenizer/, tokenizer_2/, vae/")
    inp.add_argument("--prompt", required=True, help="what to draw")
    inp.add_argument("--negative", default="", help="negative prompt. Default: empty")
    inp.add_argument("--text-device", default="auto", metavar="DEVICE",
                     help="where the text encoders and the VAE run: 'cpu', 'cuda:N' or auto (the first GPU "
                          "of --devices, else cpu). Default: auto")


def add_bench_parser(sub) -> None:
    """`bench` lives in comfyui_xdit_hunyuan/bench.py (its own options); a bench module that fails to
    import leaves demo and generate working and makes `bench` report why."""
    try:
        from comfyui_xdit_hunyuan import bench
        bench.add_arguments  # noqa: B018 - the entry points this command needs
        bench.main  # noqa: B018
    except Exception as e:  # noqa: BLE001
        p = sub.add_parser("bench", help="latency of every parallel configuration (unavailable)")
        p.set_defaults(bench_error=f"{type(e).__name__}: {e}")
        return
    p = sub.add_parser("bench", help="latency of every parallel configuration that fits the devices",
                       description=(bench.__doc__ or "").strip() or None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
