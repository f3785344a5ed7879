"""Parallel configuration: what the user asks for, validated before any process starts.

Two levels of checks:
- `ParallelConfig.validate()` / `resolve_devices()`: the configuration alone (degrees, devices);
- `check_job()`: the configuration against one job (steps, latent size, cfg), before any worker work.
Every error says what to change.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, asdict, replace
from pathlib import Path

from .model.attention import BACKENDS

DTYPES = ("auto", "bf16", "fp16", "fp32")
STRATEGIES = ("auto", "manual")
AUTO_TABLE = Path(__file__).with_name("auto_table.json")


class PlanError(ValueError):
    """A parallel configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class ParallelConfig:
    devices: str = "all"             # "all", "0,1", "cuda:0,cuda:1", "cpu:N" (N CPU worker processes)
    strategy: str = "manual"         # "auto": degrees chosen per job from the device count and size
    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_degree: int = 1
    num_pipeline_patch: int = 0      # 0: as many patches as pipeline stages
    warmup_steps: int = 1            # PipeFusion: synchronous full-image steps before pipelining
    attention: str = "auto"
    dtype: str = "auto"              # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False

    # ------------------------------------------------------------------ derived
    @property
    def world_size(self) -> int:
        return self.cfg_degree * self.pipefusion_degree * self.ring_degree * self.ulysses_degree

    @property
    def mesh_degrees(self) -> dict[str, int]:
        """The degrees by mesh axis, outermost first (parallel.mesh.AXES)."""
        return {"cfg": self.cfg_degree, "pp": self.pipefusion_degree, "ring": self.ring_degree,
                "ulysses": self.ulysses_degree}

    @property
    def patches(self) -> int:
        return self.num_pipeline_patch or self.pipefusion_degree

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def describe(self) -> str:
        parts = [f"{n} {d}" for n, d in (("cfg", self.cfg_degree), ("pipefusion", self.pipefusion_degree),
                                          ("ring", self.ring_degree), ("ulysses", self.ulysses_degree)) if d > 1]
        s = " x ".join(parts) or "serial"
        if self.pipefusion_degree > 1:
            s += f" ({self.patches} patches, warmup {self.warmup_steps})"
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> tuple:
        """What the worker processes depend on: a change restarts the pool."""
        return (self.devices, self.world_size, self.cfg_degree, self.pipefusion_degree, self.ring_degree,
                self.ulysses_degree, self.dtype, self.compile, self.attention)

    # ------------------------------------------------------------------ checks of the config alone
    def validate(self, *, num_heads: int = 16, depth: int = 40) -> "ParallelConfig":
        if self.strategy not in STRATEGIES:
            raise PlanError(f"strategy '{self.strategy}' is unknown; use 'auto' or 'manual'")
        for name in ("cfg_degree", "ulysses_degree", "ring_degree", "pipefusion_degree"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PlanError(f"{name} must be a whole number >= 1, got {v!r}")
        if self.cfg_degree not in (1, 2):
            raise PlanError(f"cfg_degree must be 1 or 2 (one rank for the negative prompt, one for the "
                            f"positive), got {self.cfg_degree}")
        if num_heads % self.ulysses_degree:
            ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise PlanError(f"ulysses_degree {self.ulysses_degree} does not divide the model's {num_heads} "
                            f"attention heads; use one of {ok}, or put the extra devices into ring_degree")
        if self.pipefusion_degree > depth // 2:
            raise PlanError(f"pipefusion_degree {self.pipefusion_degree} is too large for {depth} blocks: "
                            f"each stage needs at least 2 blocks; use at most {depth // 2}")
        if self.num_pipeline_patch < 0:
            raise PlanError(f"num_pipeline_patch must be >= 0 (0 means one patch per stage), "
                            f"got {self.num_pipeline_patch}")
        if self.pipefusion_degree > 1 and self.patches < self.pipefusion_degree:
            raise PlanError(f"num_pipeline_patch {self.num_pipeline_patch} is smaller than pipefusion_degree "
                            f"{self.pipefusion_degree}: stages would idle; use >= {self.pipefusion_degree} "
                            f"(or 0 for one patch per stage)")
        if self.warmup_steps < 0 or (self.pipefusion_degree > 1 and self.warmup_steps < 1):
            raise PlanError(f"warmup_steps must be >= 1 with PipeFusion (the first step fills every layer's "
                            f"K/V buffer), got {self.warmup_steps}")
        if self.attention not in BACKENDS:
            raise PlanError(f"attention backend '{self.attention}' is unknown; choose one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise PlanError(f"dtype '{self.dtype}' is unknown; choose one of {', '.join(DTYPES)}")
        return self


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
            raise PlanError(f"devices '{spec}': write 'cpu:N' with N >= 1 CPU worker processes")
        return ["cpu"] * int(n)
    out = []
    for item in s.split(","):
        idx = item[5:] if item.startswith("cuda:") else item
        if not idx.isdigit():
            raise PlanError(f"devices '{spec}': '{item}' is not a GPU index; write e.g. 'all', '0,1', "
                            f"'cuda:0,cuda:1' or 'cpu:2'")
        i = int(idx)
        if i >= cuda_count:
            if cuda_count:
                fix = f"use 'all' or indices below {cuda_count}"
            else:
                fix = "use 'cpu:N' for N CPU worker processes"
            have = f"GPUs 0..{cuda_count - 1}" if cuda_count else "no GPU"
            raise PlanError(f"devices '{spec}': cuda:{i} does not exist, this machine has {have}; {fix}")
        if f"cuda:{i}" in out:
            raise PlanError(f"devices '{spec}' names cuda:{i} twice; name each GPU once")
        out.append(f"cuda:{i}")
    return out


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


# ---------------------------------------------------------------------- auto strategy
def _load_table() -> dict:
    path = Path(os.environ.get("XDIT_HUNYUAN_AUTO_TABLE", AUTO_TABLE))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def auto_degrees(n: int, latent_hw: tuple[int, int], uses_uncond: bool, *, num_heads: int = 16,
                 table: dict | None = None) -> dict:
    """Degrees for n devices at this latent size: the measured table first, else the seed's findings
    (2: cfg 2 or ulysses 2; 4: cfg 2 x ulysses 2; 8: cfg 2 x pipefusion 4; 2048^2 on 8:
    cfg 2 x pipefusion 2 x ring 2)."""
    table = _load_table() if table is None else table
    pixels = latent_hw[0] * 8 * latent_hw[1] * 8
    res = "2048" if pixels >= 1536 * 1536 else "1024"
    entry = table.get(f"{n}:{res}:{'cfg' if uses_uncond else 'nocfg'}")
    if entry:
        return dict(entry)
    deg = dict(cfg_degree=1, ulysses_degree=1, ring_degree=1, pipefusion_degree=1)
    m = n
    if uses_uncond and n % 2 == 0:
        deg["cfg_degree"], m = 2, n // 2
    if m == 1:
        return deg
    if n == 8 and deg["cfg_degree"] == 2:
        if res == "2048":
            deg.update(pipefusion_degree=2, ring_degree=2)
        else:
            deg.update(pipefusion_degree=4)
        return deg
    u = math.gcd(m, num_heads)
    deg["ulysses_degree"], deg["ring_degree"] = u, m // u
    return deg


def resolve(config: ParallelConfig, n_devices: int, latent_hw: tuple[int, int], uses_uncond: bool,
            *, num_heads: int = 16, depth: int = 40) -> ParallelConfig:
    """The concrete degrees for one job (auto filled in), validated."""
    if config.strategy == "auto":
        config = replace(config, **auto_degrees(n_devices, latent_hw, uses_uncond, num_heads=num_heads))
    config.validate(num_heads=num_heads, depth=depth)
    if config.world_size != n_devices:
        raise PlanError(
            f"the degrees multiply to {config.world_size} (cfg {config.cfg_degree} x pipefusion "
            f"{config.pipefusion_degree} x ring {config.ring_degree} x ulysses {config.ulysses_degree}) but "
            f"devices '{config.devices}' gives {n_devices}; make the product equal the number of devices, "
            f"or use strategy 'auto'")
    return config


def check_job(config: ParallelConfig, *, steps: int, latent_hw: tuple[int, int], cfg_scale: float,
              patch_size: int = 2) -> list[str]:
    """Check a resolved config against one job. Returns warnings; raises PlanError for what cannot run."""
    warnings = []
    if steps < 1:
        raise PlanError(f"steps is {steps}; sample with at least 1 step")
    rows = (latent_hw[0] + patch_size // 2) // patch_size
    cols = (latent_hw[1] + patch_size // 2) // patch_size
    tokens = rows * cols
    if config.sp_degree > tokens:
        raise PlanError(f"the latent {latent_hw[0]}x{latent_hw[1]} has {tokens} image tokens, fewer than the "
                        f"{config.sp_degree} sequence-parallel ranks; use a larger image or lower "
                        f"ulysses_degree / ring_degree")
    if config.pipefusion_degree > 1:
        if config.patches > rows:
            raise PlanError(f"the latent {latent_hw[0]}x{latent_hw[1]} has {rows} token rows, fewer than "
                            f"num_pipeline_patch {config.patches}; use a larger image or fewer patches")
        per_patch = (rows // config.patches) * cols
        if config.sp_degree > per_patch:
            raise PlanError(f"each of the {config.patches} PipeFusion patches has about {per_patch} tokens, "
                            f"fewer than the {config.sp_degree} sequence-parallel ranks; use a larger image, "
                            f"fewer patches or lower ulysses/ring degrees")
        if config.warmup_steps > steps:
            raise PlanError(f"warmup_steps {config.warmup_steps} is more than the {steps} steps; use at most "
                            f"{steps} (1 is usual; equal to steps runs every step synchronously)")
        if config.warmup_steps == steps:
            warnings.append(f"warmup_steps {config.warmup_steps} == steps {steps}: every step runs "
                            f"synchronously, so PipeFusion gives no overlap (results equal the serial run)")
    if config.cfg_degree == 2 and math.isclose(cfg_scale, 1.0):
        warnings.append("cfg is 1.0, so there is no negative-prompt pass: with cfg_degree 2 both halves "
                        "compute the positive prompt and half the devices are wasted; set cfg_degree 1")
    return warnings
