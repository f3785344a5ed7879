"""The two nodes' identities and inputs, declared once: nodes.py builds ComfyUI's schema from these specs,
the config node checks the declared ranges, and the tests compare them with the example workflows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import DTYPES
from ..model.attention import BACKENDS
from ..plan import STRATEGIES

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
        "Precision of the workers' weights and activations. auto = the dtype ComfyUI chose for the MODEL, "
        "i.e. what KSampler computes in (fp16 on most GPUs, fp32 on the CPU), so the result follows "
        "KSampler's most closely. bf16 has fp32's range (use it if a model overflows in fp16); fp32 is "
        "several times slower and needs twice the memory. Changing it restarts the pool.")),
    InputSpec("compile", "BOOLEAN", default=False, tooltip=(
        "torch.compile the transformer blocks in every GPU worker. Off by default: on one H200 the eager "
        "steps (CUDA graphs, fused kernels) measured as fast as compiled ones at 1024^2 and within 2 % at "
        "2048^2, for every plan, and they start at once. On: a new pool's first images run eager while a "
        "helper process compiles into the compile cache; the next image compiles from it (a few seconds), "
        "other sizes do not compile again, and a restarted pool reuses the cache. Where it cannot compile (no "
        "Triton) the workers run eager and log why. CPU workers always run eager. Changing it restarts the "
        "pool.")),
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


# The engine's input names (the `field` and {placeholders} of its messages: plan.Message, PlanError, JobError)
# that are not these nodes' input names: the engine's `guidance` is KSampler's (and this sampler's) `cfg`. The
# others (steps, seed, cfg_degree, ...) are the nodes' own names.
ENGINE_NAMES = {"guidance": "cfg"}


def in_input_words(message) -> str:
    """An engine message in these nodes' input names; other text as it is."""
    render = getattr(message, "render", None)
    return render(ENGINE_NAMES) if render is not None else str(message)
