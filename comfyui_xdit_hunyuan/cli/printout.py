"""What demo and generate print before the workers start: the resolved configuration, one row per
concern (devices, parallel plan and how exact its result is, dtype, model, size, sampling, output), then
the plan's warnings.

    xDiT HunyuanDiT demo
      devices    2 CPU worker processes (gloo)
      parallel   pipefusion 2 (2 patches, warmup 1)  [manual; world size 2]
      result     approximate: PipeFusion after 1 warm-up step reuses one-step-old K/V of the other patches
                 measured deviation from the serial run (...)
      dtype      fp32 (auto), attention auto, compile ignored (CPU workers run eager)
      ...
"""
from __future__ import annotations

import os

from .exactness import exactness
from .settings import Settings


def say(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def describe_devices(devices: list[str]) -> str:
    if devices[0] == "cpu":
        return f"{plural(len(devices), 'CPU worker process', 'CPU worker processes')} (gloo)"
    return f"{', '.join(devices)} ({plural(len(devices), 'GPU worker process', 'GPU worker processes')}, NCCL)"


def describe_model(arch, params: int) -> str:
    """A model architecture (model.HunyuanDiTConfig) in one line."""
    return (f"HunyuanDiT {arch.version}, {arch.depth} blocks, hidden {arch.hidden_size}, {arch.num_heads} heads, "
            f"{params / 1e6:.1f} M parameters")


def row(name: str, lines: list[str]) -> list[str]:
    """A row of the printout: `name` before the first line, the others aligned under it."""
    return [f"  {name if i == 0 else '':<10} {line}" for i, line in enumerate(lines)]


def print_settings(title: str, s: Settings, hw: tuple[int, int], patch: int,
                   model_rows: list[tuple[str, list[str]]]) -> None:
    """The configuration of a run; `model_rows` are the command's own rows (name, lines): model, text ..."""
    plan = s.plan
    how = ("manual" if s.parallel.strategy == "manual"
           else f"auto, for {plural(len(s.devices), 'device')} at {s.width}x{s.height}")
    rows, cols = (hw[0] + patch // 2) // patch, (hw[1] + patch // 2) // patch
    note = lambda name: f" (default on {'GPU' if s.gpu else 'CPU'})" if name in s.defaulted else ""  # noqa: E731
    compiled = ", torch.compile" if s.gpu else ", compile ignored (CPU workers run eager)"
    say(title,
        *row("devices", [describe_devices(s.devices)]),
        *row("parallel", [f"{plan.describe()}  [{how}; world size {plan.world_size}]"]),
        *row("result", exactness(plan, s.steps)[1]),
        *row("dtype", [f"{s.dtype_name}{' (auto)' if s.pool.dtype == 'auto' else ''}, attention {s.pool.attention}"
                       f"{compiled if s.pool.compile else ', eager (--no-compile)'}"]),
        *(line for name, lines in model_rows for line in row(name, lines)),
        *row("size", [f"{s.width}x{s.height} pixels{note('size')} -> latent {hw[1]}x{hw[0]}, "
                      f"{rows * cols} image tokens"]),
        *row("sampling", [f"{plural(s.steps, 'step')}{note('steps')}, {s.sampler} / {s.scheduler}, "
                          f"guidance {s.guidance}, seed {s.seed}"]),
        *row("output", [f"{s.out}{os.sep}"]))
    for w in s.warnings:
        say(f"warning: {w}")
