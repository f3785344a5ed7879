"""Our sampling equals ComfyUI's own code (model sampling, schedulers, KSampler's sigmas and noise,
every sampler's full run through KSAMPLER / CFGGuider.inner_sample).

Runs only when COMFYUI_DIR points at a ComfyUI checkout (0.3.64 was checked) whose Python
dependencies are importable (torchsde, einops, scipy, psutil, ...). torchvision is imported by a few
unrelated model files (Cosmos, Cascade) at import time only; when it is missing an empty stand-in
module is installed so the sampling modules import. Comparisons are exact (bit for bit) unless stated.
"""
from __future__ import annotations

import os
import sys
import types

import pytest
import torch

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to compare sampling with ComfyUI's own code",
                allow_module_level=True)


def _import_comfy():
    if COMFYUI_DIR not in sys.path:
        sys.path.insert(0, COMFYUI_DIR)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.setdefault("torchvision", stub)
        sys.modules.setdefault("torchvision.transforms", stub.transforms)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.k_diffusion.sampling
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers
    return comfy


try:
    comfy = _import_comfy()
except ImportError as exc:  # a dependency of ComfyUI is missing
    pytest.skip(f"ComfyUI at {COMFYUI_DIR} does not import here: {exc}", allow_module_level=True)

from comfyui_xdit_hunyuan.sampling import (  # noqa: E402
    SAMPLERS, SCHEDULERS, DiscreteVSampling, StepNoise, calculate_sigmas, cfg_combine, final_latent,
    initial_latent, noise_steps, prepare_noise, sample, sigmas_for_denoise,
)

BETA_ENDS = (0.018, 0.03)   # v1.2, v1.0/1.1


def comfy_ms(linear_end):
    config = types.SimpleNamespace(sampling_settings={"linear_start": 0.00085, "linear_end": linear_end})
    return comfy.model_base.model_sampling(config, comfy.model_base.ModelType.V_PREDICTION)


@pytest.fixture(scope="module", params=BETA_ENDS, ids=["v1.2", "v1.1"])
def pair(request):
    return DiscreteVSampling(request.param), comfy_ms(request.param)


def same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(a, b), f"max abs diff {(a.double() - b.double()).abs().max().item()}"


# -- model sampling ----------------------------------------------------------------------------------------
def test_sigma_tables(pair):
    ms, cms = pair
    same(ms.sigmas, cms.sigmas)
    same(ms.log_sigmas, cms.log_sigmas)
    same(ms.sigma_min, cms.sigma_min)
    same(ms.sigma_max, cms.sigma_max)


def test_timestep_sigma_percent(pair):
    ms, cms = pair
    sig = torch.cat([cms.sigmas[::37], torch.rand(200, generator=torch.Generator().manual_seed(0)) * 16 + 0.02])
    same(ms.timestep(sig), cms.timestep(sig).float())
    t = torch.linspace(-3, 1003, 301)
    same(ms.sigma(t), cms.sigma(t))
    for p in (0.0, 1e-4, 0.1, 0.5, 0.77, 1.0):
        assert ms.percent_to_sigma(p) == cms.percent_to_sigma(p)


def test_per_call_scaling(pair):
    ms, cms = pair
    g = torch.Generator().manual_seed(1)
    x, out, noise, lat = (torch.randn(2, 4, 5, 6, generator=g) for _ in range(4))
    for sigma in (torch.tensor(3.7), torch.tensor([0.5, 9.0])):
        same(ms.calculate_input(sigma, x), cms.calculate_input(sigma, x))
        same(ms.calculate_denoised(sigma, out, x), cms.calculate_denoised(sigma, out, x))
        for max_denoise in (False, True):
            same(ms.noise_scaling(sigma, noise, lat, max_denoise),
                 cms.noise_scaling(sigma, noise.clone(), lat, max_denoise))


def test_denoise_equals_base_model_apply_model(pair):
    """ms.denoise(model_fn, x, sigma) = ComfyUI's BaseModel._apply_model around the same model."""
    ms, cms = pair

    def v_model(x_in, t):
        return torch.sin(x_in) * 0.7 + (t / 1000).reshape(-1, 1, 1, 1)

    fake = types.SimpleNamespace(
        model_sampling=cms, manual_cast_dtype=None, get_dtype=lambda: torch.float32,
        process_timestep=lambda timestep, **kw: timestep,
        diffusion_model=lambda xc, t, **kw: v_model(xc, t))
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * 5
    for sigma in (float(cms.sigmas[-1]), 1.234, float(cms.sigmas[3])):
        ours = ms.denoise(v_model, x, sigma)
        theirs = comfy.model_base.BaseModel._apply_model(fake, x, torch.tensor(sigma) * x.new_ones([2]))
        same(ours, theirs)


def test_cfg_combine():
    g = torch.Generator().manual_seed(3)
    cond, uncond, x = (torch.randn(1, 4, 3, 3, generator=g) for _ in range(3))
    theirs = comfy.samplers.cfg_function(None, cond, uncond, 4.5, x, torch.tensor([1.0]), model_options={})
    same(cfg_combine(cond, uncond, 4.5), theirs)


# -- schedules ----------------------------------------------------------------------------------------------
def test_scheduler_list():
    assert tuple(comfy.samplers.SCHEDULER_NAMES) == SCHEDULERS
    assert set(SAMPLERS) <= set(comfy.samplers.SAMPLER_NAMES)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedulers(pair, scheduler):
    ms, cms = pair
    for steps in (1, 2, 3, 7, 10, 20, 25, 30, 50, 64):
        theirs = comfy.samplers.calculate_sigmas(cms, scheduler, steps)
        if scheduler == "kl_optimal" and steps == 1:
            assert torch.isnan(theirs[0])      # ComfyUI's division by n - 1; ours refuses
            with pytest.raises(ValueError, match="at least 2 steps"):
                calculate_sigmas(ms, scheduler, steps)
            continue
        same(calculate_sigmas(ms, scheduler, steps), theirs)


def _ksampler_sigmas(cms, scheduler, steps, denoise, sampler):
    model = types.SimpleNamespace(get_model_object=lambda name: cms)
    return comfy.samplers.KSampler(model, steps, "cpu", sampler=sampler, scheduler=scheduler,
                                   denoise=denoise).sigmas


@pytest.mark.parametrize("scheduler", ["normal", "karras", "ddim_uniform", "beta", "simple"])
def test_ksampler_denoise_and_discarded_sigma(pair, scheduler):
    ms, cms = pair
    for sampler in ("euler", "uni_pc", "dpm_2"):
        for steps, denoise in ((20, 1.0), (20, 0.99995), (20, 0.75), (7, 0.3), (12, 0.5), (20, 0.0)):
            theirs = _ksampler_sigmas(cms, scheduler, steps, denoise, sampler)
            same(sigmas_for_denoise(ms, scheduler, steps, denoise, sampler=sampler), theirs)


# -- noise ------------------------------------------------------------------------------------------------------
def test_prepare_noise():
    latent = torch.zeros(3, 4, 7, 5)
    for seed in (0, 42, 2 ** 63 + 5):
        same(prepare_noise(latent, seed), comfy.sample.prepare_noise(latent, seed))
        for inds in ([0, 1, 2], [2, 0, 2], [5, 1, 1]):
            same(prepare_noise(latent, seed, inds), comfy.sample.prepare_noise(latent, seed, inds))


# -- samplers: full KSampler runs ---------------------------------------------------------------------------------
def analytic_denoiser(x, sigma):
    """An elementwise stand-in for the CFG-combined model: any smooth function of (x, sigma)."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    s = s.reshape(-1, 1, 1, 1) if s.numel() > 1 else s.reshape(())
    return torch.tanh(x) * (0.5 / (s + 1)) + x * (0.1 / (s * s + 1)) + 0.05 * s


class AnalyticGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFGGuider with the model replaced by `analytic_denoiser` (no ModelPatcher needed)."""

    def __init__(self, cms):
        latent_format = comfy.latent_formats.SDXL()
        self.model_options, self.original_conds, self.cfg, self.conds = {}, {}, 1.0, {}
        self.model_patcher = types.SimpleNamespace(get_model_object=lambda name: cms)
        self.inner_model = types.SimpleNamespace(model_sampling=cms, process_latent_in=latent_format.process_in,
                                                 process_latent_out=latent_format.process_out)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return analytic_denoiser(x, timestep)


def comfy_run(cms, name, sigmas, noise, latent, seed):
    """KSampler's sampling part exactly: CFGGuider.inner_sample -> KSAMPLER.sample -> sample_<name>."""
    guider = AnalyticGuider(cms)
    sampler = comfy.samplers.sampler_object(name)
    return guider.inner_sample(noise.clone(), latent.clone(), "cpu", sampler, sigmas.clone(), None, None, True, seed)


def brownian_noises(name, sigmas, x, seed):
    """What ComfyUI's dpmpp_2m_sde* draw: its own BrownianTreeNoiseSampler, queried per noisy step."""
    positive = sigmas[sigmas > 0]
    tree = comfy.k_diffusion.sampling.BrownianTreeNoiseSampler(
        x, positive.min(), sigmas.max(), seed=seed, cpu=not name.endswith("_gpu"))
    noises = [None] * (len(sigmas) - 1)
    for i in noise_steps(name, sigmas):
        noises[i] = tree(sigmas[i], sigmas[i + 1])
    return noises


def our_run(ms, name, sigmas, noise, latent, seed):
    x = initial_latent(ms, sigmas, noise, latent)
    step_noise = seed
    if name.startswith("dpmpp_2m_sde"):
        step_noise = StepNoise(noises=brownian_noises(name, sigmas, x, seed))
    return final_latent(ms, sigmas, sample(analytic_denoiser, x, sigmas, name, noise=step_noise))


@pytest.mark.filterwarnings("ignore:Should have t")   # torchsde's float rounding notes, in ComfyUI's BrownianTree
@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_full_runs_equal_ksampler(pair, name):
    ms, cms = pair
    seed = 1234
    empty = torch.zeros(2, 4, 6, 5)
    image = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(7)) * 4
    cases = [
        (empty, sigmas_for_denoise(ms, "normal", 6, 1.0)),      # txt2img from pure noise
        (empty, sigmas_for_denoise(ms, "karras", 5, 1.0)),
        (image, sigmas_for_denoise(ms, "simple", 6, 0.6)),      # img2img: denoise < 1
        (image, sigmas_for_denoise(ms, "normal", 1, 1.0)),      # a single step
        (empty, sigmas_for_denoise(ms, "beta", 8, 1.0, sampler=name)),   # KSampler's sigmas for `name`
    ]
    for latent, sigmas in cases:
        noise = comfy.sample.prepare_noise(latent, seed)
        theirs = comfy_run(cms, name, sigmas, noise, latent, seed)
        ours = our_run(ms, name, sigmas, noise, latent, seed)
        same(ours, theirs)


def test_denoise_zero_returns_the_input_latent(pair):
    ms, cms = pair
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    sigmas = sigmas_for_denoise(ms, "normal", 10, 0.0)
    guider = AnalyticGuider(cms)
    theirs = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.sampler_object("euler"), sigmas)
    ours = final_latent(ms, sigmas, sample(analytic_denoiser, initial_latent(ms, sigmas, latent, latent),
                                           sigmas, "euler"))
    same(ours, theirs)
