"""LATENT -> the latent samples the engine denoises."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..job import JobError


def convert_latent(latent) -> torch.Tensor:
    """The LATENT's samples as float32 [B, 4, h, w] (an all-zero latent with another channel count is
    resized as comfy.sample.fix_empty_latent_channels does); JobError for what a HunyuanDiT KSampler run
    would not sample here (video latents, other VAEs, inpainting masks). Size and finiteness are the job gate's."""
    if not isinstance(latent, Mapping) or not isinstance(latent.get("samples"), torch.Tensor):
        raise JobError("latent_image is not a ComfyUI LATENT; connect EmptyLatentImage or VAEEncode")
    s = latent["samples"]
    if s.dim() != 4:
        raise JobError(f"latent_image has shape {tuple(s.shape)}; HunyuanDiT samples image latents "
                       f"[batch, 4, height/8, width/8] (not video latents)")
    if s.shape[1] != 4:
        if bool((s == 0).all()):
            s = torch.zeros(s.shape[0], 4, s.shape[2], s.shape[3], dtype=s.dtype)
        else:
            raise JobError(f"latent_image has {s.shape[1]} channels; HunyuanDiT uses the 4-channel SDXL VAE "
                           f"latent (EmptyLatentImage, or VAEEncode with the HunyuanDiT VAE)")
    mask = latent.get("noise_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not bool((mask == 1).all()):
            raise JobError("latent_image has a noise mask (SetLatentNoiseMask / VAEEncodeForInpaint / an "
                           "inpaint node): inpainting is not supported by the xDiT sampler; remove the mask or use "
                           "KSampler for inpainting")
    bi = latent.get("batch_index")
    if bi is not None and (not isinstance(bi, (list, tuple)) or len(bi) != s.shape[0]):
        raise JobError(f"latent_image's batch_index {bi!r} does not match its batch of {s.shape[0]}")
    return s.detach().to("cpu", torch.float32).contiguous()
