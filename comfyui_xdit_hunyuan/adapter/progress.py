"""ComfyUI's progress bar with latent previews, fed by the pool; it never swallows a cancel."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("xdit_hunyuan")


class ComfyProgress:
    """on_progress for the pool: ComfyUI's ProgressBar, with a latent preview from ComfyUI's previewer
    (the preview tensor is the step's denoised x0, as KSampler's callback receives it)."""

    def __init__(self, model, total: int, node_id: str | None):
        import comfy.utils  # noqa: PLC0415
        import latent_preview  # noqa: PLC0415
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.pbar = comfy.utils.ProgressBar(total, node_id=node_id)
        self._warned = False

    @property
    def wants_previews(self) -> bool:
        return self.previewer is not None

    def __call__(self, step: int, total: int, preview: torch.Tensor | None = None) -> None:
        import comfy.model_management as mm  # noqa: PLC0415
        image = None
        if preview is not None and self.previewer is not None:
            try:
                x0 = preview.detach().to("cpu", torch.float32)
                if x0.dim() == 3:
                    x0 = x0.unsqueeze(0)
                image = self.previewer.decode_latent_to_preview_image("JPEG", x0)
            except Exception as e:  # noqa: BLE001 - a preview must never fail the job
                if not self._warned:
                    log.warning("xDiT: latent preview failed (%s); continuing without previews", e)
                    self._warned = True
        if mm.processing_interrupted():
            return          # the pool sees cancel() and stops; ComfyUI raises afterwards
        try:
            self.pbar.update_absolute(max(0, min(int(step), int(total))), int(total), image)
        except mm.InterruptProcessingException:
            # ComfyUI's progress hook raises (and clears the flag) when the user pressed cancel: put the
            # flag back so cancel() reports it and the node raises after the pool has stopped.
            mm.interrupt_current_processing(True)
