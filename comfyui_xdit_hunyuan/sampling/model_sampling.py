"""ComfyUI's discrete v-prediction model sampling for HunyuanDiT, and KSampler's first and last step.

ComfyUI samples HunyuanDiT with ``ModelSamplingDiscrete`` + ``V_PREDICTION`` (sigma_data = 1) over the
SDXL latent format. Everything here reproduces those numbers, including the dtypes: the sigma table
is computed in float64 from float64 betas and stored as float32, and every per-call formula runs on
float32 tensors in the same order of operations, so results equal KSampler's bit for bit on the same
device.

Sigmas may be given as Python floats or tensors everywhere; they are converted to float32 tensors on
the device of the data they scale (a Python float holding a float32 value converts back exactly).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SIGMA_DATA = 1.0


class SDXLLatentFormat:
    """The SDXL VAE latent space HunyuanDiT uses: the sampler works on ``latent * 0.13025``."""

    scale_factor = 0.13025
    latent_channels = 4

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the space the diffusion model samples in."""
        return latent * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        """Sampled latent -> VAE latent (what a LATENT's "samples" holds)."""
        return latent / self.scale_factor


SDXL_LATENT = SDXLLatentFormat()


def _sigma_like(sigma, ref: torch.Tensor) -> torch.Tensor:
    """`sigma` as a float32 tensor shaped to broadcast against `ref`.

    One value gives a 0-dim tensor, kept on the CPU (it enters `ref`'s kernels as a scalar, so a GPU
    computation never waits for a host-to-device copy); a per-batch vector [B] gives [B, 1, 1, ...] on
    `ref`'s device (ComfyUI's ``reshape_sigma``).
    """
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if s.numel() == 1:
        return s.reshape(()).cpu()
    s = s.to(ref.device)
    return s.reshape(s.shape[:1] + (1,) * (ref.ndim - 1))


class DiscreteVSampling:
    """ComfyUI's ``ModelSamplingDiscrete`` with ``V_PREDICTION`` for a linear-in-sqrt beta schedule.

    Attributes ``sigmas`` and ``log_sigmas`` are float32 tables of ``timesteps`` entries, ascending
    (``sigmas[t]`` is the noise level of training step t).
    """

    sigma_data = SIGMA_DATA

    def __init__(self, linear_end: float, linear_start: float = 0.00085, timesteps: int = 1000):
        if not 0 < linear_start < linear_end < 1:
            raise ValueError(f"beta schedule needs 0 < linear_start < linear_end < 1, "
                             f"got linear_start={linear_start}, linear_end={linear_end}")
        if timesteps < 2:
            raise ValueError(f"timesteps must be at least 2, got {timesteps}")
        self.linear_start = float(linear_start)
        self.linear_end = float(linear_end)
        self.num_timesteps = int(timesteps)
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        # float64 -> float32 only at the end, and the log taken in float64 (as ComfyUI's set_sigmas).
        self.sigmas = sigmas.float()
        self.log_sigmas = sigmas.log().float()

    @classmethod
    def for_model(cls, cfg) -> "DiscreteVSampling":
        """The model sampling ComfyUI uses for a HunyuanDiTConfig (beta_end 0.018 v1.2, 0.03 v1.0/1.1)."""
        return cls(linear_end=cfg.beta_end)

    def to(self, device) -> "DiscreteVSampling":
        """A copy whose tables live on `device` (ComfyUI keeps them on the model's device)."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.sigmas = self.sigmas.to(device)
        other.log_sigmas = self.log_sigmas.to(device)
        return other

    def __repr__(self) -> str:
        return (f"DiscreteVSampling(linear_end={self.linear_end}, linear_start={self.linear_start}, "
                f"timesteps={self.num_timesteps})")

    # -- the sigma table -------------------------------------------------------------------------
    @property
    def sigma_min(self) -> torch.Tensor:
        """Smallest sigma of the table (0-dim float32 tensor)."""
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        """Largest sigma of the table (0-dim float32 tensor)."""
        return self.sigmas[-1]

    def timestep(self, sigma) -> torch.Tensor:
        """Index of the table entry nearest to `sigma` in log space, as float32, shaped like `sigma`.

        This is the ``t`` the diffusion model is called with. ComfyUI returns the index as int64
        and converts it with ``.float()`` before the model call; the values are the same.
        """
        s = torch.as_tensor(sigma, dtype=torch.float32)
        dists = s.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(s.shape).to(s.device).float()

    def sigma(self, timestep) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating log-sigma linearly."""
        ts = torch.as_tensor(timestep)
        t = torch.clamp(ts.float().to(self.log_sigmas.device), min=0, max=self.num_timesteps - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return log_sigma.exp().to(ts.device)

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the denoising process (0 = start, 1 = end), as ComfyUI's."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return self.sigma(torch.tensor((1.0 - percent) * 999.0)).item()

    # -- per model call --------------------------------------------------------------------------
    def calculate_input(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """The diffusion model's input at noise level sigma: x / sqrt(sigma^2 + 1)."""
        s = _sigma_like(sigma, x)
        return x / (s ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        """x0 from a v-prediction: x / (s^2 + 1) - v * s / sqrt(s^2 + 1) (sigma_data = 1)."""
        s = _sigma_like(sigma, model_output)
        var = s ** 2 + self.sigma_data ** 2
        return model_input * self.sigma_data ** 2 / var - model_output * s * self.sigma_data / var ** 0.5

    def denoise(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                sigma, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One denoiser call as ComfyUI's ``BaseModel._apply_model`` makes it.

        ``model_fn(x_in, t)`` gets the scaled input (cast to `dtype`, the model's compute dtype, when
        given) and the float32 timesteps [B]; its output (the v-prediction) is taken in float32.
        """
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if s.ndim == 0:
            s = s * x.new_ones([x.shape[0]], dtype=torch.float32)   # ComfyUI's sigmas[i] * s_in
        x_in = self.calculate_input(s, x)
        if dtype is not None:
            x_in = x_in.to(dtype)
        out = model_fn(x_in, self.timestep(s)).float()
        return self.calculate_denoised(s, out, x)

    # -- first and last step ---------------------------------------------------------------------
    def noise_scaling(self, sigma, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The sampler's starting point: noise * sqrt(1 + s^2) (pure noise) or noise * s, plus latent."""
        s = _sigma_like(sigma, noise)
        scaled = noise * torch.sqrt(1.0 + s ** 2.0) if max_denoise else noise * s
        return scaled + latent_image

    def inverse_noise_scaling(self, sigma, latent: torch.Tensor) -> torch.Tensor:
        """Identity for eps / v-prediction (kept for the same call sequence as ComfyUI)."""
        return latent


# -- KSampler's start and end -----------------------------------------------------------------------
def is_max_denoise(ms: DiscreteVSampling, sigmas) -> bool:
    """Whether sampling starts from pure noise: sigmas[0] equals sigma_max (rel 1e-5) or exceeds it."""
    max_sigma = float(ms.sigma_max)
    sigma = float(sigmas[0])
    return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


def initial_latent(ms: DiscreteVSampling, sigmas, noise: torch.Tensor, latent_image: torch.Tensor,
                   latent_format: SDXLLatentFormat = SDXL_LATENT) -> torch.Tensor:
    """The latent the sampler loop starts from, exactly as KSampler builds it.

    `latent_image` is the LATENT's "samples" (VAE space): a non-empty one is moved into the model's
    space first (an all-zero one is left alone, as ComfyUI does), then the noise is scaled to
    sigmas[0] and added. With no sigmas (denoise 0) KSampler returns the input latent unchanged, and
    so does this (and `final_latent` then passes it through).
    """
    if len(sigmas) == 0:
        return latent_image
    if torch.count_nonzero(latent_image) > 0:
        latent_image = latent_format.process_in(latent_image)
    return ms.noise_scaling(sigmas[0], noise, latent_image, is_max_denoise(ms, sigmas))


def final_latent(ms: DiscreteVSampling, sigmas, x: torch.Tensor,
                 latent_format: SDXLLatentFormat = SDXL_LATENT) -> torch.Tensor:
    """The LATENT "samples" KSampler returns for the sampler's final `x` (float32, VAE space)."""
    if len(sigmas) == 0:
        return x
    x = ms.inverse_noise_scaling(sigmas[-1], x)
    return latent_format.process_out(x.to(torch.float32))


# -- classifier-free guidance -----------------------------------------------------------------------
def cfg_uses_uncond(cfg: float) -> bool:
    """ComfyUI skips the negative prompt's model call when cfg is (close to) 1."""
    return not math.isclose(cfg, 1.0)


def cfg_combine(cond_denoised: torch.Tensor, uncond_denoised: torch.Tensor, cfg: float) -> torch.Tensor:
    """ComfyUI's CFG on denoised predictions: uncond + (cond - uncond) * cfg."""
    return uncond_denoised + (cond_denoised - uncond_denoised) * cfg
