"""The pool client's record of the weights its workers hold, and the transfer that takes them to a job's
weights: only the tensors that differ.

A job's WeightsRef becomes a WeightDelta (comfyui_xdit_hunyuan.job) for the workers:
- a path or "random:" source is loaded whole when its identity is not the one held;
- a state dict is compared key by key with what the workers hold, by version: the source's own
  `version(key)` when it has one (the ComfyUI adapter's PatchedStateDict: equal versions, equal tensors),
  else (identity, key). The first one, or one with other keys, is staged whole; after that only the keys
  whose version differs travel: copied back from what the workers kept aside when they hold it, else shared
  from the client's GPU memory (CUDA IPC, where a worker runs on the GPU that holds them: no copy through the
  host) or written to one staged file.
- before a key is replaced, the workers keep its tensor aside (within `keep_bytes`, least recently used
  first out), so that going back to a model held recently (a LoRA removed, a strength changed back) costs no
  transfer.

    >>> t = HeldWeights(keep_bytes=1 << 20, itemsize=4)
    >>> stage = lambda tensors, whole=False: f"staged:{sorted(tensors)}" if whole else Staged(files=[f"staged:{sorted(tensors)}"])
    >>> src = Versioned({"a": torch.zeros(2), "b": torch.ones(2)}, {"a": 1, "b": 1})
    >>> d = t.plan(WeightsRef("m", src), stage)
    >>> d.base, t.commit()
    ("staged:['a', 'b']", None)
    >>> src = Versioned({"a": torch.zeros(2), "b": 2 * torch.ones(2)}, {"a": 1, "b": 2})
    >>> d = t.plan(WeightsRef("m+lora", src), stage)
    >>> d.base, d.files, list(d.keep), t.counts["sent"]
    (None, ["staged:['b']"], ['b'], 1)
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping

import torch

from ..job import JobError, SharedWeights, WeightDelta, WeightsRef

@dataclass
class Staged:
    """Where staged tensors are for the workers: safetensors files, and tensors shared from GPU memory
    (key -> what WeightDelta.shared holds)."""
    files: list = field(default_factory=list)
    shared: dict = field(default_factory=dict)
    shared_rank: int = 0


Stage = Callable[..., Staged]     # stage(tensors): Staged; stage(tensors, whole=True): a file path or SharedWeights


class Versioned(dict):
    """A state dict that names the version of each tensor (tests, and the doctest above)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], versions: Mapping[str, Hashable]):
        super().__init__(tensors)
        self._versions = dict(versions)

    def version(self, key: str) -> Hashable:
        return self._versions[key]


@dataclass
class _Pending:
    """The plan of the job in flight, applied to the record once the workers hold it."""
    identity: str
    held: dict | None
    kept: "OrderedDict[tuple, tuple[int, int]]"
    shapes: dict


@dataclass
class HeldWeights:
    keep_bytes: int                  # what the workers may keep aside (per rank)
    itemsize: int                    # bytes per element in the workers' dtype
    identity: str | None = None      # what the workers hold (None: nothing known)
    held: dict | None = None         # key -> version, for state-dict sources
    kept: "OrderedDict[tuple, tuple[int, int]]" = field(default_factory=OrderedDict)  # (key, version) -> (id, bytes)
    shapes: dict = field(default_factory=dict)        # key -> shape of the tensor held
    counts: dict = field(default_factory=dict)
    _next_id: int = 0
    _pending: _Pending | None = None

    def forget(self) -> None:
        """The workers' weights are unknown (a new pool, a failed job): the next job loads whole."""
        self.identity, self.held, self.kept, self._pending = None, None, OrderedDict(), None

    def plan(self, ref: WeightsRef, stage: Stage) -> WeightDelta:
        """The transfer that gives the workers `ref`'s weights (staging what must travel). The record changes
        only when commit() says the workers got it."""
        source = ref.source
        self.counts = {"whole": False, "sent": 0, "sent_bytes": 0, "restored": 0, "unchanged": 0}
        if isinstance(source, Mapping):
            return self._plan_state_dict(ref.identity, source, stage)
        if ref.identity == self.identity and self.held is None:
            self._pending = _Pending(ref.identity, None, self.kept, self.shapes)
            return WeightDelta()
        if source is None:
            raise JobError(f"the weights '{ref.identity}' are not loaded in the pool and the job gives no "
                           f"source; pass a file path, a state dict or 'random:<seed>:<preset>'")
        if not isinstance(source, (str, os.PathLike)):
            raise JobError(f"a weights source of type {type(source).__name__} is not supported; pass a file "
                           f"path, a state dict of tensors or 'random:<seed>:<preset>'")
        self.counts["whole"] = True
        self._pending = _Pending(ref.identity, None, OrderedDict(), {})
        return WeightDelta(base=os.fspath(source))

    def _plan_state_dict(self, identity: str, source: Mapping, stage: Stage) -> WeightDelta:
        version = getattr(source, "version", None)
        versions = {k: (version(k) if version is not None else (identity, k)) for k in source}
        for name in versions:
            if not isinstance(name, str):
                raise JobError(f"the weights state dict has a key {name!r} that is not a string")
        if self.held is None or self.held.keys() != versions.keys():
            return self._whole(identity, source, versions, stage)
        kept = OrderedDict(self.kept)
        delta, send = WeightDelta(), {}
        for key, v in versions.items():
            old = self.held[key]
            if old == v:
                self.counts["unchanged"] += 1
                continue
            if (key, old) not in kept:
                kept[(key, old)] = (self._new_id(), math.prod(self.shapes[key]) * self.itemsize)
                delta.keep[key] = kept[(key, old)][0]
            if (key, v) in kept:
                delta.restore[key] = kept[(key, v)][0]
                kept.move_to_end((key, v))
                self.counts["restored"] += 1
            else:
                send[key] = _tensor(source, key)
                if tuple(send[key].shape) != self.shapes[key]:    # another architecture: a new model
                    return self._whole(identity, source, versions, stage)
        while kept and sum(b for _, b in kept.values()) > self.keep_bytes:   # least recently used out
            (key, v), (vid, _) = kept.popitem(last=False)
            if delta.keep.get(key) == vid:
                del delta.keep[key]                   # never kept: it does not fit
            else:
                delta.drop.append(vid)
            if delta.restore.get(key) == vid:        # needed now: send it instead
                del delta.restore[key]
                self.counts["restored"] -= 1
                send[key] = _tensor(source, key)
        if send:
            staged = stage(send)
            delta.files, delta.shared, delta.shared_rank = staged.files, staged.shared, staged.shared_rank
            self.counts.update(sent=len(send), sent_bytes=sum(_nbytes(t) for t in send.values()),
                               shared=len(staged.shared))
        self._pending = _Pending(identity, versions, kept, self.shapes)
        return delta

    def _whole(self, identity: str, source: Mapping, versions: dict, stage: Stage) -> WeightDelta:
        tensors = {k: _tensor(source, k) for k in versions}
        self.counts.update(whole=True, sent=len(tensors), sent_bytes=sum(_nbytes(t) for t in tensors.values()),
                           restored=0, unchanged=0)
        self._pending = _Pending(identity, versions, OrderedDict(), {k: tuple(t.shape) for k, t in tensors.items()})
        base = stage(tensors, whole=True)
        self.counts["shared"] = len(tensors) if isinstance(base, SharedWeights) else 0
        return WeightDelta(base=base)

    def commit(self) -> None:
        """The workers hold the planned weights."""
        p, self._pending = self._pending, None
        if p is not None:
            self.identity, self.held, self.kept, self.shapes = p.identity, p.held, p.kept, p.shapes

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id


def _tensor(source: Mapping, key: str) -> torch.Tensor:
    value = source[key]
    if not isinstance(value, torch.Tensor):
        raise JobError(f"the weights state dict entry '{key}' is a {type(value).__name__}, not a tensor; pass only "
                       f"tensors")
    return value


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
