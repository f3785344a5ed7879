"""Parallel configuration: how one job is split over the pool's devices, validated before any worker work.

`ParallelConfig` holds the degrees (or the auto strategy that picks them per image); it may change from one
job to the next on a warm pool (config.PoolConfig holds what the worker processes are started with).
Two levels of checks:
- `ParallelConfig.validate()`: the degrees alone (and the model's head count and depth);
- `resolve()` / `check_job()`: against the device count and one job (steps, latent size, guidance scale).
Every error is a PlanError that says what to change and names the input it concerns, so a front end can
say it in its own words (the command line's flags, the nodes' input names):

    >>> e = PlanError("{cfg_degree} must be 1 or 2, got {value}", field="cfg_degree", value=3)
    >>> str(e), e.render({"cfg_degree": "--cfg-degree"})
    ('cfg_degree must be 1 or 2, got 3', '--cfg-degree must be 1 or 2, got 3')
"""
from __future__ import annotations

import json
import math
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

STRATEGIES = ("auto", "manual")
AUTO_TABLE = Path(__file__).with_name("auto_table.json")


class Message:
    """Words about the inputs: `template` names inputs as {placeholders}, rendered as the engine's field names
    by str(), or in a front end's words by render(names); `values` fill the other placeholders; `field` is
    the input to change."""

    def __init__(self, template: str, field: str | None = None, **values):
        self.template, self.field, self.values = template, field, values

    def render(self, names: Mapping[str, str] | None = None) -> str:
        names = names or {}
        fill = {key: names.get(key, key) for _, key, _, _ in string.Formatter().parse(self.template)
                if key and key not in self.values}
        return self.template.format(**fill, **self.values)

    def __str__(self) -> str:
        return self.render()


class PlanError(Message, ValueError):
    """A parallel configuration that cannot run (a Message: it says what to change, naming the input)."""

    def __init__(self, template: str, field: str | None = None, **values):
        Message.__init__(self, template, field, **values)
        ValueError.__init__(self, self.render())

    __str__ = Message.__str__


DEGREES = ("cfg_degree", "ulysses_degree", "ring_degree", "pipefusion_degree")


@dataclass(frozen=True)
class ParallelConfig:
    strategy: str = "auto"           # "auto": degrees chosen per job from the device count and size
    cfg_degree: int = 1
    ulysses_degree: int = 1
    ring_degree: int = 1
    pipefusion_degree: int = 1
    num_pipeline_patch: int = 0      # 0: as many patches as pipeline stages
    warmup_steps: int = 1            # PipeFusion: synchronous full-image steps before pipelining

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

    @property
    def exact(self) -> bool:
        """Equal to the serial run (PipeFusion after its warm-up steps is not)."""
        return self.pipefusion_degree == 1

    def describe(self) -> str:
        parts = [f"{n} {d}" for n, d in (("cfg", self.cfg_degree), ("pipefusion", self.pipefusion_degree),
                                          ("ring", self.ring_degree), ("ulysses", self.ulysses_degree)) if d > 1]
        s = " x ".join(parts) or "serial"
        if self.pipefusion_degree > 1:
            s += f" ({self.patches} patches, warmup {self.warmup_steps})"
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ checks of the degrees alone
    def validate(self, *, num_heads: int = 16, depth: int = 40) -> "ParallelConfig":
        if self.strategy not in STRATEGIES:
            raise PlanError("{strategy} '{value}' is unknown; use 'auto' or 'manual'", field="strategy",
                            value=self.strategy)
        for name in (*DEGREES, "num_pipeline_patch", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise PlanError("{%s} must be a whole number, got {value}" % name, field=name, value=repr(v))
        for name in DEGREES:
            if getattr(self, name) < 1:
                raise PlanError("{%s} must be a whole number >= 1, got {value}" % name, field=name,
                                value=getattr(self, name))
        if self.cfg_degree not in (1, 2):
            raise PlanError("{cfg_degree} must be 1 or 2 (one rank for the negative prompt, one for the "
                            "positive), got {value}", field="cfg_degree", value=self.cfg_degree)
        if num_heads % self.ulysses_degree:
            ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise PlanError("{ulysses_degree} {value} does not divide the model's {heads} attention heads; use "
                            "one of {ok}, or put the extra devices into {ring_degree}", field="ulysses_degree",
                            value=self.ulysses_degree, heads=num_heads, ok=ok)
        if self.pipefusion_degree > depth // 2:
            raise PlanError("{pipefusion_degree} {value} is too large for {depth} blocks: each stage needs at "
                            "least 2 blocks; use at most {most}", field="pipefusion_degree",
                            value=self.pipefusion_degree, depth=depth, most=depth // 2)
        if self.num_pipeline_patch < 0:
            raise PlanError("{num_pipeline_patch} must be >= 0 (0 means one patch per stage), got {value}",
                            field="num_pipeline_patch", value=self.num_pipeline_patch)
        if self.pipefusion_degree > 1 and self.patches < self.pipefusion_degree:
            raise PlanError("{num_pipeline_patch} {value} is smaller than {pipefusion_degree} {pp}: stages would "
                            "idle; use >= {pp} (or 0 for one patch per stage)", field="num_pipeline_patch",
                            value=self.num_pipeline_patch, pp=self.pipefusion_degree)
        if self.warmup_steps < 0 or (self.pipefusion_degree > 1 and self.warmup_steps < 1):
            raise PlanError("{warmup_steps} must be >= 1 with PipeFusion (the first step fills every layer's "
                            "K/V buffer), got {value}", field="warmup_steps", value=self.warmup_steps)
        return self


# ---------------------------------------------------------------------- auto strategy
def load_table(path: str | None = None) -> dict:
    """The auto strategy's measured table (bench --save-auto): `path`, else the one shipped with the pack;
    {} when it cannot be read."""
    try:
        return json.loads(Path(path or AUTO_TABLE).read_text())
    except (OSError, ValueError):
        return {}


def auto_degrees(n: int, latent_hw: tuple[int, int], uses_uncond: bool, *, num_heads: int = 16,
                 table: dict | None = None) -> dict:
    """Degrees for n devices at this latent size: the measured table first, else the seed's findings
    (2: cfg 2 or ulysses 2; 4: cfg 2 x ulysses 2; 8: cfg 2 x pipefusion 4; 2048^2 on 8:
    cfg 2 x pipefusion 2 x ring 2)."""
    table = load_table() if table is None else table
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


def resolve(config: ParallelConfig, devices: str, n_devices: int, latent_hw: tuple[int, int], uses_uncond: bool,
            *, num_heads: int = 16, depth: int = 40, table: dict | None = None) -> ParallelConfig:
    """The concrete degrees for one job on `n_devices` (what the `devices` spec gave): auto filled in from
    `table` (default: the shipped one), validated."""
    if config.strategy == "auto":
        config = replace(config, **auto_degrees(n_devices, latent_hw, uses_uncond, num_heads=num_heads,
                                                table=table))
    config.validate(num_heads=num_heads, depth=depth)
    if config.world_size != n_devices:
        raise PlanError(
            "the degrees multiply to {product} ({cfg_degree} {c} x {pipefusion_degree} {p} x {ring_degree} {r} x "
            "{ulysses_degree} {u}) but {devices} '{spec}' gives {n}; make the product equal the number of devices, "
            "or use {strategy} auto", field="devices", product=config.world_size, c=config.cfg_degree,
            p=config.pipefusion_degree, r=config.ring_degree, u=config.ulysses_degree, spec=devices, n=n_devices)
    return config


def check_job(config: ParallelConfig, *, steps: int, latent_hw: tuple[int, int], guidance: float,
              patch_size: int = 2) -> list[Message]:
    """Check a resolved config against one job. Returns warnings (Messages; str() words them); raises
    PlanError for what cannot run."""
    warnings = []
    if steps < 1:
        raise PlanError("{steps} is {value}; sample with at least 1 step", field="steps", value=steps)
    rows = (latent_hw[0] + patch_size // 2) // patch_size
    cols = (latent_hw[1] + patch_size // 2) // patch_size
    tokens = rows * cols
    if config.sp_degree > tokens:
        raise PlanError("the latent {h}x{w} has {tokens} image tokens, fewer than the {sp} sequence-parallel "
                        "ranks; use a larger image or lower {ulysses_degree} / {ring_degree}", field="ring_degree",
                        h=latent_hw[0], w=latent_hw[1], tokens=tokens, sp=config.sp_degree)
    if config.pipefusion_degree > 1:
        if config.patches > rows:
            raise PlanError("the latent {h}x{w} has {rows} token rows, fewer than {num_pipeline_patch} {value}; "
                            "use a larger image or fewer patches", field="num_pipeline_patch", h=latent_hw[0],
                            w=latent_hw[1], rows=rows, value=config.patches)
        per_patch = (rows // config.patches) * cols
        if config.sp_degree > per_patch:
            raise PlanError("each of the {patches} PipeFusion patches has about {per_patch} tokens, fewer than "
                            "the {sp} sequence-parallel ranks; use a larger image, fewer patches ({num_pipeline_patch}) "
                            "or lower {ulysses_degree} / {ring_degree}", field="num_pipeline_patch",
                            patches=config.patches, per_patch=per_patch, sp=config.sp_degree)
        if config.warmup_steps > steps:
            raise PlanError("{warmup_steps} {value} is more than the {n} steps; use at most {n} (1 is usual; "
                            "equal to the steps runs every step synchronously)", field="warmup_steps",
                            value=config.warmup_steps, n=steps)
        if config.warmup_steps == steps:
            warnings.append(Message("{warmup_steps} {value} == {steps} {value}: every step runs synchronously, so "
                                    "PipeFusion gives no overlap (results equal the serial run)",
                                    field="warmup_steps", value=steps))
    if config.cfg_degree == 2 and math.isclose(guidance, 1.0):
        warnings.append(Message("{guidance} is 1.0, so there is no negative-prompt pass: with {cfg_degree} 2 both "
                                "halves compute the positive prompt and half the devices are wasted; set "
                                "{cfg_degree} 1",
                                field="cfg_degree"))
    return warnings
