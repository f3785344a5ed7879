"""ComfyUI-identical sampling for HunyuanDiT: model sampling, sigma schedules, noise, and samplers that
step one slice of the latent at a time (for PipeFusion).

A KSampler run, reproduced::

    ms = DiscreteVSampling.for_model(cfg)
    sigmas = sigmas_for_denoise(ms, "normal", steps, denoise)
    noise = prepare_noise(latent, seed)
    x = initial_latent(ms, sigmas, noise, latent)
    x = sample(denoise_fn, x, sigmas, "euler_ancestral", noise=seed)
    samples = final_latent(ms, sigmas, x)

where ``denoise_fn(x, sigma)`` is the CFG-combined denoised prediction (``ms.denoise`` + ``cfg_combine``).
"""
from comfyui_xdit_hunyuan.sampling.model_sampling import (
    SDXL_LATENT,
    DiscreteVSampling,
    SDXLLatentFormat,
    cfg_combine,
    cfg_uses_uncond,
    final_latent,
    initial_latent,
    is_max_denoise,
)
from comfyui_xdit_hunyuan.sampling.noise import StepNoise, prepare_noise
from comfyui_xdit_hunyuan.sampling.samplers import (
    NOISE_SOURCES,
    SAMPLERS,
    SliceSampler,
    ancestral_step,
    evaluation_sigmas,
    evaluation_steps,
    noise_steps,
    sample,
)
from comfyui_xdit_hunyuan.sampling.schedulers import (
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
    SCHEDULERS,
    beta_ppf,
    betainc,
    calculate_sigmas,
    sigmas_for_denoise,
)

__all__ = [
    "DiscreteVSampling", "SDXLLatentFormat", "SDXL_LATENT", "cfg_combine", "cfg_uses_uncond",
    "final_latent", "initial_latent", "is_max_denoise",
    "StepNoise", "prepare_noise",
    "NOISE_SOURCES", "SAMPLERS", "SliceSampler", "ancestral_step", "evaluation_sigmas", "evaluation_steps",
    "noise_steps", "sample",
    "DISCARD_PENULTIMATE_SIGMA_SAMPLERS", "SCHEDULERS", "beta_ppf", "betainc", "calculate_sigmas",
    "sigmas_for_denoise",
]
