"""How the parallel code communicates: one `Collectives` object per mesh (`Mesh.comm`), through which
sequence.py, steps.py and runner.py reach every collective and point-to-point transfer they make.

- `TORCH` (the default): torch.distributed itself. Its attributes ARE torch.distributed's functions (no
  wrapper), so `mesh.comm.all_gather(...)` costs one attribute lookup more than `dist.all_gather(...)`.
- `LocalStandIn`: no communication, for running one rank's share of a plan alone on one device
  (`mesh.standin_mesh`, bench/floors.py). Every call fills its outputs with tensors of the right shapes and
  dtypes on the same device, with about the memory traffic the real call has on that rank (its outputs
  written once), and returns at once:
  all_gather: every slot gets a copy of the local input (the local slot is exact, the others stand-ins);
  all_to_all_single: output segment i gets input segment i (cut or zero-filled to its size): exact for this
  rank's own segment, a copy of local data elsewhere; all_reduce: unchanged (exact when all ranks agree);
  isend / send: nothing; irecv / recv: zeros. So shapes, token counts and heads are a real rank's, values
  are not (except where a call is exact, e.g. a plan without collectives).

Worked example, Ulysses 2, the all-to-all before attention on rank 0, whose send buffer is
[my tokens, heads 0-7 | my tokens, heads 8-15] (segment i goes to rank i): rank 0 really receives
[my tokens, heads 0-7 | rank 1's tokens, heads 0-7]; the stand-in gives it [my tokens, heads 0-7 | my tokens,
heads 8-15]: the same shapes (all tokens, 8 heads), the first half exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


class TorchCollectives:
    """torch.distributed, attribute for attribute (same signatures, same Work objects)."""
    all_to_all_single = staticmethod(dist.all_to_all_single)
    all_gather = staticmethod(dist.all_gather)
    all_reduce = staticmethod(dist.all_reduce)
    isend = staticmethod(dist.isend)
    irecv = staticmethod(dist.irecv)
    send = staticmethod(dist.send)
    recv = staticmethod(dist.recv)


TORCH = TorchCollectives()


@dataclass(frozen=True)
class LocalGroup:
    """A stand-in process group: which mesh axis (or flow) it is, its size and this rank's place in it."""
    name: str
    size: int
    rank: int


class Done:
    """A finished Work (what async stand-in calls return)."""

    @staticmethod
    def wait(*_args, **_kwargs) -> bool:
        return True

    @staticmethod
    def is_completed() -> bool:
        return True


DONE = Done()


class LocalStandIn:
    """Collectives that communicate nothing (see the module docstring for what each call writes)."""

    @staticmethod
    def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_split_sizes=None,  # noqa: A002
                          input_split_sizes=None, group=None, async_op: bool = False):
        n = _size(group)
        outs = _segments(output, output_split_sizes, n)
        ins = _segments(input, input_split_sizes, n)
        if all(o.shape == i.shape for o, i in zip(outs, ins)):
            output.copy_(input)
        else:
            for o, i in zip(outs, ins):
                k = min(o.shape[0], i.shape[0])
                o[:k].copy_(i[:k])
                o[k:].zero_()
        return DONE if async_op else None

    @staticmethod
    def all_gather(tensor_list: list[torch.Tensor], tensor: torch.Tensor, group=None, async_op: bool = False):
        if len(tensor_list) != _size(group):
            raise ValueError(f"all_gather into {len(tensor_list)} tensors on a group of {_size(group)}")
        for t in tensor_list:
            t.copy_(tensor)
        return DONE if async_op else None

    @staticmethod
    def all_reduce(tensor: torch.Tensor, op=None, group=None, async_op: bool = False):
        return DONE if async_op else None

    @staticmethod
    def isend(tensor: torch.Tensor, dst: int, group=None, tag: int = 0):
        return DONE

    @staticmethod
    def irecv(tensor: torch.Tensor, src: int | None = None, group=None, tag: int = 0):
        tensor.zero_()
        return DONE

    @staticmethod
    def send(tensor: torch.Tensor, dst: int, group=None, tag: int = 0) -> None:
        return None

    @staticmethod
    def recv(tensor: torch.Tensor, src: int | None = None, group=None, tag: int = 0) -> int:
        tensor.zero_()
        return -1 if src is None else src


def _size(group) -> int:
    if not isinstance(group, LocalGroup):
        raise TypeError(f"the stand-in collectives take stand-in groups (mesh.standin_mesh), got {group!r}")
    return group.size


def _segments(flat: torch.Tensor, splits, n: int) -> list[torch.Tensor]:
    if splits is None or len(splits) == 0:
        splits = [flat.shape[0] // n] * n
    if len(splits) != n or sum(splits) != flat.shape[0]:
        raise ValueError(f"all_to_all split sizes {list(splits)} for {flat.shape[0]} rows on a group of {n}")
    return list(flat.split(list(splits)))
