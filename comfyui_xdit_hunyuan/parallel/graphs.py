"""CUDA graphs of whole model evaluations, for ranks that run the whole model per evaluation (no PipeFusion):
one GPU and CFG parallel, and Ulysses / Ring, whose collectives are then recorded into the graph.

At batch 1 (a CFG-parallel rank), with sequence parallelism, or at small sizes the GPU finishes a step's
~1,500 kernels faster than Python launches them; replaying one recorded graph per step makes the step
GPU-bound. The graphed function is the very function the plain path calls, on fixed buffers:
- per-step inputs (the scaled latent, the timestep) are copied into the graph's buffers at every step;
- per-job inputs (pooled text vector, every block's text K/V) are copied once when a new job uses the graph;
- the first call for a shape runs the function outside any graph (compilation, kernel selection, and the
  step's result); the second records the graph; later calls (this job and every later job of the same
  shape) replay it.
The outputs live in the graph's memory: they are valid until the next call with the same key, which is how
the sampling loop uses them (consumed within the step).

A graph holds the addresses of the weights and of everything it reads: the cache is cleared whenever the
weights change, and each entry keeps the tensors it reads (RoPE tables) alive.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

log = logging.getLogger("comfyui_xdit_hunyuan")

def graphs_mode(device: torch.device, setting: str = "all", compile_mode: str | None = None) -> str | None:
    """What config.PoolConfig.cuda_graphs gives on `device`: None (no graphs: CPU devices, "off", or
    torch.compile's own graphs requested with compile_mode "reduce-overhead", which would nest), "local" (only
    model calls without collectives: one GPU, CFG parallel) or "all" (Ulysses / Ring too)."""
    if device.type != "cuda" or setting == "off" or "reduce-overhead" in (compile_mode or ""):
        return None
    return "local" if setting == "local" else "all"


class CudaRecorder:
    """Records with torch.cuda.CUDAGraph (each graph in its own memory pool)."""

    def record(self, fn: Callable, args: Sequence[torch.Tensor]):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*args)
        return graph.replay, out


@dataclass
class _Entry:
    step_in: list[torch.Tensor]
    job_in: list[torch.Tensor]
    keep: tuple = ()
    replay: Callable | None = None
    out: object = None
    failed: bool = False
    job: object = None
    calls: int = 0
    replays: int = 0


class GraphCache:
    """Graphs of one function family, keyed by everything that fixes the recorded work (shapes, dtypes,
    strides, call layout). Least recently used entries beyond `max_entries` are dropped (their memory goes
    back to the allocator)."""

    def __init__(self, recorder=None, max_entries: int = 3, collectives: bool = True):
        self.recorder = recorder or CudaRecorder()
        self.collectives = collectives      # also graph model calls that communicate (Ulysses, Ring)
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()
        self.captures = 0
        self.failures = 0
        self._job_signature: tuple = (None, None)   # (job, signature of its per-job inputs)

    def clear(self) -> None:
        self.entries.clear()

    @staticmethod
    def signature(tensors: Sequence[torch.Tensor]) -> tuple:
        return tuple((tuple(t.shape), t.dtype, tuple(t.stride()), str(t.device)) for t in tensors)

    def __call__(self, key: tuple, fn: Callable, step_in: Sequence[torch.Tensor], job_in: Sequence[torch.Tensor],
                 *, job: object, keep: tuple = (), communicates: bool = False):
        """fn(*step_in, *job_in) through the graph of `key` (which must determine fn's work given the
        signatures of the inputs, which are added to it). `job` identifies the job: its per-job inputs are the
        same for all its calls, copied (and their signature taken) when it changes. Out of GPU memory, a call that does not communicate drops the other shapes' graphs
        and tries once more; one that does cannot (its partners are already inside its collectives)."""
        if self._job_signature[0] is not job:
            self._job_signature = (job, self.signature(job_in))
        key = (key, self.signature(step_in), self._job_signature[1])
        e = self.entries.get(key)
        if e is None:
            e = _Entry(step_in=[_static(t) for t in step_in], job_in=[_static(t) for t in job_in], keep=keep)
            self.entries[key] = e
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        for dst, src in zip(e.step_in, step_in):
            dst.copy_(src)
        if e.job is not job:
            for dst, src in zip(e.job_in, job_in):
                dst.copy_(src)
            e.job = job
        e.calls += 1
        args = (*e.step_in, *e.job_in)
        retry = not communicates
        if e.failed or e.calls == 1:     # first call: compile, pick kernels, warm up; outside any graph
            return self._with_room(key, retry, lambda: fn(*args))
        if e.replay is None:
            try:
                e.replay, e.out = self._with_room(key, retry, lambda: self.recorder.record(fn, args))
                self.captures += 1
            except Exception as err:  # noqa: BLE001 - a failed recording falls back to the plain call
                e.failed = True
                self.failures += 1
                log.warning("xDiT: CUDA graph recording failed (%s: %s); this shape runs without graphs "
                            "(same results, slower steps; XDIT_HUNYUAN_CUDA_GRAPHS=0 before starting ComfyUI turns them off)",
                            type(err).__name__, err)
                return self._with_room(key, retry, lambda: fn(*args))
        e.replay()
        e.replays += 1
        return e.out

    def _with_room(self, key: tuple, retry: bool, thunk: Callable):
        try:
            return thunk()
        except torch.cuda.OutOfMemoryError:
            if not retry or len(self.entries) < 2:
                raise
            log.warning("xDiT: out of GPU memory with %d recorded shapes; dropping the others and retrying",
                        len(self.entries))
            for k in [k for k in self.entries if k != key]:
                del self.entries[k]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return thunk()


def _static(t: torch.Tensor) -> torch.Tensor:
    """A buffer of t's shape, dtype, device and strides."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
