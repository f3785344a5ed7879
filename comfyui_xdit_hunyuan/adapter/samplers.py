"""The sampler node's widgets: ComfyUI's sampler and scheduler names, steps, cfg and denoise, checked with the
message that says what to change; which per-step noise ComfyUI's sampler would draw."""
from __future__ import annotations

import math

import torch

from ..job import JobError
from ..sampling import NOISE_SOURCES, SAMPLERS, noise_steps
from .inputs import OPTION_SOURCES

def noise_plan(engine_sampler: str, sigmas: torch.Tensor) -> tuple[str | None, list[int]]:
    """Where ComfyUI's sampler takes its per-step noise from ("default" / "brownian_cpu" /
    "brownian_gpu" or None) and at which steps it draws, from the sampling module's description."""
    kind = NOISE_SOURCES.get(engine_sampler)
    return (kind, list(noise_steps(engine_sampler, sigmas))) if kind else (None, [])


def map_sampler(sampler_name: str, supported: tuple[str, ...] | None = None) -> str:
    """The workers' name for a ComfyUI sampler name (the same names); JobError listing what is supported
    (default: what the workers implement)."""
    supported = SAMPLERS if supported is None else supported
    if sampler_name in supported:
        return sampler_name
    raise JobError(f"sampler '{sampler_name}' is not implemented by the xDiT workers; choose one of: "
                   f"{', '.join(supported)}. For other samplers use KSampler.")


def check_sampler_inputs(steps, cfg, sampler_name, scheduler, denoise, *, schedulers=None,
                         comfy_samplers=None) -> str:
    """Widget values of the sampler node (linked ones reach the node unchecked); raises JobError saying what to
    change. Returns the workers' sampler name."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise JobError(f"steps must be a whole number, got {steps!r}")
    if steps < 1:
        raise JobError(f"steps is {steps}; sample with at least 1 step")
    if steps > 10000:
        raise JobError(f"steps is {steps}; use at most 10000")
    if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not math.isfinite(cfg):
        raise JobError(f"cfg must be a finite number, got {cfg!r}")
    if not 0.0 <= cfg <= 100.0:
        raise JobError(f"cfg is {cfg}; use a value from 0 to 100 (HunyuanDiT works well around 5-7)")
    if not isinstance(denoise, (int, float)) or isinstance(denoise, bool) or not math.isfinite(denoise):
        raise JobError(f"denoise must be a number from 0 to 1, got {denoise!r}")
    if not 0.0 <= denoise <= 1.0:
        raise JobError(f"denoise is {denoise}; use a value from 0 (keep the input latent) to 1 (start from noise)")
    if schedulers is not None and scheduler not in schedulers:
        raise JobError(f"scheduler '{scheduler}' is unknown to this ComfyUI; choose one of: {', '.join(schedulers)}")
    if comfy_samplers is not None and sampler_name not in comfy_samplers:
        raise JobError(f"sampler '{sampler_name}' is unknown to this ComfyUI; choose one of: {', '.join(comfy_samplers)}")
    return map_sampler(sampler_name)


def validate_sampler_name(sampler_name=None) -> bool | str:
    """For the sampler node's validate_inputs (runs when the prompt is queued): True or the message. It takes
    the sampler name alone, so ComfyUI still checks the other widgets against their declared ranges and
    lists, and reports a rejected name once (it repeats a validate_inputs message for every input the
    function takes)."""
    if sampler_name is None:
        return True                       # fed by a link: checked when the node runs
    try:
        try:
            comfy_samplers = OPTION_SOURCES["samplers"]()
        except ImportError:
            comfy_samplers = None
        if comfy_samplers is not None and sampler_name not in comfy_samplers:
            raise JobError(f"sampler '{sampler_name}' is unknown to this ComfyUI; choose one of: "
                           f"{', '.join(comfy_samplers)}")
        map_sampler(sampler_name)
    except JobError as e:
        return str(e)
    return True
