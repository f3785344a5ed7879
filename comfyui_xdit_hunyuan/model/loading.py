"""Load HunyuanDiT diffusion-model weights from every layout users have, and write them in each.

Sources: a ComfyUI full checkpoint (`model.diffusion_model.*`; text encoders and VAE ignored), a bare
diffusion-model safetensors, an original `.pt` (optionally wrapped in "ema" / "module" or prefixed
`ema.` / `module.`), a diffusers `transformer/` directory or the model directory holding it (single or
sharded safetensors), a diffusers-named safetensors file, or an in-memory state dict of any of these.

A source is checked completely -- layout, config, every tensor's name and shape -- from safetensors
headers (or the pickle's metadata) before any tensor data is read, so bad files fail fast and cheaply.
Tensors are then read (memory-mapped), converted and moved one transformer block at a time: the whole
model never exists twice in host memory.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import HunyuanDiTConfig, NotHunyuanDiTError
from .hunyuandit import HunyuanDiT
from .layouts import (COMFY_PREFIX, canonical_to_diffusers, diffusers_config, diffusers_to_canonical,
                      is_diffusers_layout)

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
LAYOUTS = ("comfyui", "bare", "original_pt", "diffusers")

_PT_WRAPPERS = ("ema", "module")            # original .pt: {"ema": state_dict}, checked in this order
_KEY_PREFIXES = ("ema.", "module.")         # ... or every name under one of these
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# a name fragment -> what a file holding it probably is (for the "not HunyuanDiT" message)
_FAMILIES = (
    ("conditioner.embedders.", "an SDXL checkpoint"),
    ("input_blocks.", "a Stable Diffusion UNet checkpoint (SD 1.x / 2.x / SDXL)"),
    ("joint_blocks.", "a Stable Diffusion 3 checkpoint"),
    ("double_blocks.", "a Flux checkpoint"),
    ("transformer_blocks.", "a diffusers transformer of another model (PixArt, SD3, Flux, ...)"),
    ("down_blocks.", "a diffusers UNet or VAE"),
    ("decoder.up.", "a VAE"),
    ("lora_", "a LoRA"),
    ("text_model.", "a CLIP text encoder"),
    ("encoder.block.", "a T5 text encoder"),
)


class CheckpointError(ValueError):
    """A weights source that cannot be read as given: missing path, unknown file type, unsafe pickle."""


@dataclass
class _Tensors:
    """The tensors of one source by stored name: shapes known up front, data read on demand.

    `from_file`: tensors read are views of a memory-mapped file. They are always copied on loading, so
    that the model owns aligned memory (CPU kernels round differently on misaligned data) and does not
    change if the file does.
    """
    where: str
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], torch.Tensor]
    from_file: bool


@dataclass
class _Plan:
    """A source checked against the model it describes, before any tensor data is read."""
    tensors: _Tensors
    stored: dict[str, str]      # stored name by name with wrappers / ComfyUI prefix removed
    diffusers: bool
    cfg: HunyuanDiTConfig
    info: str


# ------------------------------------------------------------------------------------------ public
def inspect_source(source: Source) -> HunyuanDiTConfig:
    """The config of the HunyuanDiT in `source`, after checking every tensor's name and shape.

    Reads only safetensors headers (or a pickle's metadata, its tensors memory-mapped): cheap enough to
    reject a bad file before any worker starts. Raises NotHunyuanDiTError / CheckpointError.
    """
    with ExitStack() as stack:
        return _plan(source, stack).cfg


def load_state_dict(source: Source, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, torch.Tensor], HunyuanDiTConfig, str]:
    """(canonical state dict, config, one-line description) of the HunyuanDiT in `source`.

    Tensors are converted to `dtype` (None: as stored) and moved to `device` as they are read; tensors
    of an in-memory source that are already in that dtype and on that device are shared, not copied.
    """
    with ExitStack() as stack:
        plan = _plan(source, stack)
        copy = plan.tensors.from_file
        if torch.device(device).type == "cuda" and copy:
            sd = dict(_to_gpu(_read_canonical(plan), torch.device(device), dtype))
        else:
            sd = {name: t.to(device=device, dtype=dtype, copy=copy) for name, t in _read_canonical(plan)}
    return sd, plan.cfg, plan.info


def _to_gpu(pairs, device: torch.device, dtype: torch.dtype | None, chunk: int = 64 << 20):
    """(name, GPU tensor) for (name, file-backed CPU tensor): through two pinned bounce buffers, so the host
    copies one tensor while the previous one is in flight (a pageable copy of memory-mapped data goes at a
    fraction of the bus's speed)."""
    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done = [None, None]
    stream = torch.cuda.Stream(device)
    for i, (name, t) in enumerate(pairs):
        if t.numel() * t.element_size() > chunk or not t.is_contiguous():
            yield name, t.to(device=device, dtype=dtype, copy=True)
            continue
        b = i % 2
        if done[b] is not None:
            done[b].synchronize()                 # its last copy has left the buffer
        staged = buffers[b][: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        staged.copy_(t)
        with torch.cuda.stream(stream):
            out = torch.empty(t.shape, dtype=t.dtype, device=device)
            out.copy_(staged, non_blocking=True)
            done[b] = torch.cuda.Event()
            done[b].record(stream)
        if dtype is not None and dtype != t.dtype:
            with torch.cuda.stream(stream):
                out = out.to(dtype)
        out.record_stream(torch.cuda.current_stream(device))
        yield name, out
    stream.synchronize()


def load_model(source: Source, *, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> HunyuanDiT:
    """A HunyuanDiT (eval mode, no grad) holding the weights of `source` in `dtype` on `device`.

    The module is built on the meta device and takes the loaded tensors as its parameters, so no
    randomly initialised copy is ever allocated.
    """
    sd, cfg, _ = load_state_dict(source, dtype=dtype, device=device)
    model = HunyuanDiT(cfg, device="meta")
    model.load_state_dict(sd, assign=True)
    return model.eval().requires_grad_(False)


def save_checkpoint(weights: HunyuanDiT | Mapping[str, torch.Tensor], path: str | os.PathLike,
                    layout: str) -> Path:
    """Write canonical weights (a HunyuanDiT or its state dict) at `path` in one of LAYOUTS.

    comfyui: one safetensors, names under `model.diffusion_model.` plus a few placeholder text-encoder
    and VAE tensors (as in a real full checkpoint, which loaders must ignore); bare: one safetensors;
    original_pt: torch.save({"ema": state_dict}); diffusers: a directory with config.json and
    diffusion_pytorch_model.safetensors.
    """
    sd = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    path = Path(path)
    if layout == "comfyui":
        extras = {name: torch.zeros(2, 2) for name in (
            "text_encoders.hydit_clip.transformer.embeddings.word_embeddings.weight",
            "text_encoders.mt5xl.transformer.shared.weight", "vae.decoder.conv_in.weight")}
        save_file({**{COMFY_PREFIX + k: v for k, v in sd.items()}, **extras}, path, {"format": "pt"})
    elif layout == "bare":
        save_file(sd, path, {"format": "pt"})
    elif layout == "original_pt":
        torch.save({"ema": sd}, path)
    elif layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": "HunyuanDiT2DModel", **diffusers_config(HunyuanDiTConfig.from_state_dict(sd))}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        save_file(canonical_to_diffusers(sd), path / DIFFUSERS_WEIGHTS, {"format": "pt"})
    else:
        raise ValueError(f"unknown checkpoint layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
    return path


# ------------------------------------------------------------------------------ opening sources
def _open(source: Source, stack: ExitStack) -> _Tensors:
    if isinstance(source, Mapping):
        return _from_state_dict(source, "in-memory state dict", from_file=False)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"expected a checkpoint path or a state dict, got a {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist: give the path of a .safetensors / .pt "
                              f"file or of a diffusers HunyuanDiT directory")
    if path.is_dir():
        return _open_diffusers_dir(path, stack)
    ext = path.suffix.lower()
    if ext in SAFETENSORS_EXTENSIONS:
        return _open_safetensors([path], f"'{path}'", stack)
    if ext in PICKLE_EXTENSIONS:
        return _from_state_dict(_torch_load(path), f"'{path}'", from_file=True)
    raise CheckpointError(f"'{path}' has an unknown checkpoint extension '{ext}': expected "
                          f"{' / '.join(SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS)} or a diffusers directory")


def _open_diffusers_dir(path: Path, stack: ExitStack) -> _Tensors:
    root = path / "transformer" if (path / "transformer").is_dir() else path
    index = root / f"{DIFFUSERS_WEIGHTS}.index.json"
    if index.is_file():
        files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard '{f}' named in '{index}' is missing: download it again")
        return _open_safetensors(files, f"'{root}'", stack)
    if (root / DIFFUSERS_WEIGHTS).is_file():
        return _open_safetensors([root / DIFFUSERS_WEIGHTS], f"'{root}'", stack)
    found = sorted(os.listdir(root))
    raise CheckpointError(
        f"directory '{path}' holds no HunyuanDiT weights: expected a diffusers model directory with "
        f"transformer/, or a transformer directory with {DIFFUSERS_WEIGHTS} (or {index.name}); "
        f"found {_names(found) if found else 'nothing'}")


def _open_safetensors(files: list[Path], where: str, stack: ExitStack) -> _Tensors:
    shapes, file_of = {}, {}
    for f in files:
        for name, shape in _safetensors_shapes(f).items():
            shapes[name], file_of[name] = shape, f
    handles: dict[Path, object] = {}

    def read(name: str) -> torch.Tensor:
        f = file_of[name]
        try:
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(f, framework="pt", device="cpu"))
            return handles[f].get_tensor(name)
        except SafetensorError as e:
            raise NotHunyuanDiTError(f"'{f}' is truncated or damaged ({e}): re-download it") from None

    return _Tensors(where, shapes, read, from_file=True)


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, after checking that the file is as long as the header
    says (a truncated download is caught here, without reading tensor data)."""
    damaged = f"'{path}' is truncated or damaged (not a complete safetensors file): re-download it"
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or not 0 < n <= size - 8:
            raise NotHunyuanDiTError(damaged)
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            shapes = {name: tuple(e["shape"]) for name, e in header.items()}
            end = max((e["data_offsets"][1] for e in header.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise NotHunyuanDiTError(damaged) from None
    if 8 + n + end > size:
        raise NotHunyuanDiTError(f"'{path}' is truncated ({size} bytes, its header describes {8 + n + end}): "
                                 f"re-download it")
    return shapes


def _torch_load(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"'{path}' holds Python objects besides tensors, which are not unpickled for safety: save "
                f"only the state dict (torch.save(model.state_dict(), path)) or convert it to .safetensors"
            ) from None
        raise NotHunyuanDiTError(f"'{path}' is truncated or damaged ({e}): re-download it") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise NotHunyuanDiTError(f"'{path}' is truncated or damaged ({e}): re-download it") from None


def _from_state_dict(obj: object, where: str, from_file: bool) -> _Tensors:
    """The tensors of a state dict, unwrapping {"ema": ...} / {"module": ...}; other entries ignored."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, expected a state dict (names -> tensors)")
    for key in _PT_WRAPPERS:
        if isinstance(obj.get(key), Mapping):
            return _from_state_dict(obj[key], where, from_file)
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return _Tensors(where, {k: tuple(v.shape) for k, v in sd.items()}, sd.__getitem__, from_file)


# ------------------------------------------------------------------------- layout and checking
def _plan(source: Source, stack: ExitStack) -> _Plan:
    t = _open(source, stack)
    stored, layout = _strip_prefixes(t.shapes)
    diffusers = is_diffusers_layout(stored)
    meta = {name: torch.empty(t.shapes[raw], device="meta") for name, raw in stored.items()}
    try:
        canon = diffusers_to_canonical(meta) if diffusers else meta
    except KeyError as e:
        raise NotHunyuanDiTError(f"{t.where}: {e.args[0]}") from None
    if "x_embedder.proj.weight" not in canon:
        raise NotHunyuanDiTError(_not_hunyuan_message(t))
    shapes = {k: tuple(v.shape) for k, v in canon.items()}
    try:
        cfg = HunyuanDiTConfig.from_state_dict(canon)
        _check_shapes(cfg, shapes)
    except NotHunyuanDiTError as e:
        raise NotHunyuanDiTError(f"{t.where}: {e}") from None
    layout = "diffusers names" if diffusers else layout
    params = sum(math.prod(s) for s in shapes.values())
    info = (f"{t.where} ({layout}, {len(stored)} tensors): HunyuanDiT {cfg.version}, depth {cfg.depth}, "
            f"hidden {cfg.hidden_size}, {cfg.num_heads} heads, {params / 1e6:.1f}M parameters")
    return _Plan(t, stored, diffusers, cfg, info)


def _strip_prefixes(names) -> tuple[dict[str, str], str]:
    """(stored name by model-level name, description): ComfyUI's prefix selects the diffusion model of
    a full checkpoint; `ema.` / `module.` wrappers around every name are removed."""
    comfy = {n[len(COMFY_PREFIX):]: n for n in names if n.startswith(COMFY_PREFIX)}
    if comfy:
        return comfy, f"ComfyUI checkpoint, {len(names) - len(comfy)} text-encoder/VAE tensors ignored"
    stored, removed = {n: n for n in names}, ""
    for prefix in _KEY_PREFIXES:
        if stored and all(n.startswith(prefix) for n in stored):
            stored = {n[len(prefix):]: raw for n, raw in stored.items()}
            removed += prefix
    return stored, "ComfyUI/original names" + (f", prefix '{removed}' removed" if removed else "")


def _not_hunyuan_message(t: _Tensors) -> str:
    guess = next((f"; it looks like {family}" for frag, family in _FAMILIES
                  if any(frag in name for name in t.shapes)), "")
    return (f"{t.where} is not a HunyuanDiT diffusion model: expected tensors such as 'x_embedder.proj.weight' "
            f"and 'blocks.0.attn1.Wqkv.weight' (bare or under '{COMFY_PREFIX}') or diffusers' "
            f"'pos_embed.proj.weight' and 'time_extra_emb.*', but found {len(t.shapes)} tensors"
            f"{' such as ' + _names(sorted(t.shapes), 4) if t.shapes else ''}{guess}. "
            f"Choose a HunyuanDiT checkpoint (hunyuan_dit_1.2.safetensors, HunyuanDiT-v1.2-Diffusers, ...).")


def _check_shapes(cfg: HunyuanDiTConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor the model built from `cfg` has, with its shape, and nothing else."""
    expected = {k: tuple(v.shape) for k, v in HunyuanDiT(cfg, device="meta").state_dict().items()}
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"'{k}' should be {list(s)} but is {list(shapes[k])}"
             for k, s in expected.items() if k in shapes and shapes[k] != s]
    problems = []
    if missing:
        problems.append(f"missing tensors {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_names(unexpected)}")
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        problems.append(f"wrong shapes: {'; '.join(wrong[:5])}{more}")
    if problems:
        raise NotHunyuanDiTError(
            f"the weights do not fit a HunyuanDiT {cfg.version} of depth {cfg.depth} and hidden size "
            f"{cfg.hidden_size} (detected from them): {'; '.join(problems)}. The file is damaged or edited, "
            f"or not HunyuanDiT: re-download or re-export it")


def _names(names: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def _read_canonical(plan: _Plan) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical (name, tensor) pairs, reading the stored tensors one transformer block at a time."""
    groups: dict[str, list[str]] = {}
    for name in plan.stored:
        m = _BLOCK.match(name)
        groups.setdefault(m.group(1) if m else "", []).append(name)
    for names in groups.values():
        part = {name: plan.tensors.read(plan.stored[name]) for name in names}
        yield from (diffusers_to_canonical(part) if plan.diffusers else part).items()
