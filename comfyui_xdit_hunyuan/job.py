"""What one sampling job is: the value the ComfyUI node, the command line and the benchmark build, the
worker pool ships to every rank, and the engine runs. Plain tensors (CPU) and numbers only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import Message

COND_KEYS = ("context", "text_embedding_mask", "encoder_hidden_states_t5", "text_embedding_mask_t5")


class JobError(Message, ValueError):
    """A job that cannot run as given; the message says what to change. Like plan.PlanError, one about an
    input names it (`field`) and writes inputs as {placeholders}, so a front end words it as its own inputs
    (render); a message given alone is a plain sentence, its braces literal.

    >>> e = JobError("{guidance} {value} is not a finite number", field="guidance", value=float("nan"))
    >>> str(e), e.render({"guidance": "--cfg"}), str(JobError("a {literal} brace"))
    ('guidance nan is not a finite number', '--cfg nan is not a finite number', 'a {literal} brace')
    """

    def __init__(self, message: str, field: str | None = None, **values):
        if field is None and not values:
            message = message.replace("{", "{{").replace("}", "}}")
        Message.__init__(self, message, field, **values)
        ValueError.__init__(self, self.render())

    __str__ = Message.__str__


@dataclass
class CondEntry:
    """One conditioning entry, mapped to the model's keyword arguments (ComfyUI's extra_conds)."""
    context: torch.Tensor                     # [1 or B, L_bert, text_dim] float
    text_embedding_mask: torch.Tensor         # [1 or B, L_bert]
    encoder_hidden_states_t5: torch.Tensor    # [1 or B, L_t5, text_dim_t5] float
    text_embedding_mask_t5: torch.Tensor      # [1 or B, L_t5]
    image_meta_size: torch.Tensor | None = None   # [1 or B, 6] pixels: H, W, target H, target W, top, left
    strength: float = 1.0

    def model_kwargs(self) -> dict[str, Any]:
        kw = {k: getattr(self, k) for k in COND_KEYS}
        kw["image_meta_size"] = self.image_meta_size
        return kw

    def batch(self) -> int:
        return self.context.shape[0]

    def shape_key(self) -> tuple:
        """Entries with equal keys can be evaluated in one batched model call (as ComfyUI does)."""
        return tuple(tuple(getattr(self, k).shape[1:]) for k in COND_KEYS) + (self.image_meta_size is None,)


@dataclass
class WeightsRef:
    """Identity of a set of diffusion-model weights and where to get them.

    identity: any string that changes whenever the weights change (file path + mtime, a hash of the
    patches applied, ...). source: a path the workers load from, or an in-memory canonical state dict,
    or "random:<seed>:<preset>" for built-in random weights (demo, benchmark). A state dict may also say,
    per key, which version of the tensor it holds (`version(key)`, equal versions meaning equal values):
    the pool then sends only the tensors the workers do not hold. On its way to the workers the source
    becomes a WeightDelta.
    """
    identity: str
    source: Any = None


@dataclass
class SharedWeights:
    """A whole model handed over in GPU memory: every tensor's bytes in one buffer on the GPU of rank `rank`
    (`handle`: its CUDA IPC handle, torch.multiprocessing's reduce_tensor arguments; `nbytes`: its size),
    `entries`: key -> (byte offset, dtype, shape). The rank on that GPU opens the one handle and copies each
    tensor out device to device in the workers' dtype; the others receive the buffer by one broadcast. No
    file, no copy through the host in the workers, one IPC handle for the whole model.

        >>> w = SharedWeights(handle=None, nbytes=512, entries={"a": (0, torch.float16, (2, 3))})
        >>> w.entries["a"][2]
        (2, 3)
    """
    handle: Any
    nbytes: int
    entries: dict
    rank: int = 0


@dataclass
class WeightDelta:
    """What the workers do to the weights they hold before a job (the pool client decides; worker/weights.py).

    base: load a whole model first, from a path (a checkpoint, or the client's staged file), a "random:"
    source or SharedWeights (the client's GPU memory); None keeps the model held. Then, in this order: `drop` frees kept tensors; `keep` copies the held
    tensor of each key aside under an id (so that a later job can come back to it without a transfer);
    `restore` copies a kept tensor back into a key; `files` are staged safetensors files whose tensors
    replace those keys; `shared` (key -> CUDA IPC handle of the client's tensor) are copied from GPU memory
    by the rank on that GPU (`shared_rank`) and broadcast to the others. Replacements are made in place:
    compiled code and CUDA graphs stay valid.

        >>> d = WeightDelta(base=None, keep={"blocks.0.mlp.fc1.weight": 7}, files=["/dev/shm/x/w-3.safetensors"])
        >>> d.replaces()
        False
    """
    base: Any = None
    drop: list = field(default_factory=list)
    keep: dict = field(default_factory=dict)
    restore: dict = field(default_factory=dict)
    files: list = field(default_factory=list)
    shared: dict = field(default_factory=dict)
    shared_rank: int = 0

    def replaces(self) -> bool:
        """A whole new model (compiled code and CUDA graphs of the old one are then of no use)."""
        return self.base is not None


@dataclass
class Job:
    weights: WeightsRef
    positive: list[CondEntry]
    negative: list[CondEntry]
    latent: torch.Tensor               # [B, 4, h, w] LATENT "samples" (unscaled VAE space), float32
    noise: torch.Tensor                # [B, 4, h, w] initial noise (ComfyUI prepare_noise), float32
    sigmas: torch.Tensor               # [steps + 1] float, descending, last usually 0
    sampler: str = "euler"
    guidance: float = 5.0              # the classifier-free guidance scale (KSampler's and the CLI's cfg)
    seed: int = 0                      # for the noise of ancestral / SDE samplers
    sampler_options: dict = field(default_factory=dict)
    step_noises: list | None = None    # optional per-step noise tensors (e.g. ComfyUI's own noise sampler)
    preview_every: int = 0             # send a small x0 preview every N steps (0: never)
    job_id: str = ""
    # (plan, model config) the job passed checks.validate_job for: the pool does not check it again. Not an
    # init field, so a copy made with dataclasses.replace (another latent, say) is checked anew.
    checked: Any = field(default=None, init=False, compare=False, repr=False)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def uses_uncond(self) -> bool:
        """ComfyUI skips the unconditional pass when the guidance scale (its cfg) is 1."""
        return not math.isclose(self.guidance, 1.0)


class JobCancelled(Exception):
    """The job was cancelled between steps; every rank stopped at the same step, the pool stays warm."""


class PoolError(RuntimeError):
    """The worker pool failed (a worker died, hung, or raised); the message carries the worker's words.
    The pool is restarted for the next job."""
