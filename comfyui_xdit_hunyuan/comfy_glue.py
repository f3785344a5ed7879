"""What the two ComfyUI nodes do, kept apart from their declarations (nodes.py) so it can be tested
without ComfyUI: no ComfyUI module is imported at import time; the few calls into ComfyUI (noise,
sigmas, the noise samplers of SDE samplers, LoRA patch math, progress bar, previews, interrupt) live in
`ComfyBackend` and import lazily.

The sampler node must give the LATENT that KSampler gives for the same inputs. It therefore takes from
ComfyUI, and never re-implements: the initial noise (`comfy.sample.prepare_noise`), the sigma schedule
(`comfy.samplers.KSampler(...).sigmas`, so every scheduler, denoise < 1 and the samplers that drop the
penultimate sigma behave as in KSampler), the per-step noises of ancestral/SDE samplers (ComfyUI's own
noise samplers), and the MODEL's weights with its patches applied by `comfy.lora.calculate_weight`.
Everything a HunyuanDiT KSampler run would use but the workers do not implement is rejected, by name,
before any pool work.
"""
from __future__ import annotations

import logging
import math
import os
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .checks import all_finite, check_conditioning
from .job import CondEntry, Job, JobCancelled, JobError, PoolError, WeightsRef
from .model.attention import BACKENDS
from .model.config import HunyuanDiTConfig, NotHunyuanDiTError
from .config import DTYPES, PoolConfig, RunConfig, env_overrides, parse_devices
from .plan import STRATEGIES, ParallelConfig, PlanError, check_job, load_table, resolve

log = logging.getLogger("xdit_hunyuan")

# ------------------------------------------------------------------------------------------ node ids
CONFIG_NODE_ID = "XDiTParallelConfig"
CONFIG_DISPLAY_NAME = "xDiT Parallel Config"
SAMPLER_NODE_ID = "XDiTHunyuanDiTSampler"
SAMPLER_DISPLAY_NAME = "xDiT HunyuanDiT Sampler"
CATEGORY = "sampling/xDiT"
PARALLEL_TYPE = "XDIT_PARALLEL"

CONFIG_DESCRIPTION = (
    "How the xDiT HunyuanDiT Sampler spreads one image over several devices. The worker pool for a "
    "configuration starts on first use and stays warm across queued prompts; changing devices, dtype, "
    "attention or compile restarts it.")
SAMPLER_DESCRIPTION = (
    "Drop-in replacement for KSampler on HunyuanDiT models: same inputs, same LATENT for the same seed, "
    "computed on a warm pool of worker processes with xDiT-style parallelism (CFG, Ulysses, Ring, "
    "PipeFusion). Text encoding and VAE decoding stay in ComfyUI.")


# ------------------------------------------------------------------------------------------ input specs
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@dataclass(frozen=True)
class InputSpec:
    """One node input, declared once: nodes.py builds the ComfyUI schema from it, tests compare it
    with the example workflows. `options_from` names a list that only ComfyUI knows ("samplers",
    "schedulers"), resolved when the schema is built."""
    name: str
    kind: str                      # a widget kind above, or a socket type ("MODEL", "CONDITIONING", ...)
    tooltip: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    options: tuple = ()
    options_from: str | None = None
    control_after_generate: bool = False

    @property
    def is_widget(self) -> bool:
        return self.kind in WIDGET_KINDS


CONFIG_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("devices", "STRING", default="all", tooltip=(
        "Devices the workers run on, one process per device: 'all' (every visible GPU), '0,1' or "
        "'cuda:0,cuda:1' (those GPUs), 'cpu:N' (N CPU processes, for testing). More devices make one image "
        "faster, but every device holds its own copy of the weights (about 3 GB in bf16) and stays reserved "
        "while the pool is warm, so ComfyUI itself has less GPU memory.")),
    InputSpec("strategy", "COMBO", options=STRATEGIES, default="auto", tooltip=(
        "auto: choose the degrees per image from the device count, image size and cfg (the benchmark's "
        "measured table, else xDiT's published best layouts; exact modes up to 4 devices, PipeFusion from "
        "8); the degrees below are ignored. manual: use the degrees below as given; their product must "
        "equal the number of devices.")),
    InputSpec("cfg_degree", "INT", default=1, min=1, max=2, tooltip=(
        "2: the positive and the negative prompt run on two halves of the devices at once (exact, close to "
        "2x, one exchange of the prediction per step; wasted when cfg is 1). 1: both run as one batch on "
        "every device.")),
    InputSpec("ulysses_degree", "INT", default=1, min=1, max=16, tooltip=(
        "Sequence parallelism by attention heads (DeepSpeed-Ulysses): each device attends with 16/N of the "
        "heads over the whole image. Exact; two all-to-all exchanges per attention layer, so it needs fast "
        "links (NVLink). Must divide 16.")),
    InputSpec("ring_degree", "INT", default=1, min=1, max=64, tooltip=(
        "Sequence parallelism by passing key/value blocks around a ring of devices (ring attention). Exact; "
        "its point-to-point traffic overlaps compute and tolerates slower links (PCIe), but each step does "
        "more, smaller attention calls than Ulysses. Combine with ulysses_degree for large device counts.")),
    InputSpec("pipefusion_degree", "INT", default=1, min=1, max=20, tooltip=(
        "Splits the 40 transformer blocks into N pipeline stages on different devices and streams image "
        "patches through them, reusing one-step-old activations of the other patches. Least communication "
        "and memory per device, but the result differs slightly from KSampler (approximate, not exact).")),
    InputSpec("num_pipeline_patch", "INT", default=0, min=0, max=64, tooltip=(
        "PipeFusion only: how many patches the image is cut into (0 = one per stage). More patches keep "
        "the pipeline fuller but make each kernel smaller and the reused activations staler.")),
    InputSpec("warmup_steps", "INT", default=1, min=0, max=10000, tooltip=(
        "PipeFusion only: the first steps run synchronously on the full image before pipelining starts. "
        "More warmup steps bring the result closer to KSampler's but leave less time to gain speed.")),
    InputSpec("attention", "COMBO", options=BACKENDS, default="auto", tooltip=(
        "Attention kernel in the workers: auto picks the fastest available; padded zero-pads the head dim "
        "88 -> 96 for the faster cuDNN kernel (free inside compiled blocks); flash / cudnn / efficient force "
        "that PyTorch SDPA backend; flash_attn uses the flash-attn package (if installed); math is the slow "
        "reference, for debugging. Changing it restarts the pool.")),
    InputSpec("dtype", "COMBO", options=DTYPES, default="auto", tooltip=(
        "Precision of the workers' weights and activations: auto = bf16 on GPU, fp32 on CPU. fp32 follows "
        "a fp32 KSampler run most closely but is several times slower and needs twice the memory; fp16 can "
        "overflow on HunyuanDiT. Changing it restarts the pool.")),
    InputSpec("compile", "BOOLEAN", default=True, tooltip=(
        "torch.compile the model in every GPU worker: steps take about 60% of the eager time, but the "
        "first image of each new size waits for compilation (tens of seconds). Where it cannot compile "
        "(no Triton) the workers run eager and log why. CPU workers always run eager. Changing it restarts "
        "the pool.")),
)

SAMPLER_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("model", "MODEL", tooltip=(
        "The HunyuanDiT model (from CheckpointLoaderSimple or UNETLoader, LoRAs applied). Its weights, with "
        "their patches, are sent to the workers once and reused while the model does not change.")),
    InputSpec("seed", "INT", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip=(
        "The random seed of the initial noise (and of ancestral / SDE samplers), as in KSampler: the same "
        "seed gives the same image.")),
    InputSpec("steps", "INT", default=20, min=1, max=10000, tooltip=(
        "Denoising steps. More steps: more detail and less noise, proportionally more time.")),
    InputSpec("cfg", "FLOAT", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=(
        "Classifier-free guidance scale: higher follows the prompt more closely, too high burns the image. "
        "1.0 skips the negative prompt (half the work; then use cfg_degree 1).")),
    InputSpec("sampler_name", "COMBO", options_from="samplers", tooltip=(
        "The sampling algorithm, named as in KSampler. The workers implement a subset; choosing another one "
        "gives an error that lists the supported names.")),
    InputSpec("scheduler", "COMBO", options_from="schedulers", tooltip=(
        "How the noise levels are spaced over the steps, computed by ComfyUI itself (every KSampler "
        "scheduler works).")),
    InputSpec("positive", "CONDITIONING", tooltip=(
        "What to show: CLIPTextEncode output of the HunyuanDiT text encoders (BERT + mT5). Several entries "
        "(Conditioning Combine) are averaged by strength as in KSampler; areas, masks, timestep ranges, "
        "ControlNet, GLIGEN and hooks are not supported.")),
    InputSpec("negative", "CONDITIONING", tooltip=(
        "What to avoid: CLIPTextEncode output of the HunyuanDiT text encoders, same rules as positive.")),
    InputSpec("latent_image", "LATENT", tooltip=(
        "The latent to denoise: EmptyLatentImage for text-to-image, or an encoded image with denoise < 1. "
        "Inpainting noise masks are not supported.")),
    InputSpec("denoise", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
        "How much of the schedule to run: 1.0 starts from pure noise; lower values keep more of the input "
        "latent (image-to-image), exactly as in KSampler.")),
    InputSpec("parallel", PARALLEL_TYPE, tooltip=(
        "The parallel configuration from an xDiT Parallel Config node: which devices, which split.")),
)

CONFIG_OUTPUT_TOOLTIP = "The parallel configuration; connect it to an xDiT HunyuanDiT Sampler."
SAMPLER_OUTPUT_TOOLTIP = "The denoised latent, as KSampler returns it (decode it with VAEDecode)."


def comfy_sampler_names() -> list[str]:
    """ComfyUI's own sampler list (what KSampler offers), so workflows swap KSampler for this node."""
    import comfy.samplers  # noqa: PLC0415 - ComfyUI only
    return list(comfy.samplers.KSampler.SAMPLERS)


def comfy_scheduler_names() -> list[str]:
    import comfy.samplers  # noqa: PLC0415 - ComfyUI only
    return list(comfy.samplers.KSampler.SCHEDULERS)


OPTION_SOURCES: dict[str, Callable[[], list[str]]] = {
    "samplers": comfy_sampler_names, "schedulers": comfy_scheduler_names}


def resolve_options(spec: InputSpec) -> list:
    return list(spec.options) if spec.options_from is None else OPTION_SOURCES[spec.options_from]()


# ------------------------------------------------------------------------------------------ config node
def build_parallel_config(devices: str = "all", strategy: str = "auto", cfg_degree: int = 1,
                          ulysses_degree: int = 1, ring_degree: int = 1, pipefusion_degree: int = 1,
                          num_pipeline_patch: int = 0, warmup_steps: int = 1, attention: str = "auto",
                          dtype: str = "auto", compile: bool = True, *, cuda_count: int | None = None,
                          environ: Mapping[str, str] | None = None) -> RunConfig:
    """The config node's value, checked as far as it can be without a model or an image: the pool (devices,
    dtype, attention, compile, with the XDIT_HUNYUAN_* overrides of `environ`, default os.environ) and the
    split (strategy and degrees).

    Raises PlanError with what to change. Checks that need the image (auto degrees, latent size,
    steps) happen again in the sampler node."""
    if not isinstance(devices, str):
        raise PlanError("{devices} must be text such as 'all', '0,1' or 'cpu:2', got {value}", field="devices",
                        value=repr(devices))
    ints = {}
    for name, v in (("cfg_degree", cfg_degree), ("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree),
                    ("pipefusion_degree", pipefusion_degree), ("num_pipeline_patch", num_pipeline_patch),
                    ("warmup_steps", warmup_steps)):
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
            raise PlanError("{%s} must be a whole number, got {value}" % name, field=name, value=repr(v))
        ints[name] = int(v)
    overrides = env_overrides(os.environ if environ is None else environ)
    pool = PoolConfig(devices=devices.strip() or "all", attention=attention, dtype=dtype,
                      compile=bool(compile)).with_overrides(overrides).validate()
    parallel = ParallelConfig(strategy=strategy, **ints).validate()
    for spec in CONFIG_INPUTS:
        if spec.name in ints:
            check_declared(spec, ints[spec.name])
    n = len(parse_devices(pool.devices, cuda_count))
    if parallel.strategy == "manual":
        # the image size does not matter to manual degrees; resolve() checks the product against n
        resolve(parallel, pool.devices, n, (128, 128), True)
    return RunConfig(pool, parallel)


def check_declared(spec: InputSpec, value: float) -> None:
    """The range a number widget declares. ComfyUI checks it itself only for inputs that the node's validate_inputs
    does not take, and a linked value is never checked by it: PlanError saying what to change."""
    if spec.min is not None and value < spec.min:
        raise PlanError("{%s} is {value}; use at least {bound}" % spec.name, field=spec.name, value=value,
                        bound=f"{spec.min:g}")
    if spec.max is not None and value > spec.max:
        raise PlanError("{%s} is {value}; use at most {bound}" % spec.name, field=spec.name, value=value,
                        bound=f"{spec.max:g}")


def validate_parallel_inputs(**values) -> bool | str:
    """For the config node's validate_inputs: True, or the error message. Inputs fed by a link arrive
    as None at validation time; they are checked when the node runs."""
    if any(v is None for v in values.values()):
        return True
    try:
        build_parallel_config(**values)
    except PlanError as e:
        return str(e)
    return True


# ------------------------------------------------------------------------------------------ sampler inputs
def supported_samplers() -> tuple[str, ...]:
    """Sampler names the workers implement (asked from the sampling module at run time)."""
    try:
        from .sampling import SAMPLERS  # noqa: PLC0415 - the engine may be updated independently
    except ImportError as e:
        raise JobError(f"the xDiT sampling module cannot be imported ({e}); reinstall the node pack") from e
    return tuple(SAMPLERS)


# ComfyUI names the workers may not list but run the same way: ComfyUI runs ddim as euler (its extra
# random inpaint noise is used only with a noise mask, which is rejected).
ALIASES = {"ddim": "euler"}


def noise_plan(engine_sampler: str, sigmas: torch.Tensor) -> tuple[str | None, list[int]]:
    """Where ComfyUI's sampler takes its per-step noise from ("default" / "brownian_cpu" /
    "brownian_gpu" or None) and at which steps it draws, from the sampling module's description."""
    from .sampling import NOISE_SOURCES, noise_steps  # noqa: PLC0415
    kind = NOISE_SOURCES.get(engine_sampler)
    return (kind, list(noise_steps(engine_sampler, sigmas))) if kind else (None, [])


def map_sampler(sampler_name: str, supported: tuple[str, ...] | None = None) -> str:
    """The workers' name for a ComfyUI sampler name; JobError listing what is supported otherwise."""
    supported = supported_samplers() if supported is None else tuple(supported)
    if sampler_name in supported:
        return sampler_name
    alias = ALIASES.get(sampler_name)
    if alias is not None and alias in supported:
        return alias
    also = sorted(a for a, b in ALIASES.items() if b in supported and a not in supported)
    listing = ", ".join(supported) + (f" (and {', '.join(also)}, which ComfyUI runs the same way)" if also else "")
    raise JobError(f"sampler '{sampler_name}' is not implemented by the xDiT workers; choose one of: {listing}. "
                   f"For other samplers use KSampler.")


def check_sampler_inputs(steps, cfg, sampler_name, scheduler, denoise, *, schedulers=None,
                         samplers=None, comfy_samplers=None) -> None:
    """Widget values of the sampler node; raises JobError saying what to change."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise JobError(f"steps must be a whole number, got {steps!r}")
    if steps < 1:
        raise JobError(f"steps is {steps}; sample with at least 1 step")
    if steps > 10000:
        raise JobError(f"steps is {steps}; use at most 10000")
    if not isinstance(cfg, (int, float)) or isinstance(cfg, bool) or not math.isfinite(cfg):
        raise JobError(f"cfg must be a finite number, got {cfg!r}")
    if not 0.0 <= cfg <= 100.0:
        raise JobError(f"cfg is {cfg}; use a value from 0 to 100 (HunyuanDiT works well around 5-7)")
    if not isinstance(denoise, (int, float)) or isinstance(denoise, bool) or not math.isfinite(denoise):
        raise JobError(f"denoise must be a number from 0 to 1, got {denoise!r}")
    if not 0.0 <= denoise <= 1.0:
        raise JobError(f"denoise is {denoise}; use a value from 0 (keep the input latent) to 1 (start from noise)")
    if schedulers is not None and scheduler not in schedulers:
        raise JobError(f"scheduler '{scheduler}' is unknown to this ComfyUI; choose one of: {', '.join(schedulers)}")
    if comfy_samplers is not None and sampler_name not in comfy_samplers:
        raise JobError(f"sampler '{sampler_name}' is unknown to this ComfyUI; choose one of: {', '.join(comfy_samplers)}")
    map_sampler(sampler_name, samplers)


def validate_sampler_name(sampler_name=None) -> bool | str:
    """For the sampler node's validate_inputs (runs when the prompt is queued): True or the message. It takes
    the sampler name alone, so ComfyUI still checks the other widgets against their declared ranges and
    lists, and reports a rejected name once (it repeats a validate_inputs message for every input the
    function takes)."""
    if sampler_name is None:
        return True                       # fed by a link: checked when the node runs
    try:
        try:
            comfy_samplers = OPTION_SOURCES["samplers"]()
        except ImportError:
            comfy_samplers = None
        if comfy_samplers is not None and sampler_name not in comfy_samplers:
            raise JobError(f"sampler '{sampler_name}' is unknown to this ComfyUI; choose one of: "
                           f"{', '.join(comfy_samplers)}")
        map_sampler(sampler_name)
    except JobError as e:
        return str(e)
    return True


# ------------------------------------------------------------------------------------------ conditioning
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


def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's rule (comfy.utils.repeat_to_batch_size) for a conditioning batch that is neither 1
    nor the latent batch: truncate, or tile and truncate."""
    n = t.shape[0]
    if n > batch:
        return t[:batch]
    if n < batch:
        return t.repeat((math.ceil(batch / n),) + (1,) * (t.dim() - 1))[:batch]
    return t


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise JobError(f"{what} contains {bad} NaN or infinite values; re-encode the prompt (a broken text "
                       f"encoder or a node upstream produced them)")


def convert_conditioning(conditioning, which: str, latent_shape: tuple[int, ...]) -> list[CondEntry]:
    """A CONDITIONING value ([[cond, extras], ...]) -> one CondEntry per entry, in order.

    Several entries (Conditioning Combine) stay separate: the engine averages their predictions by
    strength as ComfyUI does. image_meta_size is what model_base.HunyuanDiT.extra_conds builds: height,
    width (latent size * 8 unless the extras say otherwise), target size, 0, 0. Raises JobError naming
    the unsupported extras or the missing HunyuanDiT keys."""
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
            if k in _TRIVIAL and isinstance(v, (int, float)) and float(v) == _TRIVIAL[k]:
                continue
            if k in UNSUPPORTED_KEYS:
                bad.append(f"'{k}' ({UNSUPPORTED_KEYS[k]})")
            else:
                bad.append(f"'{k}' (unknown to this node pack; it may change the result)")
        if bad:
            raise JobError(f"the {where} carries {', '.join(bad)}, which the xDiT sampler does not implement; "
                           f"remove the node that adds it, or use KSampler for this workflow")
        missing = [k for k in HUNYUAN_KEYS if k not in extras or extras[k] is None]
        if missing or not _is_tensor(cond):
            raise JobError(f"the {which} conditioning was not encoded with a HunyuanDiT CLIP (it lacks "
                           f"{', '.join(missing) or 'the text embedding'}); encode it with CLIPTextEncode using "
                           f"the CLIP of a HunyuanDiT checkpoint (BERT + mT5)")
        ctx, mask, t5, mask_t5 = cond, extras["attention_mask"], extras["conditioning_mt5xl"], extras["attention_mask_mt5xl"]
        for t, name in ((mask, "attention_mask"), (t5, "conditioning_mt5xl"), (mask_t5, "attention_mask_mt5xl")):
            if not _is_tensor(t):
                raise JobError(f"the {where}'s '{name}' is {type(t).__name__}, not a tensor; re-encode the prompt "
                               f"with a HunyuanDiT CLIP")
        if ctx.dim() != 3 or t5.dim() != 3 or mask.dim() != 2 or mask_t5.dim() != 2:
            raise JobError(f"the {where} has unexpected shapes (text {tuple(ctx.shape)}, mask {tuple(mask.shape)}, "
                           f"mT5 {tuple(t5.shape)}, mask {tuple(mask_t5.shape)}); HunyuanDiT needs [batch, tokens, "
                           f"width] embeddings and [batch, tokens] masks from CLIPTextEncode")
        if mask.shape[1] != ctx.shape[1] or mask_t5.shape[1] != t5.shape[1]:
            raise JobError(f"the {where}'s embeddings and attention masks differ in length (BERT {ctx.shape[1]} vs "
                           f"{mask.shape[1]}, mT5 {t5.shape[1]} vs {mask_t5.shape[1]}); this happens with "
                           f"ConditioningConcat, which HunyuanDiT cannot use: combine prompts with Conditioning "
                           f"Combine instead")
        n = ctx.shape[0]
        if not (mask.shape[0] == t5.shape[0] == mask_t5.shape[0] == n):
            raise JobError(f"the {where}'s tensors disagree on the batch size ({n}, {mask.shape[0]}, {t5.shape[0]}, "
                           f"{mask_t5.shape[0]}); re-encode the prompt")
        strength = extras.get("strength", 1.0)
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
            raise JobError(f"the {where}'s strength is {strength!r}; use a finite number")
        sizes = {}
        for k, default in (("width", w * 8), ("height", h * 8)):
            sizes[k] = extras.get(k, default)
        sizes["target_width"] = extras.get("target_width", sizes["width"])
        sizes["target_height"] = extras.get("target_height", sizes["height"])
        for k, v in sizes.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise JobError(f"the {where}'s {k} is {v!r}; use a number of pixels")
        tensors = []
        for t, name in ((ctx, "text embedding"), (mask, "attention mask"), (t5, "mT5 embedding"),
                        (mask_t5, "mT5 attention mask")):
            _check_finite(t, f"the {where}'s {name}")
            t = t.detach().to("cpu")
            if t.is_floating_point() and name.endswith("embedding"):
                t = t.to(torch.float32)
            if n not in (1, batch):
                t = _repeat_to_batch(t, batch)
            tensors.append(t.contiguous())
        meta = torch.tensor([[sizes["height"], sizes["width"], sizes["target_height"], sizes["target_width"], 0, 0]],
                            dtype=torch.float32)
        entries.append(CondEntry(context=tensors[0], text_embedding_mask=tensors[1],
                                 encoder_hidden_states_t5=tensors[2], text_embedding_mask_t5=tensors[3],
                                 image_meta_size=meta, strength=float(strength)))
    return entries


# ------------------------------------------------------------------------------------------ latent
def check_latent(latent) -> torch.Tensor:
    """The LATENT's samples as float32 [B, 4, h, w] (an all-zero latent with another channel count is
    resized as comfy.sample.fix_empty_latent_channels does); JobError for what cannot be sampled."""
    if not isinstance(latent, Mapping) or not _is_tensor(latent.get("samples")):
        raise JobError("latent_image is not a ComfyUI LATENT; connect EmptyLatentImage or VAEEncode")
    s = latent["samples"]
    if s.dim() != 4:
        raise JobError(f"latent_image has shape {tuple(s.shape)}; HunyuanDiT samples image latents "
                       f"[batch, 4, height/8, width/8] (not video latents)")
    if s.shape[0] < 1 or s.shape[2] < 2 or s.shape[3] < 2:
        raise JobError(f"latent_image {tuple(s.shape)} is too small; use an image of at least 16x16 pixels")
    if s.shape[1] != 4:
        if bool((s == 0).all()):
            s = torch.zeros(s.shape[0], 4, s.shape[2], s.shape[3], dtype=s.dtype)
        else:
            raise JobError(f"latent_image has {s.shape[1]} channels; HunyuanDiT uses the 4-channel SDXL VAE "
                           f"latent (EmptyLatentImage, or VAEEncode with the HunyuanDiT VAE)")
    _check_finite(s, "latent_image")
    mask = latent.get("noise_mask")
    if mask is not None:
        if not _is_tensor(mask) or not bool((mask == 1).all()):
            raise JobError("latent_image has a noise mask (SetLatentNoiseMask / VAEEncodeForInpaint / an "
                           "inpaint node): inpainting is not supported by the xDiT sampler; remove the mask or use "
                           "KSampler for inpainting")
    bi = latent.get("batch_index")
    if bi is not None and (not isinstance(bi, (list, tuple)) or len(bi) != s.shape[0]):
        raise JobError(f"latent_image's batch_index {bi!r} does not match its batch of {s.shape[0]}")
    return s.detach().to("cpu", torch.float32).contiguous()


# ------------------------------------------------------------------------------------------ model
def _class_names(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def model_kind(model) -> str:
    inner = getattr(model, "model", None)
    cfg = getattr(inner, "model_config", None)
    name = type(inner).__name__ if inner is not None else type(model).__name__
    return f"{name} ({type(cfg).__name__})" if cfg is not None and type(cfg).__name__ != name else name


def hunyuan_sigmas(linear_start: float = 0.00085, linear_end: float = 0.018, timesteps: int = 1000) -> torch.Tensor:
    """The discrete sigma table of HunyuanDiT's scaled-linear beta schedule (float64)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - ac) / ac) ** 0.5


# What TorchCompileModel adds (comfy_api.torch_helpers): a wrapper of the model call and its settings. Neither
# changes the result, so both are accepted.
TORCH_COMPILE_WRAPPER = "torch.compile"
TORCH_COMPILE_OPTION = "torch_compile_kwargs"

# model_options keys and patcher features that change what KSampler computes; the message says which
# kind of node sets them.
_MODEL_OPTION_HINTS = {
    "sampler_cfg_function": "a CFG-changing node (RescaleCFG, PerpNeg, ...)",
    "sampler_post_cfg_function": "a post-CFG node (e.g. PAG, SAG, CFGNorm, APG)",
    "sampler_pre_cfg_function": "a pre-CFG node",
    "sampler_calc_cond_batch_function": "a node that replaces the conditioning batch",
    "model_function_wrapper": "a model wrapper node",
    "denoise_mask_function": "an inpainting / differential diffusion node",
    "disable_cfg1_optimization": "a CFG-changing node",
    "context_handler": "a context-window node",
}


def check_model(model) -> HunyuanDiTConfig:
    """The MODEL must be a plain HunyuanDiT (LoRA / merge patches allowed); returns its config.

    Rejects, by name, model options, wrappers and object patches that would change KSampler's result and
    that the workers cannot reproduce."""
    inner = getattr(model, "model", None)
    if inner is None or "HunyuanDiT" not in _class_names(inner):
        raise JobError(f"the MODEL is {model_kind(model)}, not HunyuanDiT; load a HunyuanDiT checkpoint "
                       f"(e.g. hunyuan_dit_1.2.safetensors) or use KSampler for this model")
    dm = getattr(inner, "diffusion_model", None)
    if dm is None:
        raise JobError("the MODEL has no diffusion model; load the checkpoint again")
    try:
        cfg = HunyuanDiTConfig.from_state_dict(dict(dm.state_dict()))
    except NotHunyuanDiTError as e:
        raise JobError(f"the MODEL's weights are not a HunyuanDiT this pack can run: {e}") from e

    found, compiled = [], False
    opts = getattr(model, "model_options", {}) or {}
    for k, v in opts.items():
        if k == TORCH_COMPILE_OPTION:     # TorchCompileModel's settings; the workers compile on their own
            compiled = True
        elif k == "transformer_options":
            for tk, tv in (v or {}).items():
                if tv:
                    found.append(f"transformer_options['{tk}'] (a model patch node)")
        elif v is not None and v != [] and v != {} and v is not False:
            found.append(f"model_options['{k}'] ({_MODEL_OPTION_HINTS.get(k, 'a model patch node')})")
    for wtype, by_key in (getattr(model, "wrappers", None) or {}).items():
        for key, fns in (by_key or {}).items():
            if not fns:
                continue
            if key == TORCH_COMPILE_WRAPPER:
                compiled = True
                continue
            found.append(f"a '{wtype}' wrapper '{key}'")
    for ctype, by_key in (getattr(model, "callbacks", None) or {}).items():
        for key, fns in (by_key or {}).items():
            if fns:
                found.append(f"a '{ctype}' callback '{key}'")
    for name in (getattr(model, "object_patches", None) or {}):
        if name != "model_sampling":
            found.append(f"an object patch of '{name}'")
    if getattr(model, "weight_wrapper_patches", None):
        found.append(f"weight wrappers on {len(model.weight_wrapper_patches)} weights")
    for what in ("injections", "additional_models"):
        if any(getattr(model, what, None) or {}):
            found.append(f"{what.replace('_', ' ')} ({', '.join(getattr(model, what))})")
    if found:
        raise JobError(f"the MODEL carries {'; '.join(found)}, which the xDiT workers cannot reproduce; remove "
                       f"the node that adds it between the loader and this sampler (LoRA loaders are fine), or use "
                       f"KSampler")
    check_model_sampling(model, cfg)
    if compiled:
        log.info("xDiT: the MODEL went through TorchCompileModel; the workers do not use ComfyUI's compiled "
                 "model, they compile their own (the compile option of the xDiT Parallel Config node)")
    return cfg


def check_model_sampling(model, cfg: HunyuanDiTConfig) -> None:
    """The workers use HunyuanDiT's own discrete v-prediction schedule; a MODEL whose model sampling was
    changed (ModelSamplingDiscrete and similar) gets an error, since KSampler would use the new one."""
    get = getattr(model, "get_model_object", None)
    ms = get("model_sampling") if get is not None else getattr(getattr(model, "model", None), "model_sampling", None)
    if ms is None:
        return
    bases = [b.__name__ for b in type(ms).__bases__]
    problem = None
    if bases != ["ModelSamplingDiscrete", "V_PREDICTION"]:
        problem = f"it is {' + '.join(bases) or type(ms).__name__}"
    elif getattr(ms, "zsnr", False):
        problem = "zero terminal SNR (zsnr) is on"
    elif float(getattr(ms, "sigma_data", 1.0)) != 1.0:
        problem = f"sigma_data is {ms.sigma_data}"
    else:
        table = hunyuan_sigmas(0.00085, cfg.beta_end)
        sig = getattr(ms, "sigmas", None)
        if sig is None or sig.shape != table.shape or not torch.allclose(sig.double().cpu(), table, rtol=1e-5, atol=0):
            problem = (f"its noise schedule is not HunyuanDiT {cfg.version}'s scaled-linear schedule "
                       f"(linear_end {getattr(ms, 'linear_end', '?')}, expected {cfg.beta_end})")
    if problem:
        raise JobError(f"the MODEL's model sampling was changed ({problem}); the xDiT workers implement "
                       f"HunyuanDiT's own discrete v-prediction schedule only: remove the ModelSampling* node, or "
                       f"use KSampler")


# ------------------------------------------------------------------------------------------ weights
_BASE_IDS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
PREFIX = "diffusion_model."


def model_identity(model) -> str:
    """A cheap identity of the MODEL's diffusion-model weights with patches: the underlying base model
    object (one id per loaded checkpoint, held weakly) plus ComfyUI's patches_uuid, which changes whenever
    patches are added (and is shared by clones with the same patches)."""
    base = model.model
    bid = _BASE_IDS.get(base)
    if bid is None:
        bid = _BASE_IDS[base] = uuid.uuid4().hex
    ident = f"comfy:{bid}"
    if getattr(model, "patches", None):
        ident += f":patches:{model.patches_uuid}"
    return ident


def comfy_patched_keys(model) -> frozenset[str]:
    """The keys (with the 'diffusion_model.' prefix) whose patches ComfyUI applies when it loads the MODEL
    for KSampler: ModelPatcher.load patches the parameters of the modules its `_load_list()` returns, and
    no others (a module that has parameters of its own *and* child modules, such as HunyuanDiT's top level
    with `text_embedding_padding` or the attention pool with `positional_embedding`, is left out, so
    patches of those parameters are never applied). Asking ComfyUI for that list, instead of deciding here,
    keeps every merge node, LoRA and future patch type on KSampler's weights."""
    load_list = getattr(model, "_load_list", None)
    if load_list is None:
        raise JobError("this ComfyUI's ModelPatcher has no _load_list(), which the xDiT sampler uses to apply a "
                       "MODEL's patches exactly as KSampler does; use the ComfyUI version this node pack supports "
                       "(0.3.64 or newer) or update the node pack")
    listed = {f"{name}.{param}" for _, name, _, params in load_list() for param in params}
    return frozenset(k for k in (model.patches or {}) if k.startswith(PREFIX) and k in listed)


class PatchedStateDict(Mapping):
    """The MODEL's diffusion-model weights under canonical names (no 'diffusion_model.' prefix) as KSampler
    runs them: the keys ComfyUI patches (`comfy_patched_keys`) get the MODEL's patches applied, the way
    ModelPatcher.patch_weight_to_device does for a full load: the stored weight (the backup while ComfyUI
    holds the model patched in place) cast to float32 on the MODEL's load device, its convert function,
    comfy.lora.calculate_weight, then ComfyUI's rounding back to the stored dtype. Every other key is the
    stored weight as it is. Computed one key at a time when read; the model itself is never patched or
    moved, so ComfyUI's model management is not disturbed. Pickling materialises a plain dict on the CPU."""

    def __init__(self, model):
        self._model = model
        self._keys = [k[len(PREFIX):] for k in model.model_state_dict(filter_prefix=PREFIX)]
        self._key_set = frozenset(self._keys)
        self._patched = comfy_patched_keys(model) if model.patches else frozenset()

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._key_set

    @property
    def patched(self) -> frozenset[str]:
        """Canonical names of the keys whose value differs from the stored weight."""
        return frozenset(k[len(PREFIX):] for k in self._patched)

    @torch.no_grad()
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._key_set:
            raise KeyError(name)
        full = PREFIX + name
        import comfy.model_patcher as mp  # noqa: PLC0415 - ComfyUI only
        weight, set_func, convert_func = mp.get_key_weight(self._model.model, full)
        backup = self._model.backup.get(full)
        if backup is not None:          # ComfyUI holds the model patched in place: start from the original
            weight = backup.weight
        if full not in self._patched and convert_func is None:
            return weight.detach()
        import comfy.float  # noqa: PLC0415
        import comfy.lora  # noqa: PLC0415
        import comfy.model_management as mm  # noqa: PLC0415
        temp = mm.cast_to_device(weight.detach(), self._model.load_device, torch.float32, copy=True)
        if full not in self._patched:         # a quantised layout: the weight its layer computes with
            return convert_func(temp, inplace=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        temp = comfy.lora.calculate_weight(self._model.patches[full], temp, full)
        seed = mp.string_to_seed(full)
        if set_func is None:
            return comfy.float.stochastic_rounding(temp, weight.dtype, seed=seed)
        # a quantised layout stores the patched weight re-quantised (as LowVramPatch does) and computes with
        # its converted value: the workers get that value in float32 and cast it to their dtype
        stored = set_func(temp, seed=seed, return_weight=True)
        return convert_func(stored.to(torch.float32), inplace=True) if convert_func is not None else stored

    def materialize(self) -> dict[str, torch.Tensor]:
        return {k: self[k].to("cpu") for k in self._keys}

    def __reduce__(self):
        return (dict, (self.materialize(),))


# ------------------------------------------------------------------------------------------ ComfyUI calls
class ComfyBackend:
    """Every call into ComfyUI the sampler node makes. Tests substitute a fake."""

    def noise(self, samples: torch.Tensor, seed: int, batch_index) -> torch.Tensor:
        import comfy.sample  # noqa: PLC0415
        return comfy.sample.prepare_noise(samples, seed, batch_index)

    def sigmas(self, model, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
        import comfy.samplers  # noqa: PLC0415
        # KSampler silently swaps an unknown name for its first one; a linked value was not validated yet
        check_sampler_inputs(steps, 1.0, sampler_name, scheduler, denoise, samplers=(sampler_name,),
                             schedulers=comfy.samplers.KSampler.SCHEDULERS,
                             comfy_samplers=comfy.samplers.KSampler.SAMPLERS)
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

    def progress(self, model, total: int, node_id: str | None) -> "ComfyProgress":
        return ComfyProgress(model, total, node_id)

    def interrupted(self) -> bool:
        import comfy.model_management as mm  # noqa: PLC0415
        return mm.processing_interrupted()

    def raise_interrupted(self) -> None:
        """Raise ComfyUI's own interrupt exception (clearing the flag, as ComfyUI does)."""
        import comfy.model_management as mm  # noqa: PLC0415
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException()

    def get_pool(self, config: PoolConfig):
        from .worker.client import get_pool  # noqa: PLC0415 - started on first use
        return get_pool(config)


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


# ------------------------------------------------------------------------------------------ the sampler
@dataclass
class Prepared:
    """Everything checked before any pool work."""
    samples: torch.Tensor
    model_cfg: HunyuanDiTConfig
    positive: list[CondEntry]
    negative: list[CondEntry]
    engine_sampler: str
    plan: ParallelConfig
    warnings: list[str]
    sigmas: torch.Tensor


def prepare(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
            parallel, *, backend: ComfyBackend, cuda_count: int | None = None) -> Prepared:
    """All input checks, in the order a user fixes them; raises JobError / PlanError."""
    check_sampler_inputs(steps, cfg, sampler_name, scheduler, denoise)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFFFFFFFFFF:
        raise JobError(f"seed must be a whole number from 0 to 2^64-1, got {seed!r}")
    if not isinstance(parallel, RunConfig):
        raise JobError("the 'parallel' input is not an xDiT parallel configuration; connect an xDiT Parallel "
                       "Config node")
    engine_sampler = map_sampler(sampler_name)
    samples = check_latent(latent_image)
    mcfg = check_model(model)
    pos = convert_conditioning(positive, "positive", tuple(samples.shape))
    neg = convert_conditioning(negative, "negative", tuple(samples.shape))
    check_conditioning(pos, "positive", mcfg, samples.shape[0])
    check_conditioning(neg, "negative", mcfg, samples.shape[0])
    sigmas = backend.sigmas(model, steps, sampler_name, scheduler, denoise)
    if not bool(torch.isfinite(sigmas).all()):
        raise JobError(f"scheduler '{scheduler}' gave non-finite sigmas for {steps} steps; choose another scheduler")
    hw = (samples.shape[2], samples.shape[3])
    plan, warnings = parallel.parallel, []
    if len(sigmas) > 1:
        devices = parallel.pool.devices
        plan = resolve(plan, devices, len(parse_devices(devices, cuda_count)), hw, not math.isclose(cfg, 1.0),
                       num_heads=mcfg.num_heads, depth=mcfg.depth, table=load_table(parallel.pool.auto_table))
        warnings = check_job(plan, steps=len(sigmas) - 1, latent_hw=hw, cfg_scale=cfg, patch_size=mcfg.patch_size)
    return Prepared(samples, mcfg, pos, neg, engine_sampler, plan, warnings, sigmas)


def build_job(model, seed: int, cfg: float, latent_image: Mapping, p: Prepared, *,
              backend: ComfyBackend, previews: bool) -> Job:
    # drawn in the LATENT's own dtype, as prepare_noise does for KSampler
    noise = backend.noise(p.samples.to(latent_image["samples"].dtype), seed, latent_image.get("batch_index"))
    step_noises = None
    kind, steps = noise_plan(p.engine_sampler, p.sigmas)
    if kind is not None:
        step_noises = backend.step_noises(model, kind, tuple(p.samples.shape), p.sigmas, seed, steps)
    _check_finite(noise, "the initial noise")
    return Job(weights=backend.weights(model), positive=p.positive, negative=p.negative, latent=p.samples,
               noise=noise.to("cpu", torch.float32).contiguous(), sigmas=p.sigmas, sampler=p.engine_sampler,
               cfg=float(cfg), seed=int(seed), step_noises=step_noises, preview_every=1 if previews else 0,
               job_id=uuid.uuid4().hex[:12])


def format_pool_stats(stats: Mapping) -> str:
    """One log line from PoolClient.last_stats: time per step, weight loads, and each rank's GPU memory
    (allocated / reserved / peak; resident memory for CPU ranks)."""
    if not isinstance(stats, Mapping) or not stats:
        return "no statistics"
    parts = []
    if isinstance(stats.get("job_seconds"), (int, float)):
        parts.append(f"job {stats['job_seconds']:.2f} s")
    steps = stats.get("step_seconds")
    if isinstance(steps, (list, tuple)) and steps:
        parts.append(f"{len(steps)} steps, {sum(steps) / len(steps):.3f} s/step")
    if stats.get("loads") is not None:
        parts.append(f"weight loads {stats['loads']}")
    for i, r in enumerate(stats.get("ranks") or []):
        if not isinstance(r, Mapping):
            continue
        mem = [f"{label} {_gib(r[key])}" for key, label in (("gpu_allocated_bytes", "allocated"),
                                                            ("gpu_reserved_bytes", "reserved"),
                                                            ("gpu_peak_allocated_bytes", "peak"))
               if isinstance(r.get(key), (int, float))]
        if not mem and isinstance(r.get("rss_bytes"), (int, float)):
            mem = [f"RSS {_gib(r['rss_bytes'])}"]
        parts.append(f"rank {i} ({r.get('device', '?')}): {', '.join(mem) or 'no memory figures'}")
    return "; ".join(parts) or "no statistics"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def run_sampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                parallel, *, node_id: str | None = None, backend: ComfyBackend | None = None) -> dict:
    """The sampler node: checks everything, then runs one job on the pool for `parallel`. Returns the
    LATENT dict (a copy of latent_image with new samples, as KSampler returns it)."""
    backend = backend or ComfyBackend()
    p = prepare(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                parallel, backend=backend)
    out = dict(latent_image)
    if len(p.sigmas) <= 1:
        # denoise 0: KSampler returns the input latent untouched (no model call)
        out["samples"] = p.samples
        return out
    for w in p.warnings:
        log.warning("xDiT: %s", w)
    progress = backend.progress(model, len(p.sigmas) - 1, node_id)
    job = build_job(model, seed, cfg, latent_image, p, backend=backend,
                    previews=getattr(progress, "wants_previews", False))
    pool = backend.get_pool(parallel.pool)
    log.info("xDiT: %s, %d steps %s on %s, latent %s", p.engine_sampler, job.steps, p.plan.describe(),
             parallel.pool.devices, tuple(p.samples.shape))
    try:
        samples = pool.run(job, p.plan, on_progress=progress, cancel=backend.interrupted, model_config=p.model_cfg)
    except JobCancelled:
        backend.raise_interrupted()
        raise
    except JobError as e:
        raise JobError(f"the xDiT workers rejected the job: {e}") from e
    except PoolError as e:
        raise PoolError(f"the xDiT worker pool failed: {e} (it is restarted for the next run)") from e
    finally:
        stats = getattr(pool, "last_stats", None)
        if stats:
            log.info("xDiT pool after job %s: %s", job.job_id, format_pool_stats(stats))
    if not _is_tensor(samples) or tuple(samples.shape) != tuple(p.samples.shape):
        raise PoolError(f"the xDiT workers returned {getattr(samples, 'shape', type(samples).__name__)} instead of "
                        f"a latent of shape {tuple(p.samples.shape)}")
    out["samples"] = samples.to("cpu", torch.float32)
    return out
