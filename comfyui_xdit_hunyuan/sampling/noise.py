"""Noise exactly as ComfyUI draws it: the initial noise of a KSampler run, and per-step noise.

PipeFusion steps one horizontal slice of the latent at a time, so per-step noise is generated for the
full latent (the only way to get ComfyUI's numbers) and each slice reads its own rows.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

NoiseFn = Callable[[int], torch.Tensor]


def prepare_noise(latent: torch.Tensor, seed: int, batch_index: Sequence[int] | None = None) -> torch.Tensor:
    """ComfyUI's ``comfy.sample.prepare_noise``: standard normal noise shaped like `latent`, on the CPU.

    A CPU generator seeded with `seed` draws the whole batch at once. With `batch_index` (a LATENT's
    "batch_index", e.g. after "Latent From Batch") it draws one latent per index 0..max(batch_index)
    in order and returns, for each entry, the draw of that index -- so an image keeps its noise when
    it is sampled apart from its batch. Unlike ComfyUI this does not reseed torch's global generator.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    kwargs = dict(dtype=latent.dtype, layout=latent.layout, generator=generator, device="cpu")
    if batch_index is None:
        return torch.randn(latent.size(), **kwargs)
    indices = [int(i) for i in batch_index]
    if len(indices) != latent.shape[0]:
        raise ValueError(f"batch_index has {len(indices)} entries but the latent has batch {latent.shape[0]}")
    if min(indices) < 0:
        raise ValueError(f"batch_index entries must be >= 0, got {indices}")
    draws = [torch.randn([1] + list(latent.size())[1:], **kwargs) for _ in range(max(indices) + 1)]
    return torch.cat([draws[i] for i in indices], dim=0)


class StepNoise:
    """Per-step noise for ancestral / SDE samplers, shared by every slice of one latent.

    Seeded mode (``StepNoise(seed, shape)``) reproduces ComfyUI's ``default_noise_sampler``: one
    ``torch.Generator`` on `device` seeded with the KSampler seed, and one ``torch.randn`` of the full
    latent shape per step that needs noise, in step order. The draw for a step is made the first time
    any slice asks for it and cached; since every slice asks for the same steps in increasing order,
    first requests come in increasing step order and each step gets the same draw as in ComfyUI. Asking
    for a new step below one already drawn is an error. Note that the CUDA generator's numbers depend
    on the GPU model for large tensors, so to match a run on another GPU pass precomputed noises.

    List mode (``StepNoise(noises=[...])``) serves precomputed full-latent noises, indexed by step
    (entries for steps that draw no noise may be None) -- e.g. ComfyUI's BrownianTree noise for
    dpmpp_2m_sde, computed by ComfyUI itself as ``noise_sampler(sigmas[i], sigmas[i + 1])``.

    Calling the object gives the full-latent noise of a step; ``rows(slice)`` gives the callable a
    slice's sampler takes (rows = the latent's height axis, dim -2).
    """

    def __init__(self, seed: int | None = None, shape: Sequence[int] | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 noises: Sequence[torch.Tensor | None] | None = None):
        if (noises is None) == (seed is None):
            raise ValueError("StepNoise takes either a seed (with shape) or a list of precomputed noises")
        if noises is None and shape is None:
            raise ValueError("StepNoise(seed, shape): the full latent shape is needed to draw like ComfyUI")
        self.shape = tuple(shape) if shape is not None else None
        self.dtype, self.device = dtype, torch.device(device)
        self._noises = list(noises) if noises is not None else None
        self._generator = None
        if seed is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._drawn: dict[int, torch.Tensor] = {}

    def __call__(self, step_index: int) -> torch.Tensor:
        """The full-latent noise of step `step_index`."""
        if self._noises is not None:
            if not 0 <= step_index < len(self._noises) or self._noises[step_index] is None:
                raise IndexError(f"no precomputed noise for step {step_index} "
                                 f"({len(self._noises)} entries given)")
            return self._noises[step_index]
        if step_index not in self._drawn:
            if self._drawn and step_index < max(self._drawn):
                raise RuntimeError(f"noise for step {step_index} requested after step {max(self._drawn)} was "
                                   "drawn: steps must first be requested in increasing order")
            self._drawn[step_index] = torch.randn(self.shape, dtype=self.dtype, device=self.device,
                                                  generator=self._generator)
        noise = self._drawn[step_index]
        if noise is None:
            raise RuntimeError(f"noise for step {step_index} was released; release a step only after "
                               "every slice has used it")
        return noise

    def rows(self, rows: slice) -> NoiseFn:
        """A noise callable for the slice of latent rows `rows` (a slice over the height axis)."""
        return lambda step_index: self(step_index)[..., rows, :]

    def release(self, step_index: int) -> None:
        """Forget a drawn step once every slice has used it (saves memory; it cannot be asked again)."""
        if step_index in self._drawn:
            self._drawn[step_index] = None  # keep the key so the order check still sees it
