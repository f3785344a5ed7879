"""The MODEL's diffusion-model weights as KSampler runs them, and their identity (what the pool caches by)."""
from __future__ import annotations

import uuid
import weakref
from collections.abc import Mapping
from typing import Any, Hashable, Iterator

import torch

from ..job import JobError

_BASE_IDS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
PREFIX = "diffusion_model."


class _Same:
    """An object by identity while it lives: equal only to a token of the same living object (a tensor also in
    the same in-place version); a dead one equals nothing, so an id reused by a new object never matches."""
    __slots__ = ("_ref", "_id", "_ver")

    def __init__(self, obj):
        try:
            self._ref = weakref.ref(obj)
        except TypeError:                      # not weak-referenceable: held (a small object of a patch)
            self._ref = lambda obj=obj: obj
        self._id, self._ver = id(obj), _version(obj)

    def __eq__(self, other) -> bool:
        if not isinstance(other, _Same) or (self._id, self._ver) != (other._id, other._ver):
            return False
        mine = self._ref()
        return mine is not None and mine is other._ref()

    def __hash__(self) -> int:
        return hash((self._id, self._ver))


def _version(obj) -> int | None:
    """A tensor's in-place version counter; None for other objects and for inference tensors (made under
    torch.inference_mode, as ComfyUI runs its nodes: they have no counter, and are told apart by identity)."""
    try:
        return obj._version
    except (AttributeError, RuntimeError):
        return None


def signature(obj) -> Hashable:
    """A comparable description of a ComfyUI patch list (strengths, offsets, adapters, tensors)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (tuple, list)):
        return tuple(signature(x) for x in obj)
    if isinstance(obj, (set, frozenset)) and all(isinstance(x, str) for x in obj):
        return frozenset(obj)
    weights = getattr(obj, "weights", None)
    if isinstance(weights, (tuple, list)):      # a comfy.weight_adapter (LoRA, LoHa, ...): its tensors decide
        return (type(obj).__qualname__, signature(weights), signature(getattr(obj, "loaded_keys", None)))
    return _Same(obj)                           # a tensor, a function, anything else: by identity


def base_id(base) -> str:
    """One id per loaded base model object (held weakly)."""
    bid = _BASE_IDS.get(base)
    if bid is None:
        bid = _BASE_IDS[base] = uuid.uuid4().hex
    return bid


def model_identity(model) -> str:
    """A cheap identity of the MODEL's diffusion-model weights with patches: the underlying base model
    object (one id per loaded checkpoint, held weakly) plus ComfyUI's patches_uuid, which changes whenever
    patches are added (and is shared by clones with the same patches)."""
    ident = f"comfy:{base_id(model.model)}"
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

    def version(self, name: str) -> Hashable:
        """Which tensor `self[name]` is, cheaply (no tensor math): equal versions mean equal tensors, so the
        pool sends only keys whose version the workers do not hold. A stored key is its base model's; a
        patched key adds its patches: their numbers, and their tensors by identity and in-place version."""
        if name not in self._key_set:
            raise KeyError(name)
        base = base_id(self._model.model)
        full = PREFIX + name
        if full not in self._patched:
            return ("stored", base, name)
        return ("patched", base, name, signature(self._model.patches[full]))

    def materialize(self) -> dict[str, torch.Tensor]:
        return {k: self[k].to("cpu") for k in self._keys}

    def __reduce__(self):
        return (dict, (self.materialize(),))
