"""Sigma schedules: every scheduler ComfyUI 0.3.64's KSampler offers, with the same numbers.

Each returns a float32 CPU tensor of decreasing sigmas that (except where ComfyUI's own does not)
ends with 0. `sigmas_for_denoise` adds KSampler's handling of denoise < 1 and of the samplers that
drop the penultimate sigma. The beta scheduler needs the inverse of the regularized incomplete beta
function; it is implemented here (`beta_ppf`) so that scipy is not a dependency.
"""
from __future__ import annotations

import math

import torch

from comfyui_xdit_hunyuan.sampling.model_sampling import DiscreteVSampling

# ComfyUI's SCHEDULER_NAMES, in its order.
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal")

# KSampler asks these samplers' schedules for one step more and drops the penultimate sigma.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset(("dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"))


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _from_floats(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- schedules on the model's sigma table --------------------------------------------------------------
def simple_sigmas(ms: DiscreteVSampling, steps: int) -> torch.Tensor:
    """Every (1000 / steps)-th table entry from the top, then 0."""
    stride = len(ms.sigmas) / steps
    return _from_floats([float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


def ddim_uniform_sigmas(ms: DiscreteVSampling, steps: int) -> torch.Tensor:
    """Table entries 1, 1 + k, 1 + 2k, ... (k = 1000 // steps), descending, then 0.

    As in ComfyUI, the count can exceed `steps` when 999 is not a multiple of k (30 steps give 31).
    """
    n = len(ms.sigmas)
    sigs = [0.0]
    if math.isclose(float(ms.sigmas[1]), 0, abs_tol=0.00001):   # zero-terminal-SNR tables only
        steps += 1
        sigs = []
    stride = max(n // steps, 1)
    sigs += [float(ms.sigmas[i]) for i in range(1, n, stride)]
    return _from_floats(sigs[::-1])


def normal_sigmas(ms: DiscreteVSampling, steps: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced from timestep(sigma_max) to timestep(sigma_min), mapped to sigmas.

    "normal" includes both ends; "sgm_uniform" (sgm=True) spaces steps + 1 points and drops the last.
    """
    start = float(ms.timestep(ms.sigma_max))
    end = float(ms.timestep(ms.sigma_min))
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(torch.tensor(end))), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(t)) for t in timesteps]
    return _from_floats(sigs + [0.0] if append_zero else sigs)


def sgm_uniform_sigmas(ms: DiscreteVSampling, steps: int) -> torch.Tensor:
    return normal_sigmas(ms, steps, sgm=True)


def beta_sigmas(ms: DiscreteVSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Timesteps at the Beta(alpha, beta) quantiles 1, 1 - 1/steps, ... (arXiv 2407.12173).

    Quantiles are rounded to the nearest table index (ties to even, like numpy.rint); a timestep
    equal to the previous one is skipped, so the schedule can be shorter than `steps`.
    """
    total = len(ms.sigmas) - 1
    sigs, last = [], None
    for i in range(steps):
        q = 1.0 - i * (1.0 / steps)            # numpy.linspace(0, 1, steps, endpoint=False), reversed
        t = round(beta_ppf(q, alpha, beta) * total)   # Python round: half to even, as numpy.rint
        if t != last:
            sigs.append(float(ms.sigmas[t]))
        last = t
    return _from_floats(sigs + [0.0])


def linear_quadratic_sigmas(ms: DiscreteVSampling, steps: int, threshold_noise: float = 0.025,
                            linear_steps: int | None = None) -> torch.Tensor:
    """Mochi's schedule: linear in sigma for the first half, then quadratic, scaled by sigma_max."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quadratic_steps = steps - linear_steps
        quadratic_coef = step_diff / (linear_steps * quadratic_steps ** 2)
        linear_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps ** 2)
        const = quadratic_coef * (linear_steps ** 2)
        quadratic = [quadratic_coef * (i ** 2) + linear_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - v for v in linear + quadratic + [1.0]]
    return _from_floats(schedule) * ms.sigma_max.cpu()


# -- schedules on (sigma_min, sigma_max) only -------------------------------------------------------------
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): (max^(1/rho) + i/(n-1) * (min^(1/rho) - max^(1/rho)))^rho, then 0."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """tan of an even interpolation between atan(sigma_max) and atan(sigma_min), then 0.

    ComfyUI divides by n - 1 and so returns NaN sigmas for one step; this raises instead.
    """
    if n < 2:
        raise ValueError("the kl_optimal scheduler needs at least 2 steps (ComfyUI's gives NaN sigmas for 1)")
    ramp = torch.arange(n, dtype=torch.float).div_(n - 1)
    sigmas = ramp.new_zeros(n + 1)
    sigmas[:-1] = (ramp * math.atan(sigma_min) + (1 - ramp) * math.atan(sigma_max)).tan_()
    return sigmas


_ON_TABLE = {
    "simple": simple_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "normal": normal_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
}
_ON_RANGE = {
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "kl_optimal": kl_optimal_sigmas,
}


def calculate_sigmas(ms: DiscreteVSampling, scheduler: str, steps: int) -> torch.Tensor:
    """ComfyUI's ``comfy.samplers.calculate_sigmas``: the schedule `scheduler` with `steps` steps."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; supported: {', '.join(SCHEDULERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if scheduler in _ON_RANGE:
        return _ON_RANGE[scheduler](steps, float(ms.sigma_min), float(ms.sigma_max))
    return _ON_TABLE[scheduler](ms, steps)


def sigmas_for_denoise(ms: DiscreteVSampling, scheduler: str, steps: int, denoise: float | None = 1.0,
                       *, sampler: str | None = None) -> torch.Tensor:
    """The sigmas KSampler samples with (``KSampler.set_steps``).

    denoise > 0.9999 (or None): the full schedule. 0 < denoise <= 0.9999: the last steps + 1 sigmas of
    a schedule of int(steps / denoise) steps. denoise <= 0: no sigmas (KSampler then returns the input
    latent). Give `sampler` to get KSampler's extra step for dpm_2 / dpm_2_ancestral / uni_pc / uni_pc_bh2,
    whose schedule drops its penultimate sigma.
    """
    if denoise is None or denoise > 0.9999:
        return _for_sampler(ms, scheduler, steps, sampler)
    if denoise <= 0.0:
        return torch.zeros([0], dtype=torch.float32)
    return _for_sampler(ms, scheduler, int(steps / denoise), sampler)[-(steps + 1):]


def _for_sampler(ms: DiscreteVSampling, scheduler: str, steps: int, sampler: str | None) -> torch.Tensor:
    if sampler not in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        return calculate_sigmas(ms, scheduler, steps)
    sigmas = calculate_sigmas(ms, scheduler, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


# -- the Beta distribution's quantile function ----------------------------------------------------------
def _betainc_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz), converging fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300

    def clamp(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 1000):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 / clamp(1.0 + even * d)
        c = clamp(1.0 + even / c)
        h *= d * c
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 / clamp(1.0 + odd * d)
        c = clamp(1.0 + odd / c)
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) = P(X <= x) for X ~ Beta(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betainc_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betainc_continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b): the x with I_x(a, b) = p (scipy.stats.beta.ppf), to ~1e-15.

    Newton's method on the CDF, kept inside a shrinking bisection bracket so that it converges even
    where the density is infinite (a < 1 or b < 1 at the ends).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"beta_ppf needs 0 <= p <= 1, got {p}")
    if a <= 0 or b <= 0:
        raise ValueError(f"beta_ppf needs a > 0 and b > 0, got a={a}, b={b}")
    if p == 0.0 or p == 1.0:
        return p
    if a == b and p == 0.5:
        return 0.5      # exact by symmetry (the beta scheduler rounds 999 * ppf, and 499.5 is a tie)
    log_b = _log_beta(a, b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        err = betainc(a, b, x) - p
        if err == 0.0:
            return x
        if err < 0:
            lo = x
        else:
            hi = x
        density = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b)
        step = err / density if density > 0 and math.isfinite(density) else math.inf
        new = x - step
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - x) <= 1e-15 * max(x, 1e-300) or hi - lo <= 1e-16:
            return new
        x = new
    return x
