"""The config node: its widgets become a RunConfig (the pool's PoolConfig and the job split's
ParallelConfig), checked as far as they can be without a model or an image."""
from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import PoolConfig, RunConfig, env_overrides, parse_devices
from ..plan import ParallelConfig, PlanError, resolve
from .inputs import CONFIG_INPUTS, InputSpec

def build_parallel_config(devices: str = "all", strategy: str = "auto", cfg_degree: int = 1,
                          ulysses_degree: int = 1, ring_degree: int = 1, pipefusion_degree: int = 1,
                          num_pipeline_patch: int = 0, warmup_steps: int = 1, attention: str = "auto",
                          dtype: str = "auto", compile: bool = False, *, cuda_count: int | None = None,
                          environ: Mapping[str, str] | None = None) -> RunConfig:
    """The config node's value, checked as far as it can be without a model or an image: the pool (devices,
    dtype, attention, compile, with the XDIT_HUNYUAN_* overrides of `environ`, default os.environ) and the
    split (strategy and degrees).

    Raises PlanError with what to change. Checks that need the image (auto degrees, latent size,
    steps) happen again in the sampler node."""
    if not isinstance(devices, str):
        raise PlanError("{devices} must be text such as 'all', '0,1' or 'cpu:2', got {value}", field="devices",
                        value=repr(devices))
    ints = {}
    for name, v in (("cfg_degree", cfg_degree), ("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree),
                    ("pipefusion_degree", pipefusion_degree), ("num_pipeline_patch", num_pipeline_patch),
                    ("warmup_steps", warmup_steps)):
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise PlanError("{%s} must be a whole number, got {value}" % name, field=name, value=repr(v))
        ints[name] = int(v)
    overrides = env_overrides(os.environ if environ is None else environ)
    pool = PoolConfig(devices=devices.strip() or "all", attention=attention, dtype=dtype,
                      compile=bool(compile)).with_overrides(overrides).validate()
    parallel = ParallelConfig(strategy=strategy, **ints).validate()
    for spec in CONFIG_INPUTS:
        if spec.name in ints:
            check_declared(spec, ints[spec.name])
    n = len(parse_devices(pool.devices, cuda_count))
    if parallel.strategy == "manual":
        # the image size does not matter to manual degrees; resolve() checks the product against n
        resolve(parallel, pool.devices, n, (128, 128), True)
    return RunConfig(pool, parallel)


def check_declared(spec: InputSpec, value: float) -> None:
    """The range a number widget declares. ComfyUI checks it itself only for inputs that the node's validate_inputs
    does not take, and a linked value is never checked by it: PlanError saying what to change."""
    if spec.min is not None and value < spec.min:
        raise PlanError("{%s} is {value}; use at least {bound}" % spec.name, field=spec.name, value=value,
                        bound=f"{spec.min:g}")
    if spec.max is not None and value > spec.max:
        raise PlanError("{%s} is {value}; use at most {bound}" % spec.name, field=spec.name, value=value,
                        bound=f"{spec.max:g}")


def validate_parallel_inputs(**values) -> bool | str:
    """For the config node's validate_inputs: True, or the error message. Inputs fed by a link arrive
    as None at validation time; they are checked when the node runs."""
    if any(v is None for v in values.values()):
        return True
    try:
        build_parallel_config(**values)
    except PlanError as e:
        return str(e)
    return True
