"""What the worker processes are started with: `PoolConfig`, one per pool. A change of any of its fields
restarts the pool (new processes: another device set, weights in another dtype, another compiled model);
the parallel degrees (plan.ParallelConfig) are not here, they may change from one job to the next on the
same warm pool.

Every switch that changes how the workers compute is a field here, filled by the node or the command line;
the environment variables below only override fields, and are read in one place (`env_overrides`), by
whoever builds the config in the parent process, never inside the workers:

    XDIT_HUNYUAN_CUDA_GRAPHS=0|local|1    cuda_graphs "off" / "local" / "all"
    XDIT_HUNYUAN_FUSED_KERNELS=0|1        fused_kernels "off" / "on" (on: also CPU workers, under Triton's
                                          interpreter; tests)
    XDIT_HUNYUAN_COMPILE_MODE=MODE        compile_mode (torch.compile's mode)
    XDIT_HUNYUAN_COMPILE_ANY_SIZE=0|1     compile_any_size
    XDIT_HUNYUAN_BACKGROUND_COMPILE=0|1   background_compile
    XDIT_HUNYUAN_AUTO_TABLE=PATH          auto_table (the measured table of the auto strategy)
    XDIT_HUNYUAN_CACHE_DIR=PATH           cache_dir (the workers' compile caches)
    XDIT_HUNYUAN_WEIGHTS_TRANSFER=auto|file   weights_transfer (how a whole model reaches the workers)
    XDIT_HUNYUAN_SPARE_WORKERS=auto|on|off    spare_workers (worker processes started ahead of a pool)

    >>> PoolConfig(devices="cpu:2").key() == PoolConfig(devices="cpu:2", auto_table="t.json").key()
    True
    >>> PoolConfig().with_overrides(env_overrides({"XDIT_HUNYUAN_CUDA_GRAPHS": "local"})).cuda_graphs
    'local'
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping

from .model.attention import BACKENDS
from .plan import ParallelConfig, PlanError

DTYPES = ("auto", "bf16", "fp16", "fp32")
GRAPH_MODES = ("all", "local", "off")
KERNEL_MODES = ("auto", "on", "off")
TRANSFERS = ("auto", "file")
SPARE_MODES = ("auto", "on", "off")
PARENT_ONLY = ("auto_table", "weights_transfer", "spare_workers")   # fields the worker processes do not depend on
ENV_PREFIX = "XDIT_HUNYUAN_"
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class PoolConfig:
    devices: str = "all"             # "all", "0,1", "cuda:0,cuda:1", "cpu:N" (N CPU worker processes)
    dtype: str = "auto"              # auto: bf16 on GPU, fp32 on CPU (the node passes the MODEL's dtype)
    attention: str = "auto"          # attention kernel (model.attention.BACKENDS)
    compile: bool = False            # regional torch.compile in GPU workers (CPU workers run eager). Off by
                                     # default: eager steps with CUDA graphs and the fused kernels measured as
                                     # fast (bench/NOTES.md), without compiling at a pool's first jobs
    compile_mode: str | None = None  # torch.compile's mode (None: its default)
    compile_any_size: bool = True    # compiled code takes any image size (the token count symbolic): a new
                                     # size runs at once instead of compiling again
    cuda_graphs: str = "all"         # GPU: replay model calls from CUDA graphs; "local": not where they
                                     # communicate (Ulysses / Ring); "off"
    fused_kernels: str = "auto"      # the Triton kernels of model/kernels.py: "auto" on GPUs, "on", "off"
    cache_dir: str | None = None     # the workers' persistent compile caches (None: their compilers' defaults)
    background_compile: bool = True  # GPU, compile on, with a cache_dir: while the compile cache holds nothing
                                     # for a model and plan, its jobs run eager and a helper process compiles
                                     # the same code into the cache; the workers compile (from the cache) at
                                     # the first job after the helper is done
    keep_weights_gib: float = 4.0    # per rank: replaced weight tensors kept aside, so that going back to
                                     # recent weights (a LoRA removed) needs no transfer
    profile_dir: str | None = None   # diagnostics: each rank writes a cProfile summary of its first job there
                                     # (rank<N>.txt; slows that job's Python code)
    auto_table: str | None = None    # the auto strategy's measured table (None: the shipped one); parent only
    weights_transfer: str = "auto"   # how a whole model reaches the workers; parent only. auto: in GPU memory
                                     # (CUDA IPC) where this process can use a worker's GPU, else one staged
                                     # safetensors file (/dev/shm where there is one); "file": always the file
    spare_workers: str = "auto"      # worker processes started ahead (worker/spares.py): in ComfyUI when it
                                     # loads the pack, and after a pool's first job for the next pool, so a
                                     # pool starts without Python's start, torch's import and a first job's
                                     # one-time costs. auto: GPU pools on POSIX; "on" (also CPU: tests); "off"

    def key(self) -> tuple:
        """What the worker processes depend on: a change restarts the pool."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in PARENT_ONLY)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, overrides: Mapping) -> "PoolConfig":
        return replace(self, **overrides) if overrides else self

    def validate(self) -> "PoolConfig":
        if self.attention not in BACKENDS:
            raise PlanError("{attention} backend '{value}' is unknown; choose one of {choices}", field="attention",
                            value=self.attention, choices=", ".join(BACKENDS))
        if self.dtype not in DTYPES:
            raise PlanError("{dtype} '{value}' is unknown; choose one of {choices}", field="dtype", value=self.dtype,
                            choices=", ".join(DTYPES))
        if self.cuda_graphs not in GRAPH_MODES:
            raise PlanError("{cuda_graphs} '{value}' is unknown; choose one of {choices}", field="cuda_graphs",
                            value=self.cuda_graphs, choices=", ".join(GRAPH_MODES))
        if self.fused_kernels not in KERNEL_MODES:
            raise PlanError("{fused_kernels} '{value}' is unknown; choose one of {choices}", field="fused_kernels",
                            value=self.fused_kernels, choices=", ".join(KERNEL_MODES))
        if self.spare_workers not in SPARE_MODES:
            raise PlanError("{spare_workers} '{value}' is unknown; choose one of {choices}", field="spare_workers",
                            value=self.spare_workers, choices=", ".join(SPARE_MODES))
        if self.weights_transfer not in TRANSFERS:
            raise PlanError("{weights_transfer} '{value}' is unknown; choose one of {choices}",
                            field="weights_transfer", value=self.weights_transfer, choices=", ".join(TRANSFERS))
        return self


def env_overrides(environ: Mapping[str, str]) -> dict:
    """The PoolConfig fields that XDIT_HUNYUAN_* variables set (the module docstring lists them)."""
    out: dict = {}
    graphs = environ.get(ENV_PREFIX + "CUDA_GRAPHS")
    if graphs is not None:
        g = graphs.strip().lower()
        out["cuda_graphs"] = "off" if g in _OFF else "local" if g == "local" else "all"
    any_size = environ.get(ENV_PREFIX + "COMPILE_ANY_SIZE")
    if any_size is not None:
        out["compile_any_size"] = any_size.strip().lower() not in _OFF
    background = environ.get(ENV_PREFIX + "BACKGROUND_COMPILE")
    if background is not None:
        out["background_compile"] = background.strip().lower() not in _OFF
    kernels = environ.get(ENV_PREFIX + "FUSED_KERNELS")
    if kernels is not None:
        out["fused_kernels"] = "off" if kernels.strip().lower() in _OFF else "on"
    for var, name in (("COMPILE_MODE", "compile_mode"), ("AUTO_TABLE", "auto_table"), ("CACHE_DIR", "cache_dir"),
                      ("WEIGHTS_TRANSFER", "weights_transfer"), ("SPARE_WORKERS", "spare_workers")):
        value = environ.get(ENV_PREFIX + var)
        if value:
            out[name] = value
    return out


# ---------------------------------------------------------------------- devices
def parse_devices(spec: str, cuda_count: int | None = None) -> list[str]:
    """Device strings ("cuda:0", "cpu") for a devices spec; raises PlanError with the fix.

    "all": every visible GPU (CPU worker if none); "0,1" / "cuda:0,cuda:1": those GPUs;
    "cpu:N": N CPU worker processes (gloo); "cpu": one.
    """
    if cuda_count is None:
        cuda_count = _cuda_count()
    s = (spec or "all").strip().lower().replace(" ", "")
    if s == "all":
        return [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
    if s.startswith("cpu"):
        n = s[4:] if s.startswith("cpu:") else ("1" if s == "cpu" else None)
        if n is None or not n.isdigit() or int(n) < 1:
            raise PlanError("{devices} '{spec}': write 'cpu:N' with N >= 1 CPU worker processes", field="devices",
                            spec=spec)
        return ["cpu"] * int(n)
    out = []
    for item in s.split(","):
        idx = item[5:] if item.startswith("cuda:") else item
        if not idx.isdigit():
            raise PlanError("{devices} '{spec}': '{item}' is not a GPU index; write e.g. 'all', '0,1', "
                            "'cuda:0,cuda:1' or 'cpu:2'", field="devices", spec=spec, item=item)
        i = int(idx)
        if i >= cuda_count:
            if cuda_count:
                fix = f"use 'all' or indices below {cuda_count}"
            else:
                fix = "use 'cpu:N' for N CPU worker processes"
            have = f"GPUs 0..{cuda_count - 1}" if cuda_count else "no GPU"
            raise PlanError("{devices} '{spec}': cuda:{i} does not exist, this machine has {have}; {fix}",
                            field="devices", spec=spec, i=i, have=have, fix=fix)
        if f"cuda:{i}" in out:
            raise PlanError("{devices} '{spec}' names cuda:{i} twice; name each GPU once", field="devices",
                            spec=spec, i=i)
        out.append(f"cuda:{i}")
    return out


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


@dataclass(frozen=True)
class RunConfig:
    """What the config node gives the sampler: the pool to run on, and how to split each job on it."""
    pool: PoolConfig
    parallel: ParallelConfig
