"""A quick RGB look at a latent without a VAE: the linear latent -> RGB map of the SDXL latent space
(HunyuanDiT uses the SDXL VAE), the same approximation ComfyUI's "latent2rgb" previews use.

The factors act on the latent the sampler works on (VAE latent x 0.13025); the result lies roughly
in [-1, 1] and is mapped to [0, 255]. One RGB pixel per latent pixel (1/8 of the image size).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SDXL_SCALE_FACTOR = 0.13025
# rows: latent channels 0..3; columns: R, G, B
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latent_to_rgb(latent: torch.Tensor, *, scaled: bool = False) -> np.ndarray:
    """uint8 [h, w, 3] preview of the first image of `latent` ([B, 4, h, w] or [4, h, w]).

    scaled=False: `latent` is a LATENT's "samples" (VAE space, what the sampler returns and
    SaveLatent stores); scaled=True: it is already in the sampler's space (an x0 preview).
    """
    x = latent.detach()
    if x.ndim == 4:
        x = x[0]
    if x.ndim != 3 or x.shape[0] != len(SDXL_LATENT_RGB_FACTORS):
        raise ValueError(f"expected a latent of shape [B, 4, h, w] or [4, h, w], got {tuple(latent.shape)}")
    x = x.to("cpu", torch.float32)
    if not scaled:
        x = x * SDXL_SCALE_FACTOR
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32)      # [4, 3]
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)            # [3]
    rgb = torch.einsum("chw,cr->hwr", x, factors) + bias
    rgb = torch.nan_to_num(rgb, nan=0.0)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).to(torch.uint8).numpy()


def save_preview(latent: torch.Tensor, path: str | os.PathLike, *, scaled: bool = False,
                 upscale: int = 1) -> tuple[int, int]:
    """Write the preview of `latent` as a PNG at `path`; returns its (width, height).
    upscale > 1 enlarges it (nearest neighbour) so small latents stay visible."""
    from PIL import Image

    img = Image.fromarray(latent_to_rgb(latent, scaled=scaled))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img.size
