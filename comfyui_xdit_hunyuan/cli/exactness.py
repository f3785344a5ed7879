"""How close a run's result is to the serial run's, for the configuration printout and run.json.

CFG, Ulysses and Ring parallelism compute what one device computes (only the floating-point rounding
order differs). PipeFusion is exact during its synchronous warm-up steps; after them each stage attends
to one-step-old keys/values of the patches not yet processed in the current step, so a plan with
pipefusion_degree > 1 and warmup_steps < steps is approximate. Its deviation was measured (README,
Correctness and Performance) as the relative L2 distance of the final latent from the serial run's:

    >>> from comfyui_xdit_hunyuan.plan import ParallelConfig
    >>> pp2 = ParallelConfig("manual", pipefusion_degree=2, warmup_steps=1)
    >>> print("\\n".join(exactness(pp2, steps=8)[1]))   # doctest: +NORMALIZE_WHITESPACE
    approximate: PipeFusion reuses one-step-old K/V of the other patches after 1 warm-up step
    (--warmup-steps 8 = --steps is exact). Measured relative L2 distance from the serial run, pp2 with 1
    warm-up step: 3.0-3.1e-2 at 50 steps 1024x1024, 0.15 at 10 steps 2048x2048 (2 x H100, bf16:
    bench/results/); 0.088 euler / 0.029 heun at 20 steps, 0.25 euler at 8 (tiny random model, CPU: the
    tests assert < 0.2 at 20 steps)
    >>> exactness(ParallelConfig("manual", pipefusion_degree=2, warmup_steps=8), steps=8)
    (True, ['exact: --warmup-steps 8 = --steps, every step runs synchronously (no PipeFusion overlap)'])
    >>> exactness(ParallelConfig("manual", cfg_degree=2), steps=8)
    (True, ['exact: the serial computation split over the devices (only float rounding differs)'])
"""
from __future__ import annotations

from textwrap import wrap

# PipeFusion's measured deviation from the serial run (relative L2 of the final latent, 1 warm-up step, one
# patch per stage), by pipeline degree: (the figures, where they were measured)
MEASURED = {
    2: (("3.0-3.1e-2 at 50 steps 1024x1024, 0.15 at 10 steps 2048x2048", "2 x H100, bf16: bench/results/"),
        ("0.088 euler / 0.029 heun at 20 steps, 0.25 euler at 8", "tiny random model, CPU: the tests assert "
                                                                   "< 0.2 at 20 steps")),
    4: (("0.125 euler / 0.039 heun at 20 steps", "tiny random model, CPU: the tests assert < 0.2"),),
}


def exactness(plan, steps: int) -> tuple[bool, list[str]]:
    """(exact, lines): whether the resolved `plan` gives the serial run's result in `steps` steps, and
    lines that say so; for an approximate plan, the deviation measured for its pipeline degree (pp2's,
    labelled so, for a degree never measured)."""
    if plan.pipefusion_degree == 1:
        if plan.world_size == 1:
            return True, ["exact: the serial run"]
        return True, ["exact: the serial computation split over the devices (only float rounding differs)"]
    if plan.warmup_steps >= steps:
        return True, [f"exact: --warmup-steps {plan.warmup_steps} = --steps, every step runs synchronously "
                      f"(no PipeFusion overlap)"]
    pp = plan.pipefusion_degree if plan.pipefusion_degree in MEASURED else 2
    label = f"pp{pp}" if pp == plan.pipefusion_degree else f"pp2 (pp{plan.pipefusion_degree} not measured)"
    figures = "; ".join(f"{what} ({where})" for what, where in MEASURED[pp])
    warm = f"{plan.warmup_steps} warm-up step{'s' if plan.warmup_steps != 1 else ''}"
    text = (f"approximate: PipeFusion reuses one-step-old K/V of the other patches after {warm} (--warmup-steps "
            f"{steps} = --steps is exact). Measured relative L2 distance from the serial run, {label} with 1 warm-up "
            f"step: {figures}")
    return False, wrap(text, width=96, break_on_hyphens=False)
