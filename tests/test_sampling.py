"""Sampling: model sampling, schedulers, noise and samplers, each checked against formulas written out
here with concrete numbers (no ComfyUI import; tests/test_sampling_vs_comfyui.py compares with ComfyUI).
"""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_xdit_hunyuan.model.config import HunyuanDiTConfig
from comfyui_xdit_hunyuan.sampling import (
    NOISE_SOURCES, SAMPLERS, SCHEDULERS, SDXL_LATENT, DiscreteVSampling, SliceSampler, StepNoise,
    ancestral_step, beta_ppf, betainc, calculate_sigmas, cfg_combine, cfg_uses_uncond, evaluation_sigmas,
    evaluation_steps, final_latent, initial_latent, is_max_denoise, noise_steps, prepare_noise, sample,
    sigmas_for_denoise,
)

MS = DiscreteVSampling(0.018)
T = lambda *v: torch.tensor(v, dtype=torch.float32)          # noqa: E731  a tiny 1-D latent


def close(actual, expected, tol=1e-6):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), f"{actual.tolist()} != {expected.tolist()}"


def run(name, sigmas, x, outputs, noise=None, options=None):
    """Run a sampler feeding the given denoised outputs in turn; return (final x, [(x_in, sigma, step)])."""
    m = SliceSampler(name, sigmas, x, noise=noise, options=options)
    inputs = []
    for out in outputs:
        inputs.append(m.next_input())
        m.feed(out)
    assert m.done, f"{name} wants more than {len(outputs)} evaluations"
    return m.x, inputs


def list_noise(*noises):
    return lambda step: noises[step]


# ==================================== model sampling ====================================================
def test_sigma_table_follows_the_beta_schedule():
    for end in (0.018, 0.03):
        ms = DiscreteVSampling(end)
        # betas = linspace(sqrt(0.00085), sqrt(end), 1000)^2; sigma_t = sqrt((1 - abar_t) / abar_t)
        abar, expected = 1.0, []
        for i in range(1000):
            beta = (math.sqrt(0.00085) + i * (math.sqrt(end) - math.sqrt(0.00085)) / 999) ** 2
            abar *= 1 - beta
            expected.append(math.sqrt((1 - abar) / abar))
        assert ms.sigmas.dtype == torch.float32 and ms.log_sigmas.dtype == torch.float32
        close(ms.sigmas, expected)
        close(ms.log_sigmas, [math.log(s) for s in expected])
        close(ms.sigma_min, math.sqrt(0.00085 / (1 - 0.00085)))


def test_for_model_picks_the_version_beta_end():
    assert DiscreteVSampling.for_model(HunyuanDiTConfig()).linear_end == 0.018
    assert DiscreteVSampling.for_model(HunyuanDiTConfig.full(size_cond=True)).linear_end == 0.03


def test_timestep_is_the_nearest_log_sigma_index():
    for t in (0, 1, 10, 500, 998, 999):
        ts = MS.timestep(MS.sigmas[t])
        assert ts.dtype == torch.float32 and ts.item() == t
        assert MS.timestep(float(MS.sigmas[t])).item() == t
    log10, log11 = math.log(MS.sigmas[10]), math.log(MS.sigmas[11])
    assert MS.timestep(math.exp(0.6 * log10 + 0.4 * log11)).item() == 10
    assert MS.timestep(math.exp(0.4 * log10 + 0.6 * log11)).item() == 11
    assert MS.timestep(1e-6).item() == 0 and MS.timestep(1e6).item() == 999
    assert MS.timestep(torch.stack([MS.sigmas[3], MS.sigmas[700]])).tolist() == [3.0, 700.0]


def test_sigma_interpolates_log_sigma():
    close(MS.sigma(10), MS.sigmas[10])
    close(MS.sigma(10.25), math.exp(0.75 * math.log(MS.sigmas[10]) + 0.25 * math.log(MS.sigmas[11])))
    close(MS.sigma(-5.0), MS.sigmas[0])
    close(MS.sigma(2000.0), MS.sigmas[999])
    for t in (0, 123, 999):                                     # round trip t -> sigma -> t
        assert MS.timestep(MS.sigma(t)).item() == t


def test_percent_to_sigma():
    assert MS.percent_to_sigma(0.0) == 999999999.9
    assert MS.percent_to_sigma(1.0) == 0.0
    close(MS.percent_to_sigma(0.25), MS.sigma(0.75 * 999.0))


def test_v_prediction_formulas():
    x, out = T(3.0, -1.0), T(1.0, 2.0)
    close(MS.calculate_input(2.0, x), [3 / math.sqrt(5), -1 / math.sqrt(5)])
    # denoised = x / (s^2 + 1) - out * s / sqrt(s^2 + 1) at s = 2
    close(MS.calculate_denoised(2.0, out, x), [3 / 5 - 2 / math.sqrt(5), -1 / 5 - 4 / math.sqrt(5)])
    xb, outb = torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2)   # one sigma per batch entry
    d = MS.calculate_denoised(torch.tensor([0.0, 1.0]), outb, xb)
    close(d[0], [[[1.0, 1.0]]])
    close(d[1], [[[0.5 - 1 / math.sqrt(2)] * 2]])


def test_denoise_calls_the_model_like_comfyui():
    seen = {}

    def v_model(x_in, t):
        seen.update(x_in=x_in, t=t)
        return torch.full_like(x_in, 0.5)

    x = torch.full((2, 4, 2, 2), 3.0)
    sigma = float(MS.sigmas[600])
    d = MS.denoise(v_model, x, sigma)
    close(seen["x_in"], x / math.sqrt(sigma ** 2 + 1))
    assert seen["t"].tolist() == [600.0, 600.0] and seen["t"].dtype == torch.float32
    close(d, torch.full_like(x, 3 / (sigma ** 2 + 1) - 0.5 * sigma / math.sqrt(sigma ** 2 + 1)))
    assert MS.denoise(lambda x_in, t: x_in.float(), x, sigma, dtype=torch.bfloat16).dtype == torch.float32


def test_noise_scaling_and_latent_format():
    noise, latent = T(1.0, -2.0), T(0.5, 0.5)
    close(MS.noise_scaling(3.0, noise, latent), [3.5, -5.5])
    close(MS.noise_scaling(3.0, noise, latent, max_denoise=True), [math.sqrt(10) + 0.5, -2 * math.sqrt(10) + 0.5])
    assert MS.inverse_noise_scaling(3.0, latent) is latent
    close(SDXL_LATENT.process_in(T(1.0)), [0.13025])
    close(SDXL_LATENT.process_out(T(0.13025)), [1.0])


def test_max_denoise_rule():
    smax = float(MS.sigma_max)
    assert is_max_denoise(MS, [smax, 1.0, 0.0])
    assert is_max_denoise(MS, [smax * (1 - 5e-6), 0.0])     # math.isclose(rel_tol=1e-5)
    assert is_max_denoise(MS, [smax * 2, 0.0])
    assert not is_max_denoise(MS, [smax * 0.999, 0.0])


def test_initial_and_final_latent():
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    empty, image = torch.zeros(1, 4, 3, 3), torch.full((1, 4, 3, 3), 2.0)
    full = sigmas_for_denoise(MS, "normal", 10, 1.0)
    part = sigmas_for_denoise(MS, "normal", 10, 0.5)
    s0 = float(full[0])
    close(initial_latent(MS, full, noise, empty), noise * math.sqrt(1 + s0 ** 2))     # pure noise
    s0 = float(part[0])
    close(initial_latent(MS, part, noise, image), noise * s0 + 2.0 * 0.13025)        # img2img
    close(final_latent(MS, part, torch.full((1, 4, 3, 3), 0.13025, dtype=torch.float64)),
          torch.ones(1, 4, 3, 3))
    assert final_latent(MS, part, image).dtype == torch.float32
    none = sigmas_for_denoise(MS, "normal", 10, 0.0)                                   # denoise 0
    assert initial_latent(MS, none, noise, image) is image and final_latent(MS, none, image) is image


def test_cfg():
    close(cfg_combine(T(2.0), T(1.0), 7.5), [8.5])
    assert not cfg_uses_uncond(1.0) and cfg_uses_uncond(1.01) and cfg_uses_uncond(5.0)


# ==================================== schedulers ========================================================
SMIN, SMAX = float(MS.sigma_min), float(MS.sigma_max)


def table_sigma(t):
    """sigma(t) by log-linear interpolation of the table, in float64."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(MS.sigmas[lo]) + w * math.log(MS.sigmas[hi]))


def test_karras():
    n, rho = 10, 7.0
    expected = [(SMAX ** (1 / rho) + i / (n - 1) * (SMIN ** (1 / rho) - SMAX ** (1 / rho))) ** rho for i in range(n)]
    close(calculate_sigmas(MS, "karras", n), expected + [0.0], tol=1e-5)


def test_exponential():
    n = 8
    expected = [math.exp(math.log(SMAX) + i / (n - 1) * (math.log(SMIN) - math.log(SMAX))) for i in range(n)]
    close(calculate_sigmas(MS, "exponential", n), expected + [0.0], tol=1e-5)


def test_simple():
    n = 7                                              # every 1000/7-th entry from the top
    expected = [float(MS.sigmas[999 - int(i * 1000 / n)]) for i in range(n)]
    assert calculate_sigmas(MS, "simple", n).tolist() == pytest.approx(expected + [0.0], rel=1e-7)


def test_normal_and_sgm_uniform_are_uniform_in_timestep():
    n = 9
    normal = [table_sigma(999 - i * 999 / (n - 1)) for i in range(n)]          # both ends included
    close(calculate_sigmas(MS, "normal", n), normal + [0.0], tol=1e-5)
    sgm = [table_sigma(999 - i * 999 / n) for i in range(n)]                    # n + 1 points, last dropped
    close(calculate_sigmas(MS, "sgm_uniform", n), sgm + [0.0], tol=1e-5)


def test_ddim_uniform():
    expected = [float(MS.sigmas[t]) for t in (901, 801, 701, 601, 501, 401, 301, 201, 101, 1)]
    assert calculate_sigmas(MS, "ddim_uniform", 10).tolist() == pytest.approx(expected + [0.0], rel=1e-7)
    # ComfyUI's quirk kept: stride 1000 // 30 = 33 gives entries 1, 34, ..., 991: 31 steps for 30.
    s30 = calculate_sigmas(MS, "ddim_uniform", 30)
    assert len(s30) == 32 and s30[0].item() == pytest.approx(float(MS.sigmas[991]))


def test_beta_scheduler():
    # timestep_i = rint(999 * ppf(1 - i / n)) for Beta(0.6, 0.6); repeated timesteps are dropped.
    assert calculate_sigmas(MS, "beta", 2).tolist() == pytest.approx(
        [float(MS.sigmas[999]), float(MS.sigmas[500]), 0.0])     # ppf(0.5) = 0.5: 499.5 rounds to even
    n = 12
    ts = [round(999 * beta_ppf(1 - i / n, 0.6, 0.6)) for i in range(n)]
    assert ts[0] == 999 and ts == sorted(ts, reverse=True)
    assert calculate_sigmas(MS, "beta", n).tolist() == pytest.approx([float(MS.sigmas[t]) for t in ts] + [0.0])
    assert len(calculate_sigmas(MS, "beta", 400)) < 401       # duplicates near the ends are dropped


def test_beta_ppf_closed_forms():
    for p in (1e-6, 0.01, 0.1, 0.3, 0.5, 0.77, 0.999):
        close(beta_ppf(p, 0.5, 0.5), math.sin(math.pi * p / 2) ** 2, tol=1e-12)     # arcsine law
        close(beta_ppf(p, 1.0, 3.0), 1 - (1 - p) ** (1 / 3), tol=1e-12)
        close(beta_ppf(p, 2.5, 1.0), p ** (1 / 2.5), tol=1e-12)
        close(beta_ppf(p, 1.0, 1.0), p, tol=1e-12)
        close(beta_ppf(p, 0.6, 0.9), 1 - beta_ppf(1 - p, 0.9, 0.6), tol=1e-12)     # reflection
    assert beta_ppf(0.5, 0.6, 0.6) == 0.5 and beta_ppf(0.0, 2, 3) == 0.0 and beta_ppf(1.0, 2, 3) == 1.0
    for x in (0.1, 0.5, 0.9):
        close(betainc(2.0, 2.0, x), 3 * x ** 2 - 2 * x ** 3, tol=1e-12)
    with pytest.raises(ValueError):
        beta_ppf(1.5, 0.6, 0.6)


def test_beta_ppf_against_scipy():
    special = pytest.importorskip("scipy.special")      # betaincinv = scipy.stats.beta.ppf
    for a, b in ((0.6, 0.6), (0.3, 4.0), (5.0, 0.4), (7.0, 3.0)):
        for p in (1e-9, 1e-4, 0.05, 0.3, 0.5, 0.62, 0.95, 1 - 1e-7):
            close(beta_ppf(p, a, b), special.betaincinv(a, b, p), tol=1e-10)
        for x in (1e-6, 0.1, 0.5, 0.9, 0.999):
            close(betainc(a, b, x), special.betainc(a, b, x), tol=1e-12)


def test_linear_quadratic():
    # 4 steps: linear part [0, 0.0125]; quadratic 0.2375 i^2 - 0.9375 i + 0.95 at i = 2, 3 -> 0.025, 0.275
    close(calculate_sigmas(MS, "linear_quadratic", 4), [SMAX * v for v in (1, 0.9875, 0.975, 0.725, 0)])
    close(calculate_sigmas(MS, "linear_quadratic", 1), [SMAX, 0.0])


def test_kl_optimal():
    n = 5
    expected = [math.tan((1 - k / (n - 1)) * math.atan(SMAX) + k / (n - 1) * math.atan(SMIN)) for k in range(n)]
    close(calculate_sigmas(MS, "kl_optimal", n), expected + [0.0], tol=1e-5)
    with pytest.raises(ValueError, match="at least 2 steps"):
        calculate_sigmas(MS, "kl_optimal", 1)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_schedule_descends_to_zero(scheduler):
    s = calculate_sigmas(MS, scheduler, 10)
    assert s.dtype == torch.float32 and s[-1].item() == 0.0 and len(s) >= 9
    assert torch.all(s[1:] < s[:-1])
    top = float(MS.sigmas[901]) if scheduler == "ddim_uniform" else SMAX   # ddim_uniform: entries 1 + 100 k
    assert s[0].item() == pytest.approx(top, rel=1e-4)


def test_denoise_takes_the_tail_of_a_longer_schedule():
    close(sigmas_for_denoise(MS, "karras", 10, 0.5), calculate_sigmas(MS, "karras", 20)[-11:])
    close(sigmas_for_denoise(MS, "normal", 7, 0.3), calculate_sigmas(MS, "normal", 23)[-8:])   # int(7/0.3)
    for denoise in (1.0, 0.99995, None):
        close(sigmas_for_denoise(MS, "normal", 10, denoise), calculate_sigmas(MS, "normal", 10))
    for denoise in (0.0, -1.0):
        assert sigmas_for_denoise(MS, "normal", 10, denoise).shape == (0,)
    # uni_pc / dpm_2: one more step, penultimate sigma dropped
    longer = calculate_sigmas(MS, "karras", 11)
    close(sigmas_for_denoise(MS, "karras", 10, sampler="uni_pc"), torch.cat([longer[:-2], longer[-1:]]))


def test_scheduler_errors():
    with pytest.raises(ValueError, match="supported: simple, sgm_uniform, karras"):
        calculate_sigmas(MS, "cosine", 10)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer"):
            calculate_sigmas(MS, "normal", steps)


# ==================================== samplers: one step against the formulas ================================
def test_sampler_list():
    assert {"euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lcm", "uni_pc",
            "uni_pc_bh2"} <= set(SAMPLERS)
    assert set(NOISE_SOURCES) == set(SAMPLERS)


def test_euler_step():
    x, d0 = T(1.0, -2.0), T(0.5, 0.25)
    out, inputs = run("euler", [3.0, 1.5], x, [d0])
    # x + (x - D) / sigma * (sigma_next - sigma) = x + (x - D) / 3 * (-1.5)
    close(out, [1 + 0.5 / 3 * -1.5, -2 - 2.25 / 3 * -1.5])
    assert inputs[0][1] == 3.0 and inputs[0][2] == 0 and torch.equal(inputs[0][0], x)
    ddim_out, _ = run("ddim", [3.0, 1.5], x, [d0])
    assert torch.equal(ddim_out, out)                        # ComfyUI runs ddim as euler


def test_euler_churn():
    x, n0, d0 = T(1.0), T(0.5), T(0.2)
    gamma = min(1.0 / 2, 2 ** 0.5 - 1)                       # s_churn / steps, capped at sqrt(2) - 1
    s_hat = 2.0 * (1 + gamma)
    x_hat = 1.0 + 0.5 * math.sqrt(s_hat ** 2 - 2.0 ** 2)
    out, inputs = run("euler", [2.0, 1.0, 0.0], x, [d0, d0], noise=list_noise(n0, n0), options={"s_churn": 1.0})
    close(inputs[0][1], s_hat)
    close(inputs[0][0], [x_hat])
    assert noise_steps("euler", [2.0, 1.0, 0.0], {"s_churn": 1.0}) == [0, 1]
    assert noise_steps("euler", [2.0, 1.0, 0.0], {"s_churn": 1.0, "s_tmax": 0.5}) == []


def test_ancestral_step():
    # sigma_up = min(s1, eta * sqrt(s1^2 (s0^2 - s1^2) / s0^2)), sigma_down = sqrt(s1^2 - sigma_up^2)
    close(ancestral_step(2.0, 1.0), (0.5, math.sqrt(3) / 2))
    close(ancestral_step(2.0, 1.0, eta=0.5), (math.sqrt(1 - 3 / 16), math.sqrt(3) / 4))
    assert ancestral_step(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert ancestral_step(2.0, 0.0) == (0.0, 0.0)


def test_euler_ancestral_step():
    x, d0, n0 = T(1.0, -2.0), T(0.5, 0.25), T(0.3, -1.0)
    out, _ = run("euler_ancestral", [2.0, 1.0], x, [d0], noise=list_noise(n0))
    # down to sigma_down = 0.5 by Euler, then + noise * sigma_up (sqrt(3) / 2)
    expected = [xi + (xi - di) / 2 * (0.5 - 2) + ni * math.sqrt(3) / 2
                for xi, di, ni in ((1.0, 0.5, 0.3), (-2.0, 0.25, -1.0))]
    close(out, expected)
    last, _ = run("euler_ancestral", [1.0, 0.0], x, [d0])    # to sigma 0: the denoised, no noise needed
    assert torch.equal(last, d0)
    assert noise_steps("euler_ancestral", [3.0, 2.0, 1.0, 0.0]) == [0, 1]


def test_heun_two_evaluations():
    sigmas = [2.0, 1.0, 0.0]
    assert evaluation_sigmas("heun", sigmas) == [2.0, 1.0, 1.0]
    assert evaluation_steps("heun", sigmas) == [0, 0, 1]
    x, d_a, d_b, d_c = T(1.0), T(0.2), T(0.4), T(0.7)
    out, inputs = run("heun", sigmas, x, [d_a, d_b, d_c])
    d1 = (1.0 - 0.2) / 2.0                                    # slope at sigma 2
    x2 = 1.0 + d1 * (1.0 - 2.0)                               # Euler predictor to sigma 1
    d2 = (x2 - 0.4) / 1.0                                     # slope there
    x_step = 1.0 + (d1 + d2) / 2 * (1.0 - 2.0)                # trapezoid corrector
    close(inputs[1][0], [x2])
    close(inputs[2][0], [x_step])
    close(out, [x_step + (x_step - 0.7) / 1.0 * (0.0 - 1.0)])  # last step: plain Euler (= 0.7)


def test_dpmpp_2m_uses_the_previous_denoised():
    sigmas = [4.0, 2.0, 1.0, 0.0]
    x, d0, d1, d2 = T(1.0, -1.0), T(0.1, 0.2), T(0.3, 0.5), T(0.6, 0.9)
    out, inputs = run("dpmpp_2m", sigmas, x, [d0, d1, d2])
    # step 0 (first order): x1 = (s1/s0) x - expm1(-h) D0 = 0.5 x + 0.5 D0
    x1 = [0.5 * 1.0 + 0.5 * 0.1, 0.5 * -1.0 + 0.5 * 0.2]
    close(inputs[1][0], x1)
    # step 1: h = h_last = ln 2, r = 1: D = (1 + 1/(2r)) D1 - 1/(2r) D0 = 1.5 D1 - 0.5 D0
    blend = [1.5 * 0.3 - 0.5 * 0.1, 1.5 * 0.5 - 0.5 * 0.2]
    close(inputs[2][0], [0.5 * a + 0.5 * b for a, b in zip(x1, blend)])
    close(out, d2)                                             # to sigma 0: the denoised


def test_dpmpp_2m_sde_steps():
    sigmas = [4.0, 2.0, 1.0, 0.0]
    x, d0, d1, d2, n0, n1 = T(1.0), T(0.1), T(0.3), T(0.6), T(0.5), T(-0.4)
    # eta = 1: alpha_t = 1, e^{-h} = s1/s0 = q: x1 = q^2 x + (1 - q^2) D0 + s1 sqrt(1 - q^2) n0
    q2 = 0.25
    x1 = q2 * 1.0 + (1 - q2) * 0.1 + 2.0 * math.sqrt(1 - q2) * 0.5
    out, inputs = run("dpmpp_2m_sde", sigmas, x, [d0, d1, d2], noise=list_noise(n0, n1))
    close(inputs[1][0], [x1])
    # step 1 (r = h_last / h = 1), midpoint correction 0.5 (1 - q^2) (D1 - D0) / r
    x2 = q2 * x1 + (1 - q2) * 0.3 + 0.5 * (1 - q2) * (0.3 - 0.1) + 1.0 * math.sqrt(1 - q2) * -0.4
    close(inputs[2][0], [x2])
    close(out, d2)
    # heun correction: ((1 - q^2) / (-2h) + 1) (D1 - D0) / r with h = ln 2
    _, inputs_h = run("dpmpp_2m_sde_heun", sigmas, x, [d0, d1, d2], noise=list_noise(n0, n1))
    x2h = q2 * x1 + (1 - q2) * 0.3 + ((1 - q2) / (-2 * math.log(2)) + 1) * (0.3 - 0.1) + math.sqrt(1 - q2) * -0.4
    close(inputs_h[2][0], [x2h])
    # eta = 0: the ODE solver, no noise: x1 = q x + (1 - q) D0
    assert noise_steps("dpmpp_2m_sde", sigmas, {"eta": 0.0}) == []
    _, inputs_0 = run("dpmpp_2m_sde", sigmas, x, [d0, d1, d2], options={"eta": 0.0})
    close(inputs_0[1][0], [0.5 * 1.0 + 0.5 * 0.1])
    assert noise_steps("dpmpp_2m_sde", sigmas) == [0, 1]


def test_lcm_steps():
    x, d0, d1, n0 = T(1.0, 2.0), T(0.1, 0.2), T(0.3, 0.4), T(-1.0, 0.5)
    out, inputs = run("lcm", [3.0, 1.5, 0.0], x, [d0, d1], noise=list_noise(n0))
    close(inputs[1][0], [0.1 + 1.5 * -1.0, 0.2 + 1.5 * 0.5])    # denoised re-noised to sigma_next
    assert torch.equal(out, d1)
    assert noise_steps("lcm", [3.0, 1.5, 0.0]) == [0]


@pytest.mark.parametrize("name", ["uni_pc", "uni_pc_bh2"])
def test_uni_pc_two_steps(name):
    # VP space: alpha = 1/sqrt(1+s^2), std = s/sqrt(1+s^2), lambda = -log s; the x0 prediction equals
    # the denoised. Order 1 here (2 steps): predictor = DDIM step, corrector with rho = 1/2, B(h) = -h
    # (bh1) or e^-h - 1 (bh2); the last step goes to sigma 0.001 and divides by its alpha.
    s0, s1, s_end = 3.0, 1.0, 0.001
    alpha = lambda s: 1 / math.sqrt(1 + s * s)      # noqa: E731
    std = lambda s: s / math.sqrt(1 + s * s)        # noqa: E731
    x, d0, d1 = (1.0, -2.0), (0.5, 0.25), (0.1, 0.3)
    h = math.log(s0 / s1)
    b_h = -h if name == "uni_pc" else math.expm1(-h)
    x_vp = [v * alpha(s0) for v in x]
    pred = [std(s1) / std(s0) * v - alpha(s1) * math.expm1(-h) * a for v, a in zip(x_vp, d0)]
    corrected = [p - alpha(s1) * b_h * 0.5 * (b - a) for p, a, b in zip(pred, d0, d1)]
    h_end = math.log(s1 / s_end)
    final = [(std(s_end) / std(s1) * c - alpha(s_end) * math.expm1(-h_end) * b) / alpha(s_end)
             for c, b in zip(corrected, d1)]
    out, inputs = run(name, [s0, s1, 0.0], T(*x), [T(*d0), T(*d1)])
    close(inputs[0][0], x, tol=1e-5)
    close(inputs[1][0], [p / alpha(s1) for p in pred], tol=1e-5)
    assert [i[1] for i in inputs] == [3.0, 1.0]
    # float32 loses digits in lambda(0.001) = -log(0.001) computed as ComfyUI does, via 1 - exp(-1e-6)
    close(out, final, tol=1e-4)


def test_evaluation_counts():
    sigmas = [8.0, 4.0, 2.0, 0.0]
    for name in SAMPLERS:
        expected = [8.0, 4.0, 4.0, 2.0, 2.0] if name == "heun" else [8.0, 4.0, 2.0]
        assert evaluation_sigmas(name, sigmas) == expected, name
    assert evaluation_sigmas("dpmpp_2m_sde", [5.0]) == []
    assert evaluation_sigmas("heun", [5.0, 1.0]) == [5.0, 1.0]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_ends_on_a_constant_denoised(name):
    """A model that always predicts z makes every sampler land on z at sigma 0."""
    z = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    sigmas = sigmas_for_denoise(MS, "karras", 6)
    x0 = initial_latent(MS, sigmas, prepare_noise(z, 3), torch.zeros_like(z))
    out = sample(lambda x, s: z, x0, sigmas, name, noise=StepNoise(9, z.shape))
    tol = 5e-3 if name.startswith("uni_pc") else 1e-5      # UniPC stops at sigma 0.001, not 0
    close(out, z, tol=tol)
    close(final_latent(MS, sigmas, out), z / 0.13025, tol=tol / 0.13025)


# ==================================== slices, noise, determinism ============================================
def elementwise_denoiser(x, sigma):
    s = torch.tensor(sigma, dtype=torch.float32)
    return torch.tanh(x) * (0.5 / (s + 1)) + x * (0.1 / (s * s + 1)) + 0.05 * s


SLICES = (slice(0, 3), slice(3, 7), slice(7, 11))               # uneven horizontal slices of 11 rows


def check_slices_equal_whole(name, precomputed_noise):
    shape = (2, 4, 11, 6)
    sigmas = sigmas_for_denoise(MS, "normal", 5)
    x = initial_latent(MS, sigmas, prepare_noise(torch.zeros(shape), 11), torch.zeros(shape))
    if precomputed_noise:
        noises = [torch.randn(shape, generator=torch.Generator().manual_seed(100 + i)) for i in range(5)]
        whole_noise, shared = StepNoise(noises=noises), StepNoise(noises=noises)
    else:
        whole_noise, shared = StepNoise(21, shape), StepNoise(21, shape)
    whole = sample(elementwise_denoiser, x, sigmas, name, noise=whole_noise)

    machines = [SliceSampler(name, sigmas, x[:, :, rows], noise=shared.rows(rows)) for rows in SLICES]
    order = [2, 2, 2] + [0, 1, 2] * 20 + [1] * 20 + [0] * 20   # slices at different steps at once
    for k in order:
        m = machines[k]
        if not m.done:
            x_in, sigma, _ = m.next_input()
            m.feed(elementwise_denoiser(x_in, sigma))
    assert all(m.done for m in machines)
    assert torch.equal(torch.cat([m.x for m in machines], dim=2), whole)


@pytest.mark.parametrize("name", SAMPLERS)
def test_slices_stepped_apart_equal_the_whole_latent(name):
    check_slices_equal_whole(name, precomputed_noise=False)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "euler_ancestral", "lcm"])
def test_slices_with_precomputed_noise(name):
    check_slices_equal_whole(name, precomputed_noise=True)


def test_full_run_is_deterministic_for_a_seed():
    shape = (1, 4, 8, 8)
    sigmas = sigmas_for_denoise(MS, "karras", 6)

    def generate(seed):
        noise = prepare_noise(torch.zeros(shape), seed)
        x = initial_latent(MS, sigmas, noise, torch.zeros(shape))
        return final_latent(MS, sigmas, sample(elementwise_denoiser, x, sigmas, "euler_ancestral", noise=seed))

    a, b, c = generate(7), generate(7), generate(8)
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()


def test_step_noise_draws_like_comfyui_default_noise_sampler():
    shape = (1, 2, 4, 3)
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(shape, generator=g) for _ in range(3)]   # one full-latent randn per noisy step
    noise = StepNoise(5, shape)
    assert torch.equal(noise(0), draws[0])
    assert torch.equal(noise.rows(slice(1, 3))(1), draws[1][..., 1:3, :])
    assert torch.equal(noise(3), draws[2])                      # step 2 drew none: step 3 gets draw 3
    assert noise(0) is noise(0)                                 # cached for the other slices
    with pytest.raises(RuntimeError, match="increasing order"):
        noise(2)
    noise.release(0)
    with pytest.raises(RuntimeError, match="released"):
        noise(0)


def test_step_noise_list_mode_and_errors():
    n = [torch.ones(1, 1, 2, 2), None, torch.zeros(1, 1, 2, 2)]
    noise = StepNoise(noises=n)
    assert noise(0) is n[0] and torch.equal(noise.rows(slice(0, 1))(2), n[2][..., 0:1, :])
    with pytest.raises(IndexError):
        noise(1)
    with pytest.raises(ValueError):
        StepNoise()
    with pytest.raises(ValueError):
        StepNoise(3)
    with pytest.raises(ValueError):
        StepNoise(3, (1, 2), noises=n)


def test_prepare_noise_like_comfyui():
    latent = torch.zeros(3, 4, 5, 5)
    state = torch.random.get_rng_state()
    noise = prepare_noise(latent, 42)
    assert torch.equal(torch.random.get_rng_state(), state)    # the global generator is left alone
    assert torch.equal(noise, torch.randn(latent.shape, generator=torch.Generator().manual_seed(42)))
    g = torch.Generator().manual_seed(42)
    per_index = [torch.randn(1, 4, 5, 5, generator=g) for _ in range(3)]
    assert torch.equal(prepare_noise(latent, 42, [2, 0, 2]), torch.cat([per_index[2], per_index[0], per_index[2]]))
    with pytest.raises(ValueError, match="batch_index has 2 entries"):
        prepare_noise(latent, 42, [0, 1])


def test_callback_follows_the_first_evaluation_of_each_step():
    calls = []
    x = torch.ones(1, 1, 2, 2)
    sample(lambda x, s: x * 0.5, x, [3.0, 2.0, 1.0, 0.0], "heun",
           callback=lambda i, denoised, x_i, total: calls.append((i, total, float(denoised.mean()))))
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3)]
    assert calls[0][2] == 0.5


# ==================================== errors ================================================================
def test_sampler_errors():
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="supported: euler, euler_ancestral, heun"):
        SliceSampler("dpm_fast", [1.0, 0.0], x)
    with pytest.raises(ValueError, match="has no option"):
        SliceSampler("euler", [1.0, 0.0], x, options={"eta": 1.0})
    with pytest.raises(ValueError, match="solver_type"):
        SliceSampler("dpmpp_2m_sde", [1.0, 0.0], x, options={"solver_type": "rk4"})
    with pytest.raises(ValueError, match="draws noise at steps"):
        SliceSampler("euler_ancestral", [2.0, 1.0, 0.0], x)
    with pytest.raises(ValueError, match="1-D"):
        SliceSampler("euler", [[1.0, 0.0]], x)
    m = SliceSampler("euler", [1.0, 0.0], x)
    with pytest.raises(ValueError, match="denoised has shape"):
        m.feed(torch.zeros(1, 1, 2, 3))
    m.feed(torch.zeros_like(x))
    assert m.done and m.step_index == 1
    with pytest.raises(RuntimeError, match="done"):
        m.next_input()
    bad = SliceSampler("lcm", [2.0, 1.0, 0.0], x, noise=lambda i: torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="StepNoise.rows"):
        bad.feed(torch.zeros_like(x))
