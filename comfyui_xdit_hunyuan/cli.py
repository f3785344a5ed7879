"""Command line: ``python -m comfyui_xdit_hunyuan demo|generate|bench [options]``.

demo
    Runs HunyuanDiT end to end with no downloads: random weights built in memory on the workers (or a
    real checkpoint with --ckpt) on random HunyuanDiT-shaped conditioning, through the worker pool with
    any parallel degrees. Prints the resolved configuration, one line per step, the sampling time, and
    writes the latent (ComfyUI SaveLatent format), a JSON of the run and a latent-space preview PNG.
generate
    A prompt through a diffusers-format HunyuanDiT directory: BERT + mT5 (transformers) encode the text,
    our model samples on the pool, the diffusers VAE decodes; writes a PNG.
bench
    comfyui_xdit_hunyuan/bench.py: latency of the parallel configurations (its own options).

Every option is checked before any worker process starts: a bad one exits with code 2 and a message
that says what to change. A failure of the workers exits with code 1, Ctrl+C with 130.
Heavy packages (transformers, diffusers) are imported only by `generate`, when it needs them.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROG = "python -m comfyui_xdit_hunyuan"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# What a run defaults to, by where its workers run.
CPU_DEFAULTS = {"preset": "small", "steps": 8, "size": 256}
GPU_DEFAULTS = {"preset": "full", "steps": 50, "size": 1024}
# (option, ParallelConfig field)
DEGREES = (("cfg", "cfg_degree"), ("ulysses", "ulysses_degree"), ("ring", "ring_degree"),
           ("pipefusion", "pipefusion_degree"))
SEED_MAX = 2 ** 64 - 1
SDXL_SCALE_FACTOR = 0.13025          # the sampler works on VAE latent x this (SDXL latent format)
# the folders of a diffusers HunyuanDiT directory
MODEL_DIR_PARTS = {"transformer": "the HunyuanDiT transformer", "text_encoder": "the BERT text encoder",
                   "text_encoder_2": "the mT5 text encoder", "tokenizer": "the BERT tokenizer",
                   "tokenizer_2": "the mT5 tokenizer", "vae": "the VAE"}


class UsageError(Exception):
    """A bad option or input: reported with exit code 2 before any worker starts."""


class Parser(argparse.ArgumentParser):
    """argparse with a short error: the message and where to find the options (exit code 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


# the engine's input names (PlanError fields) -> this command line's options
OPTION_NAMES = {"cfg_degree": "--cfg", "ulysses_degree": "--ulysses", "ring_degree": "--ring",
                "pipefusion_degree": "--pipefusion", "num_pipeline_patch": "--patches", "warmup_steps": "--warmup",
                "strategy": "--strategy", "devices": "--devices", "attention": "--attention", "dtype": "--dtype",
                "steps": "--steps", "cfg": "--guidance"}


def in_option_words(message) -> str:
    """An engine message (plan.Message, PlanError) in this command line's words; other text as it is."""
    render = getattr(message, "render", None)
    return render(OPTION_NAMES) if render is not None else str(message)


# ====================================================================== the parser
def build_parser() -> argparse.ArgumentParser:
    from comfyui_xdit_hunyuan.model.attention import BACKENDS
    from comfyui_xdit_hunyuan.config import DTYPES
    from comfyui_xdit_hunyuan.plan import STRATEGIES
    from comfyui_xdit_hunyuan.sampling import SAMPLERS, SCHEDULERS
    from comfyui_xdit_hunyuan.tiny import PRESETS

    parser = Parser(
        prog=PROG, description="HunyuanDiT with xDiT-style hybrid parallelism on a pool of worker processes.",
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = Parser(add_help=False)
    par = common.add_argument_group("parallelism (checked before any worker starts)")
    par.add_argument("--devices", default="all", metavar="SPEC",
                     help="'all' (every visible GPU; one CPU worker when there is none), '0,1' or "
                          "'cuda:0,cuda:1' (those GPUs), 'cpu:N' (N CPU worker processes). Default: all")
    par.add_argument("--strategy", choices=STRATEGIES,
                     help="auto: degrees chosen for the device count and image size; manual: the degrees "
                          "given below. Default: manual if any degree is given, else auto")
    par.add_argument("--cfg", dest="cfg_degree", type=int, metavar="N",
                     help="CFG-parallel degree, 1 or 2 (2: the negative and positive prompt on different "
                          "devices)")
    par.add_argument("--ulysses", dest="ulysses_degree", type=int, metavar="N",
                     help="Ulysses sequence-parallel degree (must divide the 16 attention heads)")
    par.add_argument("--ring", dest="ring_degree", type=int, metavar="N",
                     help="Ring-attention sequence-parallel degree")
    par.add_argument("--pipefusion", dest="pipefusion_degree", type=int, metavar="N",
                     help="PipeFusion pipeline degree (stages of transformer blocks)")
    par.add_argument("--patches", dest="num_pipeline_patch", type=int, default=0, metavar="N",
                     help="PipeFusion patches per image, >= the pipeline degree (0: one per stage). Default: 0")
    par.add_argument("--warmup", dest="warmup_steps", type=int, default=1, metavar="N",
                     help="PipeFusion synchronous warm-up steps before pipelining. Default: 1")
    par.add_argument("--attention", choices=BACKENDS, default="auto",
                     help="attention kernel. Default: auto (the fastest available)")
    par.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="compute dtype of the workers. Default: auto (bf16 on GPU, fp32 on CPU)")
    par.add_argument("--compile", action="store_true", help="torch.compile the model on the GPU workers "
                     "(CPU workers run eager)")

    smp = common.add_argument_group("sampling")
    smp.add_argument("--steps", type=int, metavar="N",
                     help=f"sampling steps. Default: {CPU_DEFAULTS['steps']} on CPU, {GPU_DEFAULTS['steps']} on GPU")
    smp.add_argument("--size", metavar="WxH",
                     help=f"image size in pixels, 'WxH' or 'N' for NxN, multiples of 8. "
                          f"Default: {CPU_DEFAULTS['size']} on CPU, {GPU_DEFAULTS['size']} on GPU")
    smp.add_argument("--guidance", type=float, default=5.0, metavar="SCALE",
                     help="classifier-free guidance scale (ComfyUI's 'cfg'; 1.0 skips the negative prompt). "
                          "Default: 5.0")
    smp.add_argument("--sampler", choices=SAMPLERS, default="euler", metavar="NAME",
                     help=f"one of: {', '.join(SAMPLERS)}. Default: euler")
    smp.add_argument("--scheduler", choices=SCHEDULERS, default="normal", metavar="NAME",
                     help=f"one of: {', '.join(SCHEDULERS)}. Default: normal")
    smp.add_argument("--seed", type=int, default=0, help="noise seed (as KSampler's). Default: 0")
    smp.add_argument("--preview-every", type=int, default=0, metavar="N",
                     help="also write a latent preview PNG every N steps (0: only the final one). Default: 0")

    out = common.add_argument_group("output")
    out.add_argument("--out", default="out", metavar="DIR", help="output folder. Default: ./out")
    out.add_argument("-v", "--verbose", action="store_true", help="show the workers' own output")

    demo = sub.add_parser(
        "demo", parents=[common], help="run end to end on random weights (no downloads) or --ckpt",
        description="Sample a HunyuanDiT through the worker pool with no downloads: random weights built in\n"
                    "memory on the workers (or a real checkpoint with --ckpt) and random conditioning shaped\n"
                    "like HunyuanDiT's text encoders. Writes latent.safetensors (ComfyUI SaveLatent format),\n"
                    "run.json and preview.png into --out.",
        epilog=f"examples:\n  {PROG} demo\n  {PROG} demo --devices cpu:4 --cfg 2 --ulysses 2\n"
               f"  {PROG} demo --devices 0,1,2,3 --cfg 2 --pipefusion 2 --size 2048",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    model = demo.add_argument_group("model")
    model.add_argument("--ckpt", metavar="PATH",
                       help="a HunyuanDiT checkpoint instead of random weights: ComfyUI checkpoint, bare "
                            "safetensors, original .pt or diffusers transformer/ directory")
    model.add_argument("--preset", choices=tuple(PRESETS),
                       help=f"random-weight model size. Default: {CPU_DEFAULTS['preset']} on CPU (real text "
                            f"widths, 6 small blocks), {GPU_DEFAULTS['preset']} on GPU (the released size)")
    model.add_argument("--weights-seed", type=int, metavar="N",
                       help="seed of the random weights and conditioning. Default: 0")

    gen = sub.add_parser(
        "generate", parents=[common], help="a prompt through a diffusers-format HunyuanDiT directory -> PNG",
        description="Encode a prompt with the directory's BERT and mT5 (transformers), sample with our\n"
                    "HunyuanDiT on the worker pool, decode with its VAE (diffusers). Writes image.png,\n"
                    "latent.safetensors, run.json and preview.png into --out.",
        epilog=f"example:\n  {PROG} generate --model-dir HunyuanDiT-v1.2-Diffusers --prompt 'a red fox in "
               f"the snow' --devices 0,1 --cfg 2",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inp = gen.add_argument_group("model and prompt")
    inp.add_argument("--model-dir", required=True, metavar="DIR",
                     help="a diffusers HunyuanDiT directory: transformer/, text_encoder/ (BERT), "
                          "text_encoder_2/ (mT5), tokenizer/, tokenizer_2/, vae/")
    inp.add_argument("--prompt", required=True, help="what to draw")
    inp.add_argument("--negative", default="", help="negative prompt. Default: empty")
    inp.add_argument("--text-device", default="auto", metavar="DEVICE",
                     help="where the text encoders and the VAE run: 'cpu', 'cuda:N' or auto (the first GPU "
                          "of --devices, else cpu). Default: auto")
    add_bench_parser(sub)
    return parser


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


def run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench_error", None):
        print(f"{PROG} bench: the benchmark module cannot be loaded ({args.bench_error})", file=sys.stderr)
        return EXIT_FAILED
    from comfyui_xdit_hunyuan import bench
    return int(bench.main(args) or 0)


# ====================================================================== checked settings
@dataclass
class Settings:
    """The options of a run after every check, before any worker starts."""
    command: str
    devices: list[str]
    gpu: bool
    pool: Any                          # config.PoolConfig: what the worker processes run with
    config: Any                        # ParallelConfig as the user gave it (strategy filled in)
    steps: int
    width: int
    height: int
    guidance: float
    sampler: str
    scheduler: str
    seed: int
    preview_every: int
    out: Path
    defaulted: set = field(default_factory=set)   # option names whose value is the CPU/GPU default
    plan: Any = None                   # resolved ParallelConfig
    warnings: list = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return self.pool.dtype if self.pool.dtype != "auto" else ("bf16" if self.gpu else "fp32")


@contextmanager
def checking():
    """Turn the engine's input errors into UsageError (exit code 2)."""
    from comfyui_xdit_hunyuan.job import JobError
    from comfyui_xdit_hunyuan.plan import PlanError
    try:
        yield
    except PlanError as e:
        raise UsageError(in_option_words(e)) from e
    except (JobError, ValueError) as e:
        raise UsageError(str(e)) from e


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
    """Devices, parallel options and sampling options, checked (model-independent part)."""
    from comfyui_xdit_hunyuan.config import PoolConfig, env_overrides, parse_devices
    from comfyui_xdit_hunyuan.plan import ParallelConfig

    with checking():
        devices = parse_devices(args.devices)
    gpu = devices[0].startswith("cuda")
    defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    defaulted = set()

    degrees = {f: getattr(args, f) for _, f in DEGREES if getattr(args, f) is not None}
    strategy = args.strategy or ("manual" if degrees else "auto")
    if strategy == "auto" and degrees:
        given = " ".join(f"--{opt}" for opt, f in DEGREES if f in degrees)
        raise UsageError(f"--strategy auto chooses the degrees itself; drop {given}, or use --strategy manual")
    pool = PoolConfig(devices=args.devices, attention=args.attention, dtype=args.dtype,
                      compile=bool(args.compile)).with_overrides(env_overrides(os.environ))
    config = ParallelConfig(strategy=strategy, num_pipeline_patch=args.num_pipeline_patch,
                            warmup_steps=args.warmup_steps, **degrees)
    # config.validate() runs in resolve_plan(), with the model's own head count and depth
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
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UsageError(f"--guidance {args.guidance}: use a finite scale >= 0 (5.0 is usual; 1.0 skips the "
                         f"negative prompt)")
    if not 0 <= args.seed <= SEED_MAX:
        raise UsageError(f"--seed {args.seed}: use a whole number from 0 to 2^64-1")
    if args.preview_every < 0:
        raise UsageError(f"--preview-every {args.preview_every}: use 0 (final preview only) or N >= 1")
    return Settings(command=args.command, devices=devices, gpu=gpu, pool=pool, config=config, steps=steps, width=width,
                    height=height, guidance=float(args.guidance), sampler=args.sampler, scheduler=args.scheduler,
                    seed=int(args.seed), preview_every=int(args.preview_every), out=Path(args.out),
                    defaulted=defaulted)


def latent_hw(s: Settings, vae_factor: int = 8) -> tuple[int, int]:
    return s.height // vae_factor, s.width // vae_factor


def resolve_plan(s: Settings, mcfg, hw: tuple[int, int]) -> None:
    """The concrete degrees for this model and image, checked against the job (sets s.plan, s.warnings)."""
    from comfyui_xdit_hunyuan.plan import check_job, load_table, resolve

    with checking():
        s.plan = resolve(s.config, s.pool.devices, len(s.devices), hw, not math.isclose(s.guidance, 1.0),
                         num_heads=mcfg.num_heads, depth=mcfg.depth, table=load_table(s.pool.auto_table))
        warnings = check_job(s.plan, steps=s.steps, latent_hw=hw, cfg_scale=s.guidance, patch_size=mcfg.patch_size)
    s.warnings = [in_option_words(w) for w in warnings]


def sampling_inputs(s: Settings, mcfg, hw: tuple[int, int]):
    """(latent, noise, sigmas) as KSampler makes them for an empty latent of size hw."""
    import torch

    from comfyui_xdit_hunyuan import sampling

    ms = sampling.DiscreteVSampling.for_model(mcfg)
    with checking():
        sigmas = sampling.sigmas_for_denoise(ms, s.scheduler, s.steps, 1.0, sampler=s.sampler)
    if not bool(torch.isfinite(sigmas).all()):
        raise UsageError(f"scheduler '{s.scheduler}' gives non-finite sigmas for {s.steps} steps; choose another "
                         f"--scheduler")
    latent = torch.zeros(1, mcfg.in_channels, *hw)
    return latent, sampling.prepare_noise(latent, s.seed), sigmas


def checkpoint_identity(path: Path) -> str:
    """Changes whenever the file (or a diffusers folder's weights) changes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"file:{path.resolve()}|{stamp}"


def param_count(mcfg) -> int:
    from comfyui_xdit_hunyuan.model import HunyuanDiT
    return sum(p.numel() for p in HunyuanDiT(mcfg, device="meta").parameters())


# ====================================================================== printing
def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def describe_devices(devices: list[str]) -> str:
    if devices[0] == "cpu":
        return f"{plural(len(devices), 'CPU worker process', 'CPU worker processes')} (gloo)"
    return f"{', '.join(devices)} ({plural(len(devices), 'GPU worker process', 'GPU worker processes')}, NCCL)"


def describe_model(mcfg, params: int) -> str:
    return (f"HunyuanDiT {mcfg.version}, {mcfg.depth} blocks, hidden {mcfg.hidden_size}, {mcfg.num_heads} heads, "
            f"{params / 1e6:.1f} M parameters")


def print_settings(title: str, s: Settings, hw: tuple[int, int], patch: int, model_lines: list[str]) -> None:
    plan = s.plan
    how = ("manual" if s.config.strategy == "manual"
           else f"auto, for {plural(len(s.devices), 'device')} at {s.width}x{s.height}")
    rows, cols = (hw[0] + patch // 2) // patch, (hw[1] + patch // 2) // patch
    note = lambda name: f" (default on {'GPU' if s.gpu else 'CPU'})" if name in s.defaulted else ""  # noqa: E731
    say(title,
        f"  devices    {describe_devices(s.devices)}",
        f"  parallel   {plan.describe()}  [{how}; world size {plan.world_size}]",
        f"  dtype      {s.dtype_name}{' (auto)' if s.pool.dtype == 'auto' else ''}, attention {s.pool.attention}"
        f"{(', torch.compile' if s.gpu else ', compile ignored (CPU workers run eager)') if s.pool.compile else ''}",
        *(f"  {line}" for line in model_lines),
        f"  size       {s.width}x{s.height} pixels{note('size')} -> latent {hw[1]}x{hw[0]}, "
        f"{rows * cols} image tokens",
        f"  sampling   {plural(s.steps, 'step')}{note('steps')}, {s.sampler} / {s.scheduler}, guidance {s.guidance}, "
        f"seed {s.seed}",
        f"  output     {s.out}{os.sep}")
    for w in s.warnings:
        say(f"warning: {w}")


# ====================================================================== the pool
def pool_module():
    """The worker pool's client module (imported when a command needs it: it brings torch's start-up cost)."""
    from .worker import client
    return client


@dataclass
class RunResult:
    latent: Any
    step_seconds: list[float]
    sampling_seconds: float
    start_seconds: float
    load_seconds: float


class PoolSession:
    """The pool of one command: started (optionally in the background while the parent encodes text),
    one warm-up job that loads the weights, the timed job, closed at the end whatever happens."""

    def __init__(self, pool_config, plan, *, verbose: bool = False):
        client = pool_module()
        log = logging.getLogger("comfyui_xdit_hunyuan.pool")
        log.setLevel(logging.INFO if verbose else logging.CRITICAL)
        if verbose and not log.handlers:          # the workers' own output, as it comes
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
        self.plan = plan
        self.pool = client.get_pool(pool_config)
        self.start_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, *, background: bool = False) -> None:
        say(f"starting {plural(len(self.pool.devices), 'worker process', 'worker processes')} ...")
        if not background:
            self._start()
            self._report_started()
            return
        self._thread = threading.Thread(target=self._start, name="xdit-cli-pool-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        t0 = time.perf_counter()
        try:
            self.pool.start()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by wait_started()
            self._error = e
        self.start_seconds = time.perf_counter() - t0

    def _report_started(self) -> None:
        if self._error is not None:
            raise self._error
        say(f"workers ready in {self.start_seconds:.1f} s (pids {', '.join(map(str, self.pool.pids))})")

    def wait_started(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._report_started()

    def run(self, job, *, on_preview: Callable[[int, Any], None] | None = None) -> RunResult:
        """Load the weights with a one-step warm-up job (not timed as sampling), then run `job` timed."""
        from dataclasses import replace

        import torch

        self.wait_started()
        t0 = time.perf_counter()
        warm = replace(job, sigmas=torch.stack([job.sigmas[0], job.sigmas[-1]]), sampler="euler",
                       sampler_options={}, step_noises=None, preview_every=0, job_id=f"{job.job_id}-warmup")
        self.pool.run(warm, self.plan)
        load_seconds = time.perf_counter() - t0
        say(f"weights loaded + 1 warm-up step in {load_seconds:.2f} s", f"sampling {plural(job.steps, 'step')}:")

        steps: list[float] = []
        width = len(str(job.steps))
        t_start = last = time.perf_counter()

        def on_progress(step: int, total: int, preview) -> None:
            nonlocal last
            now = time.perf_counter()
            steps.append(now - last)
            last = now
            say(f"  step {step:>{width}}/{total}  {steps[-1]:8.3f} s   (elapsed {now - t_start:7.2f} s)")
            if preview is not None and on_preview is not None:
                on_preview(step, preview)

        latent = self.pool.run(job, self.plan, on_progress=on_progress)
        total = time.perf_counter() - t_start
        say(f"sampling time: {total:.2f} s for {plural(job.steps, 'step')} ({total / job.steps:.3f} s/step, "
            f"{self.plan.describe()} on {plural(len(self.pool.devices), 'worker')})")
        return RunResult(latent, steps, total, self.start_seconds, load_seconds)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.pool.close()


def run_guarded(body: Callable[[], int]) -> int:
    """Run the part that uses workers: their failures exit 1, Ctrl+C exits 130 (workers are stopped)."""
    from comfyui_xdit_hunyuan.job import JobCancelled, JobError, PoolError
    from comfyui_xdit_hunyuan.plan import PlanError

    try:
        return body()
    except KeyboardInterrupt:
        print("\ninterrupted: the workers were stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except JobCancelled as e:
        print(f"cancelled: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (JobError, PlanError) as e:
        print(f"error: the workers rejected the job: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED


# ====================================================================== outputs
def write_latent(path: Path, latent, meta: dict) -> None:
    """The latent as ComfyUI's SaveLatent writes it (LoadLatent reads it back unscaled)."""
    import torch
    from safetensors.torch import save_file

    save_file({"latent_tensor": latent.to("cpu", torch.float32).contiguous(),
               "latent_format_version_0": torch.tensor([])},
              str(path), metadata={"xdit_hunyuan": json.dumps(meta)})


def run_record(s: Settings, model: dict, result: RunResult, files: dict) -> dict:
    return {
        "command": s.command,
        "devices": s.devices,
        "pool": s.pool.to_dict(),
        "parallel": s.plan.to_dict(),
        "parallel_description": s.plan.describe(),
        "dtype": s.dtype_name,
        "model": model,
        "size": {"width": s.width, "height": s.height},
        "latent_shape": list(result.latent.shape),
        "steps": s.steps, "sampler": s.sampler, "scheduler": s.scheduler, "guidance": s.guidance, "seed": s.seed,
        "warnings": s.warnings,
        "timings": {"pool_start_s": round(result.start_seconds, 4), "load_and_warmup_s": round(result.load_seconds, 4),
                    "sampling_s": round(result.sampling_seconds, 4),
                    "step_s": [round(t, 4) for t in result.step_seconds]},
        "files": files,
    }


def write_outputs(s: Settings, result: RunResult, model: dict, extra: dict | None = None) -> dict:
    """latent.safetensors, preview.png and run.json into s.out; `extra` maps a name to (path, note) of
    files already written (listed in run.json and printed)."""
    from comfyui_xdit_hunyuan.preview import save_preview

    extra = extra or {}
    files = {name: str(path) for name, (path, _) in extra.items()}
    files.update(latent=str(s.out / "latent.safetensors"), preview=str(s.out / "preview.png"),
                 record=str(s.out / "run.json"))
    record = run_record(s, model, result, files)
    write_latent(Path(files["latent"]), result.latent, record)
    pw, ph = save_preview(result.latent, files["preview"])
    Path(files["record"]).write_text(json.dumps(record, indent=2) + "\n")
    lines = [(files["latent"], f"latent {'x'.join(map(str, result.latent.shape))}, key 'latent_tensor'"),
             (files["preview"], f"{pw}x{ph} latent-space preview"), (files["record"], "the run's settings and timings"),
             *((str(path), note) for path, note in extra.values())]
    width = max(len(path) for path, _ in lines)
    for i, (path, note) in enumerate(lines):
        say(f"{'wrote' if i == 0 else '     '} {path:<{width}}  ({note})")
    return record


def preview_writer(s: Settings) -> Callable[[int, Any], None] | None:
    if not s.preview_every:
        return None
    from comfyui_xdit_hunyuan.preview import save_preview

    def write(step: int, x0) -> None:
        save_preview(x0, s.out / f"preview_step{step:03d}.png", scaled=True)
    return write


def prepare_out(s: Settings) -> None:
    try:
        s.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {s.out}: cannot create the folder ({e.strerror}); choose a writable folder") from e
    if not os.access(s.out, os.W_OK):
        raise UsageError(f"--out {s.out}: the folder is not writable; choose another one")


# ====================================================================== demo
def run_demo(args: argparse.Namespace) -> int:
    from comfyui_xdit_hunyuan.job import Job, WeightsRef
    from comfyui_xdit_hunyuan.tiny import preset, random_cond

    s = common_settings(args)
    if args.ckpt:
        if args.preset or args.weights_seed is not None:
            raise UsageError("--preset and --weights-seed choose random weights; drop them when loading --ckpt")
        from comfyui_xdit_hunyuan.model.loading import inspect_source
        path = Path(args.ckpt).expanduser()
        with checking():
            mcfg = inspect_source(path)
        ref = WeightsRef(checkpoint_identity(path), str(path.resolve()))
        model_lines = [f"model      {path} ({describe_model(mcfg, param_count(mcfg))})"]
        model_info = {"source": str(path.resolve()), "config": mcfg.to_dict()}
        cond_seed = 0
    else:
        name = args.preset or (GPU_DEFAULTS if s.gpu else CPU_DEFAULTS)["preset"]
        if args.preset is None:
            s.defaulted.add("preset")
        cond_seed = args.weights_seed or 0
        if cond_seed < 0:
            raise UsageError(f"--weights-seed {cond_seed}: use a whole number >= 0")
        mcfg = preset(name)
        ref = WeightsRef(f"random:{cond_seed}:{name}", f"random:{cond_seed}:{name}")
        hint = ("; --preset full for the released size" if not s.gpu and name != "full"
                else "; --preset small for a quick run" if s.gpu and name == "full" else "")
        default = f" (default on {'GPU' if s.gpu else 'CPU'}{hint})" if args.preset is None else ""
        params = param_count(mcfg)
        model_lines = [f"model      random weights, preset '{name}'{default}, weights seed {cond_seed}",
                       f"           {describe_model(mcfg, params)}"]
        model_info = {"source": ref.source, "preset": name, "params": params, "config": mcfg.to_dict()}
    model_lines.append(f"text       random conditioning: BERT {mcfg.text_len} x {mcfg.text_dim}, "
                       f"mT5 {mcfg.text_len_t5} x {mcfg.text_dim_t5} (a positive and a negative)")

    hw = latent_hw(s)
    resolve_plan(s, mcfg, hw)
    latent, noise, sigmas = sampling_inputs(s, mcfg, hw)
    prepare_out(s)

    def cond(seed_offset: int, used: float):
        c = random_cond(mcfg, seed=1000 * seed_offset + cond_seed, used=used, hw=(s.height, s.width))
        if not mcfg.size_cond:
            c.image_meta_size = None
        return c

    job = Job(weights=ref, positive=[cond(1, 0.6)], negative=[cond(2, 0.2)], latent=latent, noise=noise,
              sigmas=sigmas, sampler=s.sampler, cfg=s.guidance, seed=s.seed, preview_every=s.preview_every,
              job_id="demo")
    print_settings("xDiT HunyuanDiT demo", s, hw, mcfg.patch_size, model_lines)

    def body() -> int:
        session = PoolSession(s.pool, s.plan, verbose=args.verbose)
        try:
            session.start()
            result = session.run(job, on_preview=preview_writer(s))
        finally:
            session.close()
        write_outputs(s, result, model_info)
        return EXIT_OK
    return run_guarded(body)


# ====================================================================== generate
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: {what} needs its config.json; is this a diffusers HunyuanDiT "
                         f"directory?") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} cannot be read as JSON ({e}); re-download {what}") from None


@dataclass
class ModelDir:
    root: Path
    mcfg: Any
    vae_factor: int
    vae_scaling: float
    identity: str


def check_model_dir(root: Path) -> ModelDir:
    """Structure, transformer weights and the widths the parts must agree on, from config files only."""
    from comfyui_xdit_hunyuan.model.loading import inspect_source

    if not root.is_dir():
        raise UsageError(f"--model-dir {root}: no such folder; give the folder of a diffusers-format HunyuanDiT "
                         f"(e.g. HunyuanDiT-v1.2-Diffusers)")
    missing = [f"{name}/ ({what})" for name, what in MODEL_DIR_PARTS.items() if not (root / name).is_dir()]
    if missing:
        raise UsageError(f"--model-dir {root} lacks {', '.join(missing)}; a diffusers HunyuanDiT directory has "
                         f"{', '.join(n + '/' for n in MODEL_DIR_PARTS)}")
    with checking():
        mcfg = inspect_source(root / "transformer")
    bert = _read_json(root / "text_encoder" / "config.json", "the BERT text encoder")
    t5 = _read_json(root / "text_encoder_2" / "config.json", "the mT5 text encoder")
    vae = _read_json(root / "vae" / "config.json", "the VAE")
    for what, got, want in (("text_encoder/ (BERT) hidden_size", bert.get("hidden_size"), mcfg.text_dim),
                            ("text_encoder_2/ (mT5) d_model", t5.get("d_model"), mcfg.text_dim_t5),
                            ("vae/ latent_channels", vae.get("latent_channels", 4), mcfg.in_channels)):
        if got != want:
            raise UsageError(f"{root}: {what} is {got} but the transformer expects {want}; the folders come from "
                             f"different models -- use the directory of one HunyuanDiT release")
    vae_factor = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    weights = root / "transformer"
    return ModelDir(root, mcfg, vae_factor, float(vae.get("scaling_factor", SDXL_SCALE_FACTOR)),
                    checkpoint_identity(weights))


def pick_text_device(spec: str, s: Settings) -> str:
    import torch

    if spec == "auto":
        return s.devices[0] if s.gpu else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--text-device '{spec}': write 'cpu', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if (dev.index or 0) >= n:
            raise UsageError(f"--text-device '{spec}': this machine has {'GPUs 0..' + str(n - 1) if n else 'no GPU'}; "
                             f"use {'cuda:0' if n else 'cpu'}")
    elif dev.type != "cpu":
        raise UsageError(f"--text-device '{spec}': write 'cpu', 'cuda:N' or 'auto'")
    return str(dev)


def quiet_libraries() -> None:
    """transformers / diffusers: errors only, no download or loading progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (transformers_logging, diffusers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _load_text_encoder(path: Path):
    from transformers import AutoConfig, AutoModel, BertModel, MT5EncoderModel, T5EncoderModel

    kind = AutoConfig.from_pretrained(path).model_type
    cls = {"bert": BertModel, "mt5": MT5EncoderModel, "t5": T5EncoderModel}.get(kind, AutoModel)
    return cls.from_pretrained(path)


def encode_prompts(root: Path, prompt: str, negative: str, mcfg, size_hw: tuple[int, int], device: str):
    """(positive, negative) CondEntry, encoded as the diffusers HunyuanDiT pipeline does: BERT and mT5 last
    hidden states of the text padded to the model's lengths (77 / 256) with their attention masks.
    v1.0/v1.1 models also get image_meta_size [H, W, H, W, 0, 0] (original = target = the image size)."""
    import torch
    from transformers import AutoTokenizer

    from comfyui_xdit_hunyuan.job import CondEntry

    states: dict[str, list] = {}
    for tok_dir, enc_dir, length, width, label in (
            ("tokenizer", "text_encoder", mcfg.text_len, mcfg.text_dim, "BERT"),
            ("tokenizer_2", "text_encoder_2", mcfg.text_len_t5, mcfg.text_dim_t5, "mT5")):
        tokenizer = AutoTokenizer.from_pretrained(root / tok_dir)
        encoder = _load_text_encoder(root / enc_dir).to(device=device, dtype=torch.float32).eval()
        out = []
        for text in (prompt, negative):
            full = len(tokenizer(text, truncation=False).input_ids)
            if full > length:
                say(f"warning: the {'prompt' if text is prompt else 'negative prompt'} has {full} {label} tokens; "
                    f"only the first {length} are used")
            batch = tokenizer(text, padding="max_length", max_length=length, truncation=True,
                              return_attention_mask=True, return_tensors="pt")
            with torch.no_grad():
                hidden = encoder(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))[0]
            if hidden.shape[-1] != width:
                raise ValueError(f"{root / enc_dir} gives {hidden.shape[-1]}-wide states but the transformer "
                                 f"expects {width}")
            out.append((hidden.float().cpu(), batch.attention_mask.cpu()))
        states[label] = out
        del encoder
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    h, w = size_hw
    meta = torch.tensor([[h, w, h, w, 0, 0]], dtype=torch.float32) if mcfg.size_cond else None
    entries = []
    for i in range(2):
        (ctx, mask), (t5, mask_t5) = states["BERT"][i], states["mT5"][i]
        entries.append(CondEntry(context=ctx, text_embedding_mask=mask, encoder_hidden_states_t5=t5,
                                 text_embedding_mask_t5=mask_t5, image_meta_size=meta))
    return entries[0], entries[1]


def decode_latent(root: Path, samples, device: str):
    """uint8 [H, W, 3] image from a LATENT's samples, with the directory's VAE (as the diffusers pipeline
    decodes: latents / scaling_factor, then [-1, 1] -> [0, 255] rounded)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    z = samples.to(device=device, dtype=torch.float32) * (SDXL_SCALE_FACTOR / float(vae.config.scaling_factor))
    with torch.no_grad():
        image = vae.decode(z, return_dict=False)[0]
    image = (image[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    del vae
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return (image * 255).round().astype("uint8")


def run_generate(args: argparse.Namespace) -> int:
    from comfyui_xdit_hunyuan.job import Job, WeightsRef

    missing = [m for m in ("transformers", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"generate needs {' and '.join(missing)} (the text encoders and the VAE): "
                         f"pip install {' '.join(missing)}")
    s = common_settings(args)
    root = Path(args.model_dir).expanduser()
    md = check_model_dir(root)
    if s.width % md.vae_factor or s.height % md.vae_factor:
        raise UsageError(f"--size {s.width}x{s.height}: this VAE needs multiples of {md.vae_factor} pixels")
    mcfg = md.mcfg
    text_device = pick_text_device(args.text_device, s)
    hw = latent_hw(s, md.vae_factor)
    resolve_plan(s, mcfg, hw)
    latent, noise, sigmas = sampling_inputs(s, mcfg, hw)
    prepare_out(s)
    if not math.isclose(md.vae_scaling, SDXL_SCALE_FACTOR, rel_tol=1e-6):
        say(f"warning: vae/ scaling_factor is {md.vae_scaling}, HunyuanDiT's is {SDXL_SCALE_FACTOR}; decoding "
            f"with the VAE's own factor")
    params = param_count(mcfg)
    print_settings("xDiT HunyuanDiT generate", s, hw, mcfg.patch_size, [
        f"model      {root} ({describe_model(mcfg, params)})",
        f"text       BERT {mcfg.text_len} + mT5 {mcfg.text_len_t5} tokens on {text_device}"
        f"{', image_meta_size from the size' if mcfg.size_cond else ''}",
        f"prompt     {args.prompt!r}" + (f", negative {args.negative!r}" if args.negative else "")])

    def body() -> int:
        from PIL import Image

        session = PoolSession(s.pool, s.plan, verbose=args.verbose)
        try:
            session.start(background=True)        # workers start while the text is encoded
            if not args.verbose:
                quiet_libraries()
            t0 = time.perf_counter()
            pos, neg = encode_prompts(root, args.prompt, args.negative, mcfg, (s.height, s.width), text_device)
            say(f"text encoded in {time.perf_counter() - t0:.2f} s")
            job = Job(weights=WeightsRef(md.identity, str((root / "transformer").resolve())), positive=[pos],
                      negative=[neg], latent=latent, noise=noise, sigmas=sigmas, sampler=s.sampler,
                      cfg=s.guidance, seed=s.seed, preview_every=s.preview_every, job_id="generate")
            result = session.run(job, on_preview=preview_writer(s))
        finally:
            session.close()
        t0 = time.perf_counter()
        image = decode_latent(root, result.latent, text_device)
        say(f"decoded with the VAE in {time.perf_counter() - t0:.2f} s")
        image_path = s.out / "image.png"
        Image.fromarray(image).save(image_path)
        model_info = {"source": str(root.resolve()), "params": params, "config": mcfg.to_dict(),
                      "prompt": args.prompt, "negative": args.negative}
        write_outputs(s, result, model_info,
                      extra={"image": (image_path, f"{image.shape[1]}x{image.shape[0]} image")})
        return EXIT_OK

    return run_guarded(body)


# ====================================================================== entry
COMMANDS = {"demo": run_demo, "generate": run_generate, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .worker.client import close_pools_on_sigterm
    close_pools_on_sigterm()                       # a killed run leaves no pool folder behind
    try:
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
