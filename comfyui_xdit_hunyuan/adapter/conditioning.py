"""CONDITIONING (what CLIPTextEncode with HunyuanDiT's BERT + mT5 returns) -> the engine's CondEntry, as
ComfyUI's model_base.HunyuanDiT.extra_conds maps it; every extra that would change a KSampler result but that
the workers do not implement is rejected by name."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..job import CondEntry, JobError

HUNYUAN_KEYS = ("attention_mask", "conditioning_mt5xl", "attention_mask_mt5xl")
SIZE_KEYS = ("width", "height", "target_width", "target_height")   # image_meta_size (v1.0/v1.1)

# Keys ComfyUI's own nodes put into conditioning that a HunyuanDiT KSampler run ignores
# (model_base.HunyuanDiT.extra_conds does not read them, it has no adm / concat inputs).
IGNORED_KEYS = frozenset({
    "pooled_output", "crop_w", "crop_h", "prompt_type", "guidance", "clip_vision_output",
    "concat_latent_image", "concat_mask", "concat_mask_index", "reference_latents", "reference_latents_method",
    "noise_augmentation", "unclip_conditioning", "audio_embed", "time_dim_concat", "keyframe_idxs",
    "frame_rate", "seconds_start", "seconds_total", "lyrics_strength", "vace_frames", "vace_mask",
    "vace_strength", "control_video", "pose_video_latent", "face_video_pixels", "reference_motion",
    "aesthetic_score", "attention_mask_img_shape", "conditioning_lyrics",
})

# Keys that change a KSampler result and that the workers do not implement: rejected with the reason.
UNSUPPORTED_KEYS = {
    "area": "an area (ConditioningSetArea...): regional prompting",
    "mask": "a mask (ConditioningSetMask): masked prompting",
    "mask_strength": "a mask strength (ConditioningSetMask)",
    "set_area_to_bounds": "set_area_to_bounds (ConditioningSetMask)",
    "timestep_start": "a timestep range",
    "timestep_end": "a timestep range",
    "start_percent": "a timestep range (ConditioningSetTimestepRange)",
    "end_percent": "a timestep range (ConditioningSetTimestepRange)",
    "clip_start_percent": "a scheduled CLIP hook range",
    "clip_end_percent": "a scheduled CLIP hook range",
    "control": "a ControlNet (ControlNetApply)",
    "control_apply_to_uncond": "a ControlNet (ControlNetApply)",
    "gligen": "GLIGEN (GLIGENTextBoxApply)",
    "hooks": "hooks (Set CLIP Hooks / Cond Set Props: LoRA or timestep hooks)",
    "default": "a default conditioning (Cond Set Default Combine)",
    "model_conds": "pre-encoded model conditions",
    "noise_concat": "a noise concat input",
    "cross_attn_controlnet": "a ControlNet text input",
    "uuid": "an internal sampler field",
}
# range keys whose full-range values change nothing (ConditioningSetTimestepRange 0.0 .. 1.0)
_TRIVIAL = {"start_percent": 0.0, "end_percent": 1.0, "clip_start_percent": 0.0, "clip_end_percent": 1.0}


def _repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's rule (comfy.utils.repeat_to_batch_size) for a conditioning batch that is neither 1
    nor the latent batch: truncate, or tile and truncate."""
    n = t.shape[0]
    if n > batch:
        return t[:batch]
    if n < batch:
        return t.repeat((math.ceil(batch / n),) + (1,) * (t.dim() - 1))[:batch]
    return t


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def convert_conditioning(conditioning, which: str, latent_shape: tuple[int, ...]) -> list[CondEntry]:
    """A CONDITIONING value ([[cond, extras], ...]) -> one CondEntry per entry, in order.

    Several entries (Conditioning Combine) stay separate: the engine averages their predictions by
    strength as ComfyUI does. image_meta_size is what model_base.HunyuanDiT.extra_conds builds: height,
    width (latent size * 8 unless the extras say otherwise), target size, 0, 0. Raises JobError naming
    the unsupported extras, the missing HunyuanDiT keys, or the ComfyUI node that made an entry HunyuanDiT
    cannot use. Shapes, batch sizes and finiteness are the job gate's (checks.validate_job)."""
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) == 0:
        raise JobError(f"the {which} conditioning is empty; connect a CLIPTextEncode (HunyuanDiT CLIP) output")
    batch, _, h, w = latent_shape
    entries = []
    for i, item in enumerate(conditioning):
        where = f"{which} conditioning" + (f" entry {i + 1}" if len(conditioning) > 1 else "")
        if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[1], Mapping):
            raise JobError(f"the {where} is not a ComfyUI CONDITIONING entry ([tensor, dict]); connect a "
                           f"CLIPTextEncode output")
        cond, extras = item[0], item[1]
        bad = []
        for k, v in extras.items():
            if k in HUNYUAN_KEYS or k in SIZE_KEYS or k == "strength" or k in IGNORED_KEYS:
                continue
            if k in _TRIVIAL and _number(v) and float(v) == _TRIVIAL[k]:
                continue
            if k in UNSUPPORTED_KEYS:
                bad.append(f"'{k}' ({UNSUPPORTED_KEYS[k]})")
            else:
                bad.append(f"'{k}' (unknown to this node pack; it may change the result)")
        if bad:
            raise JobError(f"the {where} carries {', '.join(bad)}, which the xDiT sampler does not implement; "
                           f"remove the node that adds it, or use KSampler for this workflow")
        missing = [k for k in HUNYUAN_KEYS if k not in extras or extras[k] is None]
        if missing or not isinstance(cond, torch.Tensor):
            raise JobError(f"the {which} conditioning was not encoded with a HunyuanDiT CLIP (it lacks "
                           f"{', '.join(missing) or 'the text embedding'}); encode it with CLIPTextEncode using "
                           f"the CLIP of a HunyuanDiT checkpoint (BERT + mT5)")
        ctx, mask, t5, mask_t5 = cond, extras["attention_mask"], extras["conditioning_mt5xl"], extras["attention_mask_mt5xl"]
        for t, name in ((mask, "attention_mask"), (t5, "conditioning_mt5xl"), (mask_t5, "attention_mask_mt5xl")):
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                raise JobError(f"the {where}'s '{name}' is {type(t).__name__} {tuple(getattr(t, 'shape', ()))}, not "
                               f"a [batch, tokens, ...] tensor; re-encode the prompt with a HunyuanDiT CLIP")
        if mask.shape[1] != ctx.shape[1] or mask_t5.shape[1] != t5.shape[1]:
            raise JobError(f"the {where}'s embeddings and attention masks differ in length (BERT {ctx.shape[1]} vs "
                           f"{mask.shape[1]}, mT5 {t5.shape[1]} vs {mask_t5.shape[1]}); this happens with "
                           f"ConditioningConcat, which HunyuanDiT cannot use: combine prompts with Conditioning "
                           f"Combine instead")
        strength = extras.get("strength", 1.0)
        sizes = {k: extras.get(k, default) for k, default in (("width", w * 8), ("height", h * 8))}
        sizes["target_width"] = extras.get("target_width", sizes["width"])
        sizes["target_height"] = extras.get("target_height", sizes["height"])
        for k, v in (*sizes.items(), ("strength", strength)):
            if not _number(v):
                raise JobError(f"the {where}'s {k} is {v!r}; use a number")
        tensors = []
        for t, is_embedding in ((ctx, True), (mask, False), (t5, True), (mask_t5, False)):
            t = t.detach().to("cpu")
            if is_embedding and t.is_floating_point():
                t = t.to(torch.float32)
            if t.shape[0] not in (1, batch):
                t = _repeat_to_batch(t, batch)
            tensors.append(t.contiguous())
        meta = torch.tensor([[sizes["height"], sizes["width"], sizes["target_height"], sizes["target_width"], 0, 0]],
                            dtype=torch.float32)
        entries.append(CondEntry(context=tensors[0], text_embedding_mask=tensors[1],
                                 encoder_hidden_states_t5=tensors[2], text_embedding_mask_t5=tensors[3],
                                 image_meta_size=meta, strength=float(strength)))
    return entries
