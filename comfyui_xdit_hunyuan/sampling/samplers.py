"""ComfyUI's k-diffusion samplers as per-slice state machines.

PipeFusion denoises one horizontal slice (patch) of the latent at a time, and different slices may
be at different steps at the same moment. So each sampler is written as a small program over ONE
slice's tensors: it asks for a model evaluation (``next_input``), is given the denoised prediction
for that slice (``feed``), and advances. Every coefficient depends only on the sigmas, every tensor
operation is elementwise, and per-step noise comes from a caller-supplied ``noise(step_index)``
returning this slice's rows -- so stepping slices separately gives exactly the whole-latent result.

The formulas follow ComfyUI's ``comfy/k_diffusion/sampling.py`` (Karras et al. 2022; DPM-Solver++
of Lu et al. 2022; LCM) and ``comfy/extra_samplers/uni_pc.py`` (UniPC, Zhao et al. 2023): scalar
coefficients are computed on 0-dim float32 CPU tensors in the same order of operations, so a run equals
ComfyUI's bit for bit on the CPU. On a GPU the coefficients stay on the CPU too: a 0-dim CPU tensor
enters a CUDA kernel as a scalar, so stepping never waits for the GPU (no host synchronisation).
"""
from __future__ import annotations

from typing import Callable, Generator, Mapping, NamedTuple

import torch

from comfyui_xdit_hunyuan.sampling.noise import StepNoise

NoiseFn = Callable[[int], torch.Tensor]
DenoiseFn = Callable[[torch.Tensor, float], torch.Tensor]


class _Eval(NamedTuple):
    """One model evaluation a sampler program asks for."""
    x: torch.Tensor         # the model input (this slice)
    sigma: torch.Tensor     # 0-dim float32
    step: int               # i: the step sigmas[i] -> sigmas[i + 1] it belongs to (UniPC: evaluated at sigmas[i])
    first: bool             # the first evaluation of its step (ComfyUI's progress callback follows it)


Program = Generator[_Eval, torch.Tensor, torch.Tensor]


# -- shared formulas ----------------------------------------------------------------------------------
def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """(sigma_down, sigma_up) of an ancestral step: go deterministically down to sigma_down, then add
    noise of std sigma_up so the total reaches sigma_to (sigma_down^2 + sigma_up^2 = sigma_to^2)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def _churn_gamma(o: Mapping, sigma: torch.Tensor, num_steps: int) -> float:
    """Karras' stochastic churn factor for a step (0 unless s_churn > 0 and s_tmin <= sigma <= s_tmax)."""
    if o["s_churn"] > 0 and o["s_tmin"] <= sigma <= o["s_tmax"]:
        return min(o["s_churn"] / num_steps, 2 ** 0.5 - 1)
    return 0.0


def _half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) = -log(sigma) for eps / v-prediction models."""
    return sigma.log().neg()


# -- the samplers, each a program over one slice -----------------------------------------------------------
def _euler(x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseFn, o: Mapping) -> Program:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - denoised) / sigma (with optional churn)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma = sigmas[i]
        gamma = _churn_gamma(o, sigma, n)
        sigma_hat = sigma * (gamma + 1) if o["s_churn"] > 0 else sigma
        if gamma > 0:
            x = x + noise(i) * o["s_noise"] * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        denoised = yield _Eval(x, sigma_hat, i, True)
        d = (x - denoised) / sigma_hat
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def _heun(x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseFn, o: Mapping) -> Program:
    """Heun's 2nd-order method: an Euler step, then the average of the slopes at both ends.
    The last step (to sigma 0) is a plain Euler step: one evaluation instead of two."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = _churn_gamma(o, sigma, n)
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + noise(i) * o["s_noise"] * (sigma_hat ** 2 - sigma ** 2) ** 0.5
        denoised = yield _Eval(x, sigma_hat, i, True)
        d = (x - denoised) / sigma_hat
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = yield _Eval(x_2, sigma_next, i, False)
            d_2 = (x_2 - denoised_2) / sigma_next
            x = x + ((d + d_2) / 2) * dt
    return x


def _euler_ancestral(x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseFn, o: Mapping) -> Program:
    """Euler step down to sigma_down, then fresh noise of std sigma_up (see `ancestral_step`)."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = yield _Eval(x, sigma, i, True)
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta=o["eta"])
        if sigma_down == 0:
            x = denoised
        else:
            d = (x - denoised) / sigma
            x = x + d * (sigma_down - sigma) + noise(i) * o["s_noise"] * sigma_up
    return x


def _dpmpp_2m(x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseFn, o: Mapping) -> Program:
    """DPM-Solver++(2M): exponential-integrator step in t = -log(sigma) with the denoised prediction
    extrapolated linearly from this and the previous step (first and last steps are 1st order)."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield _Eval(x, sigma, i, True)
        t, t_next = _half_log_snr(sigma), _half_log_snr(sigma_next)
        h = t_next - t
        ratio = t_next.neg().exp() / t.neg().exp()
        if old_denoised is None or sigma_next == 0:
            x = ratio * x - (-h).expm1() * denoised
        else:
            r = (t - _half_log_snr(sigmas[i - 1])) / h
            blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = ratio * x - (-h).expm1() * blended
        old_denoised = denoised
    return x


def _dpmpp_2m_sde(x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseFn, o: Mapping) -> Program:
    """DPM-Solver++(2M) SDE (eta = 1: the SDE; eta = 0: the ODE), "midpoint" or "heun" correction.
    The last step (to sigma 0) returns the denoised prediction."""
    if len(sigmas) <= 1:
        return x
    eta, s_noise, heun = o["eta"], o["s_noise"], o["solver_type"] == "heun"
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = yield _Eval(x, sigma, i, True)
        if sigma_next == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _half_log_snr(sigma), _half_log_snr(sigma_next)
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigma_next * lambda_t.exp()
            x = sigma_next / sigma * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if heun:
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x = x + noise(i) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


def _lcm(x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseFn, o: Mapping) -> Program:
    """Latent Consistency Model sampling: jump to the denoised prediction, re-noise to the next sigma."""
    for i in range(len(sigmas) - 1):
        denoised = yield _Eval(x, sigmas[i], i, True)
        x = denoised
        if sigmas[i + 1] > 0:
            x = noise(i) * sigmas[i + 1] + x     # noise_scaling(sigma_next, noise, x)
    return x


# -- UniPC (Zhao et al. 2023), as ComfyUI's extra_samplers/uni_pc.py runs it ------------------------------------
# ComfyUI's UniPC works in variance-preserving space: x_vp = x / sqrt(1 + sigma^2), with alpha = 1 /
# sqrt(1 + sigma^2), std = sigma * alpha and lambda = log(alpha / std), all written via log(alpha) the way
# its noise schedule computes them. It predicts x0 (bh1 / bh2 variants), runs multistep with order
# min(3, steps - 1), lower orders for the first and last steps, and a corrector after every step but
# the last, whose model evaluation is reused by the next step: one evaluation per step. A final sigma
# of 0 is replaced by 0.001.
def _vp_log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _vp_std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1. - torch.exp(2. * _vp_log_alpha(sigma)))


def _vp_lambda(sigma: torch.Tensor) -> torch.Tensor:
    log_alpha = _vp_log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1. - torch.exp(2. * log_alpha))


def _unipc_x0(x: torch.Tensor, sigma: torch.Tensor, step: int):
    """Evaluate the model at VP-space x and return its x0 prediction, via the noise prediction."""
    x_in = x * ((sigma ** 2 + 1.0) ** 0.5)
    denoised = yield _Eval(x_in, sigma, step, True)
    eps = (x_in - denoised) / sigma
    return (x - _vp_std(sigma) * eps) / torch.exp(_vp_log_alpha(sigma))


def _weighted(terms: list[torch.Tensor], weights: torch.Tensor):
    """sum_k terms[k] * weights[k] (the elementwise form of ComfyUI's tensordot over k)."""
    total = terms[0] * weights[0]
    for k in range(1, len(terms)):
        total = total + terms[k] * weights[k]
    return total


def _unipc_update(x, models: list, sigmas_prev: list, sigma: torch.Tensor, order: int, bh2: bool,
                  use_corrector: bool, step: int):
    """One UniPC step from sigmas_prev[-1] to `sigma`: predictor of `order` from the stored x0
    predictions, then (use_corrector) a model evaluation at the predicted point and the corrector.
    Returns (x, x0 prediction at `sigma` or None)."""
    lambda_0, lambda_t = _vp_lambda(sigmas_prev[-1]), _vp_lambda(sigma)
    model_0 = models[-1]
    alpha_t = torch.exp(_vp_log_alpha(sigma))
    h = lambda_t - lambda_0
    rks, d1s = [], []
    for i in range(1, order):
        rk = (_vp_lambda(sigmas_prev[-(i + 1)]) - lambda_0) / h
        rks.append(rk)
        d1s.append((models[-(i + 1)] - model_0) / rk)
    rks = torch.stack(rks + [torch.ones_like(h)])
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh) if bh2 else hh
    factorial, rows, b = 1, [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(rows), torch.stack(b)

    x_t_ = (_vp_std(sigma) / _vp_std(sigmas_prev[-1])) * x - (alpha_t * h_phi_1) * model_0
    pred_res = 0
    if d1s:
        rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        pred_res = _weighted(d1s, rhos_p)
    x_t = x_t_ - (alpha_t * b_h) * pred_res
    if not use_corrector:
        return x_t, None
    rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
    model_t = yield from _unipc_x0(x_t, sigma, step)
    corr_res = _weighted(d1s, rhos_c[:-1]) if d1s else 0
    x_t = x_t_ - (alpha_t * b_h) * (corr_res + rhos_c[-1] * (model_t - model_0))
    return x_t, model_t


def _uni_pc(x: torch.Tensor, sigmas: torch.Tensor, noise: NoiseFn, o: Mapping) -> Program:
    """UniPC multistep predictor-corrector (variant bh1, or bh2 for uni_pc_bh2).

    As in ComfyUI, a single step (order 0) only evaluates the model and returns the rescaled input;
    KSampler gives uni_pc one extra step and drops the penultimate sigma (see sigmas_for_denoise).
    """
    if len(sigmas) == 0:
        return x
    ts = sigmas.clone()
    if sigmas[-1] == 0:
        ts[-1] = 0.001
    steps, order, bh2 = len(ts) - 1, min(3, len(ts) - 2), o["variant"] == "bh2"
    x = x / torch.sqrt(1.0 + ts[0] ** 2.0)
    models, prev = [], []
    for step_index in range(steps):
        if step_index == 0:
            models, prev = [(yield from _unipc_x0(x, ts[0], 0))], [ts[0]]
        elif step_index < order:        # warm-up: orders 1 .. order - 1
            x, model = yield from _unipc_update(x, models, prev, ts[step_index], step_index, bh2, True, step_index)
            models.append(model)
            prev.append(ts[step_index])
        else:                           # the last loop index also takes the final step, without corrector
            for step in range(step_index, step_index + 1 + (step_index == steps - 1)):
                step_order = min(order, steps + 1 - step)
                x, model = yield from _unipc_update(x, models, prev, ts[step], step_order, bh2, step != steps, step)
                models, prev = models[1:] + models[-1:], prev[1:] + [ts[step]]
                if step < steps:
                    models[-1] = model
    return x / torch.exp(_vp_log_alpha(ts[-1]))


# -- the registry -------------------------------------------------------------------------------------------
class _Spec(NamedTuple):
    program: Callable[..., Program]
    defaults: Mapping[str, object]


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}
_SDE = {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}
_SDE_HEUN = {**_SDE, "solver_type": "heun"}

_SPECS: dict[str, _Spec] = {
    "euler": _Spec(_euler, _CHURN),
    "euler_ancestral": _Spec(_euler_ancestral, _ANCESTRAL),
    "heun": _Spec(_heun, _CHURN),
    "dpmpp_2m": _Spec(_dpmpp_2m, {}),
    "dpmpp_2m_sde": _Spec(_dpmpp_2m_sde, _SDE),
    "dpmpp_2m_sde_gpu": _Spec(_dpmpp_2m_sde, _SDE),
    "dpmpp_2m_sde_heun": _Spec(_dpmpp_2m_sde, _SDE_HEUN),
    "dpmpp_2m_sde_heun_gpu": _Spec(_dpmpp_2m_sde, _SDE_HEUN),
    "ddim": _Spec(_euler, _CHURN),          # ComfyUI runs "ddim" as euler (it differs only for inpainting)
    "lcm": _Spec(_lcm, {}),
    "uni_pc": _Spec(_uni_pc, {"variant": "bh1"}),
    "uni_pc_bh2": _Spec(_uni_pc, {"variant": "bh2"}),
}

SAMPLERS = tuple(_SPECS)

# Where ComfyUI's KSampler takes each sampler's per-step noise from (with default options):
# None -- no noise; "default" -- default_noise_sampler (a generator on the latent's device seeded with
# the KSampler seed; StepNoise(seed, shape) reproduces it); "brownian_cpu" / "brownian_gpu" --
# BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed, cpu=...), which needs torchsde: precompute it
# with ComfyUI as noise_sampler(sigmas[i], sigmas[i + 1]) for i in noise_steps(...) and pass
# StepNoise(noises=...). (With s_churn > 0, euler/heun draw from torch's global, unseeded generator.)
NOISE_SOURCES: dict[str, str | None] = {
    "euler": None, "euler_ancestral": "default", "heun": None, "dpmpp_2m": None,
    "dpmpp_2m_sde": "brownian_cpu", "dpmpp_2m_sde_gpu": "brownian_gpu",
    "dpmpp_2m_sde_heun": "brownian_cpu", "dpmpp_2m_sde_heun_gpu": "brownian_gpu",
    "ddim": None, "lcm": "default", "uni_pc": None, "uni_pc_bh2": None,
}


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown sampler {name!r}; supported: {', '.join(SAMPLERS)}")
    return _SPECS[name]


def _options(name: str, options: Mapping | None) -> dict:
    defaults = _spec(name).defaults
    options = dict(options or {})
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "none"
        raise ValueError(f"sampler {name!r} has no option(s) {', '.join(unknown)}; it accepts: {accepted}")
    if "solver_type" in options and options["solver_type"] not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {options['solver_type']!r}")
    if "variant" in options and options["variant"] not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {options['variant']!r}")
    return {**defaults, **options}


def _as_sigmas(sigmas, device: torch.device) -> torch.Tensor:
    s = torch.as_tensor(sigmas, dtype=torch.float32)
    if s.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D sequence, got shape {tuple(s.shape)}")
    return s.to(device)


# -- the per-slice machine ------------------------------------------------------------------------------------
class SliceSampler:
    """One sampler run over one slice of the latent (or over the whole latent).

    Protocol::

        m = SliceSampler("dpmpp_2m", sigmas, x_slice, noise=step_noise.rows(rows))
        while not m.done:
            x_in, sigma, step = m.next_input()     # evaluate the model on this
            m.feed(denoised)                        # the denoised prediction for x_in at sigma
        result = m.x

    `x` is the slice at the start of the current step (its final value once `done`); it is never
    modified in place, nor are the tensors fed or the noise. `noise(step_index)` must return
    standard normal noise shaped like the slice; it is required only by samplers/options that draw
    noise (`noise_steps` tells which steps). `on_step(step_index, denoised, x)` is called after the
    first evaluation of every step, like ComfyUI's sampler callback.
    """

    def __init__(self, name: str, sigmas, x: torch.Tensor, *, noise: NoiseFn | None = None,
                 options: Mapping | None = None,
                 on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None):
        spec, opts = _spec(name), _options(name, options)
        self.name = name
        self.sigmas = _as_sigmas(sigmas, torch.device("cpu"))
        self.num_steps = max(len(self.sigmas) - 1, 0)
        if noise is None:
            needed = noise_steps(name, self.sigmas.cpu(), opts)
            if needed:
                raise ValueError(f"sampler {name!r} draws noise at steps {needed}: pass noise=, e.g. "
                                 f"StepNoise(seed, full_latent_shape) or its .rows(slice) for a slice")
        self._noise = noise
        self._on_step = on_step
        self._program = spec.program(x, self.sigmas, self._checked_noise(x.shape), opts)
        self._x = x
        self._pending: _Eval | None = None
        self.evaluations = 0
        self._resume(None)

    def _checked_noise(self, shape: torch.Size) -> NoiseFn:
        def noise(step_index: int) -> torch.Tensor:
            n = self._noise(step_index)
            if n.shape != shape:
                raise ValueError(f"noise for step {step_index} has shape {tuple(n.shape)}, the slice has "
                                 f"{tuple(shape)}: pass the slice's rows (StepNoise.rows)")
            return n
        return noise

    def _resume(self, denoised: torch.Tensor | None) -> None:
        try:
            request = next(self._program) if denoised is None else self._program.send(denoised)
        except StopIteration as stop:
            self._x, self._pending = stop.value, None
            return
        self._pending = request
        if request.first:
            self._x = request.x

    @property
    def done(self) -> bool:
        return self._pending is None

    @property
    def x(self) -> torch.Tensor:
        return self._x

    @property
    def step_index(self) -> int:
        """The step the next evaluation belongs to (num_steps once done)."""
        return self.num_steps if self._pending is None else self._pending.step

    def next_input(self) -> tuple[torch.Tensor, float, int]:
        """(x_eval, sigma_eval, step_index) of the next model evaluation; asking twice gives the same."""
        if self._pending is None:
            raise RuntimeError(f"{self.name} sampler is done after {self.num_steps} steps; read .x")
        return self._pending.x, float(self._pending.sigma), self._pending.step

    def feed(self, denoised: torch.Tensor) -> None:
        """Give the denoised prediction for the last `next_input` and advance to the next evaluation."""
        request = self._pending
        if request is None:
            raise RuntimeError(f"{self.name} sampler is done; nothing to feed")
        if denoised.shape != request.x.shape:
            raise ValueError(f"denoised has shape {tuple(denoised.shape)}, the model input had "
                             f"{tuple(request.x.shape)}")
        self.evaluations += 1
        if request.first and self._on_step is not None:
            self._on_step(request.step, denoised, request.x)
        self._resume(denoised)


# -- whole-latent helpers --------------------------------------------------------------------------------------
def _probe(name: str, sigmas, options: Mapping | None) -> tuple[list[_Eval], list[int]]:
    """Run a sampler on a 1-element latent to list its evaluations and noise draws (the same for
    every slice and every latent: they depend only on the sigmas and options)."""
    opts = _options(name, options)
    s = _as_sigmas(sigmas, torch.device("cpu"))
    drawn: list[int] = []

    def noise(step_index: int) -> torch.Tensor:
        drawn.append(step_index)
        return torch.zeros(1)

    program = _spec(name).program(torch.zeros(1), s, noise, opts)
    evals = []
    try:
        request = next(program)
        while True:
            evals.append(request)
            request = program.send(torch.zeros(1))
    except StopIteration:
        pass
    return evals, drawn


def evaluation_sigmas(name: str, sigmas, options: Mapping | None = None) -> list[float]:
    """The sigma of every model evaluation of a run, in order (heun: two per step but the last)."""
    return [float(e.sigma) for e in _probe(name, sigmas, options)[0]]


def evaluation_steps(name: str, sigmas, options: Mapping | None = None) -> list[int]:
    """The step index of every model evaluation of a run, in order (aligned with evaluation_sigmas)."""
    return [e.step for e in _probe(name, sigmas, options)[0]]


def noise_steps(name: str, sigmas, options: Mapping | None = None) -> list[int]:
    """The steps that draw per-step noise, in order (where ComfyUI calls its noise sampler)."""
    return _probe(name, sigmas, options)[1]


def sample(denoise_fn: DenoiseFn, x: torch.Tensor, sigmas, name: str, *,
           noise: NoiseFn | int | None = None, options: Mapping | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """Run sampler `name` over the whole latent `x` (already noise-scaled: see `initial_latent`).

    `denoise_fn(x, sigma) -> denoised` (sigma a float). `noise` is a per-step noise callable or an int
    seed (= StepNoise(seed, x.shape) on x's device, ComfyUI's default noise). `callback(step,
    denoised, x, total_steps)` follows the first evaluation of each step -- the signature of ComfyUI's
    KSampler callback (latent previews, progress bars).
    """
    if isinstance(noise, int) and not isinstance(noise, bool):
        noise = StepNoise(noise, x.shape, dtype=x.dtype, device=x.device)
    total = max(len(sigmas) - 1, 0)
    on_step = None if callback is None else (lambda i, denoised, x_i: callback(i, denoised, x_i, total))
    machine = SliceSampler(name, sigmas, x, noise=noise, options=options, on_step=on_step)
    while not machine.done:
        x_in, sigma, _ = machine.next_input()
        machine.feed(denoise_fn(x_in, sigma))
    return machine.x
