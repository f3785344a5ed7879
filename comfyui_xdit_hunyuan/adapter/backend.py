"""Every call into ComfyUI the sampler node makes, in one seam (tests substitute a fake): noise, sigmas, the
per-step noises of SDE samplers, the weights, progress, interrupt, and the pool."""
from __future__ import annotations

import os

import torch

from ..config import PoolConfig
from ..job import JobError, WeightsRef
from .inputs import OPTION_SOURCES
from .progress import ComfyProgress
from .weights import PatchedStateDict, model_identity


class ComfyBackend:
    """Every call into ComfyUI the sampler node makes. Tests substitute a fake."""

    def noise(self, samples: torch.Tensor, seed: int, batch_index) -> torch.Tensor:
        import comfy.sample  # noqa: PLC0415
        return comfy.sample.prepare_noise(samples, seed, batch_index)

    def sampler_names(self) -> list[str]:
        return OPTION_SOURCES["samplers"]()

    def scheduler_names(self) -> list[str]:
        return OPTION_SOURCES["schedulers"]()

    def sigmas(self, model, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
        """KSampler's own schedule (the names are checked first: KSampler would swap an unknown one silently)."""
        import comfy.samplers  # noqa: PLC0415
        ks = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler,
                                     denoise=denoise, model_options=model.model_options)
        return ks.sigmas.detach().to("cpu", torch.float32)

    def step_noises(self, model, kind: str, shape, sigmas: torch.Tensor, seed: int, steps: list[int]) -> list:
        """The noise ComfyUI's sampler draws at each step in `steps` (None elsewhere), from ComfyUI's own
        noise sampler built as the k-diffusion sampler builds it: on the model's device, "default" a
        seeded generator (drawn in step order), "brownian_*" a BrownianTreeNoiseSampler on the CPU or on
        that device."""
        from comfy.k_diffusion import sampling as kds  # noqa: PLC0415
        x = torch.zeros(shape, dtype=torch.float32, device=model.load_device)
        sig = sigmas.to(x.device)
        if kind == "default":
            ns = kds.default_noise_sampler(x, seed=seed)
        elif kind in ("brownian_cpu", "brownian_gpu"):
            sigma_min, sigma_max = sig[sig > 0].min(), sig.max()
            ns = kds.BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed, cpu=(kind == "brownian_cpu"))
        else:
            raise JobError(f"the workers ask for per-step noise of kind '{kind}', which this node cannot produce; "
                           f"update the node pack")
        out: list = [None] * (len(sig) - 1)
        for i in steps:
            out[i] = ns(sig[i], sig[i + 1]).to("cpu", torch.float32)
        return out

    def weights(self, model) -> WeightsRef:
        return WeightsRef(identity=model_identity(model), source=PatchedStateDict(model))

    def progress(self, model, total: int, node_id: str | None) -> ComfyProgress:
        return ComfyProgress(model, total, node_id)

    def interrupted(self) -> bool:
        import comfy.model_management as mm  # noqa: PLC0415
        return mm.processing_interrupted()

    def raise_interrupted(self) -> None:
        """Raise ComfyUI's own interrupt exception (clearing the flag, as ComfyUI does)."""
        import comfy.model_management as mm  # noqa: PLC0415
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()

    def cache_root(self) -> str:
        """The pack's compile caches: <ComfyUI user folder>/xdit_hunyuan/compile_cache (compile_cache.py)."""
        import folder_paths  # noqa: PLC0415
        return os.path.join(folder_paths.get_user_directory(), "xdit_hunyuan", "compile_cache")

    def get_pool(self, config: PoolConfig):
        from ..worker.client import get_pool  # noqa: PLC0415 - started on first use
        return get_pool(config)

    def start_spares(self, config: PoolConfig) -> list[str]:
        from ..worker.client import start_spares  # noqa: PLC0415
        return start_spares(config)
