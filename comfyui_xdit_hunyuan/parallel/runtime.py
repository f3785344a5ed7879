"""The per-rank engine a worker process hosts: loads weights once per identity, builds (and keeps) a device
mesh per set of degrees, and runs jobs with the Runner."""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..job import Job, JobError, SharedWeights, WeightDelta
from ..model import ComputeOptions, HunyuanDiT, kernels
from ..model.attention import resolve_backend
from ..config import PoolConfig
from ..plan import ParallelConfig
from .graphs import GraphCache, graphs_mode
from .mesh import Mesh, build_mesh
from .runner import Runner

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_weights(source, *, dtype: torch.dtype, device: torch.device) -> HunyuanDiT:
    """A model from a WeightsRef source: "random:<seed>:<preset>", a path, or a state dict."""
    from ..tiny import parse_random_source, random_model
    random = parse_random_source(source)
    if random is not None:
        return random_model(random[1], seed=random[0], dtype=dtype, device=device)
    from ..model.loading import load_model
    return load_model(source, dtype=dtype, device=device)


def _import_compiler() -> None:
    import torch._dynamo  # noqa: F401
    import torch._inductor.codecache  # noqa: F401,E401
    import torch._inductor.compile_fx  # noqa: F401


def _compile_times() -> str | None:
    """torch.compile's own account of where its time went (cumulative, this process), or None."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:
        return None
    try:
        return dynamo.compile_times(repr="str", aggregate=True)
    except Exception:  # noqa: BLE001 - statistics only
        return None


class RankRuntime:
    """One per worker process, created after torch.distributed's default group is initialised (or with
    world_size 1 and no torch.distributed at all). `pool`: what the pool was started with (dtype, attention,
    compile, graphs, kernels); the degrees come with each job.

    `mesh_builder(degrees, rank)`: how this rank's meshes are made; None: `build_mesh` over torch.distributed,
    with a gloo group for the cancel agreement. `parallel.mesh.standin_mesh` runs rank `rank`'s share of each
    job alone, every collective stood in (bench/floors.py): no torch.distributed call is then made, and a job
    may have any plan with more than `rank` ranks (`world_size` then only sizes the CPU thread cap)."""

    def __init__(self, pool: PoolConfig, rank: int, world_size: int, device: str, *,
                 mesh_builder: Callable[[dict, int], Mesh] | None = None):
        self.pool, self.rank, self.world_size = pool, rank, world_size
        self.mesh_builder = mesh_builder
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # GPU ranks do little CPU math (each job's set-up). One OpenMP team per core in every rank would
            # oversubscribe the host, and each small CPU op would then wait at OpenMP barriers.
            cap = max(1, min(8, (os.cpu_count() or 1) // (2 * world_size)))
            torch.set_num_threads(min(torch.get_num_threads(), cap))
        self.dtype = resolve_dtype(pool.dtype, self.device)
        self.model: HunyuanDiT | None = None
        self.identity: str | None = None
        self.kept: dict[int, torch.Tensor] = {}     # replaced weight tensors kept aside, by the client's ids
        self.loads = 0                              # real weight loads (tests assert reuse)
        self.meshes: dict[tuple, object] = {}
        self.last_setup_phases: dict = {}              # host time of the last job before its first step
        self.last_weights_seconds: float | None = None  # the last job's weights: load or update
        # CUDA graphs of the whole model call (every plan without PipeFusion); they hold the weights'
        # addresses, so they are dropped whenever the weights change
        mode = graphs_mode(self.device, pool.cuda_graphs, pool.compile_mode)
        self.graphs = GraphCache(collectives=mode == "all") if mode else None
        # CPU group for agreeing on cancellation without touching the GPU stream
        self.ctrl = dist.new_group(backend="gloo") if world_size > 1 and mesh_builder is None else None
        self.load_phases: dict = {}
        # torch.compile's modules take seconds to import: in the background while the first job's weights
        # are on their way
        self._compiler = None
        self.compiled = False                       # the blocks of the held model are compiled
        if pool.compile and self.device.type == "cuda" and not pool.background_compile:
            self._compiler = threading.Thread(target=_import_compiler, name="import-compiler", daemon=True)
            self._compiler.start()

    @property
    def loaded_identity(self) -> str | None:
        return self.identity

    def ensure_weights(self, ref) -> bool:
        """Make the held weights `ref`'s. The pool client sends a WeightDelta (job.py); a plain source (a path,
        "random:...", a state dict: in-process callers) is loaded whole unless its identity is the one held.
        True when the weights changed."""
        delta = ref.source
        if not isinstance(delta, WeightDelta):
            held = ref.identity == self.identity and self.model is not None
            delta = WeightDelta() if held else WeightDelta(base=ref.source)
        if delta.base is None and self.model is None:
            raise JobError("the workers do not hold these weights and none were sent; submit the job again")
        if delta.base is not None:
            self._load_whole(delta.base)
        changed = self._apply(delta)
        self.identity = ref.identity
        return delta.base is not None or changed

    def _load_whole(self, source) -> None:
        if source is None:
            raise JobError("the workers do not hold these weights and none were sent; submit the job again")
        self.model, self.kept = None, {}            # free the old weights first
        if self.graphs is not None:
            self.graphs.clear()                     # they read the old weights' memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._join_compiler()
        t = time.perf_counter()
        if isinstance(source, SharedWeights):
            source = self._receive_whole(source)
        self.model = build_weights(source, dtype=self.dtype, device=self.device)
        self.load_phases = {"read": time.perf_counter() - t}
        self.model.configure(self.compute_options())
        self.compiled = False
        self.load_phases["configure"] = time.perf_counter() - t - self.load_phases["read"]
        self.loads += 1

    def _join_compiler(self) -> None:
        """torch.compile's modules are imported in the background from start-up (unless the first job may run
        eager: PoolConfig.background_compile), while the client stages the weights; the read and the steps
        wait for them: a thread importing holds the GIL for up to the switch interval each time the main
        thread releases it (every torch call), which made the weights' read 10x slower."""
        if self._compiler is not None:
            self._compiler.join()
            self._compiler = None

    def _compile(self) -> None:
        """Regional torch.compile of the held model's blocks (GPU workers; CPU workers stay eager). CUDA graphs
        recorded from the eager blocks are dropped: the next calls record the compiled ones."""
        self._join_compiler()
        t = time.perf_counter()
        self.model.compile_blocks(self.pool.compile_mode, any_size=self.pool.compile_any_size)
        if self.graphs is not None:
            self.graphs.clear()
        self.compiled = True
        self.load_phases["compile_setup"] = time.perf_counter() - t

    @torch.no_grad()
    def _apply(self, delta: WeightDelta) -> bool:
        """The delta's in-place changes to the held weights (see WeightDelta for the order)."""
        for vid in delta.drop:
            self.kept.pop(vid, None)
        params = dict(self.model.named_parameters())
        unknown = [k for k in (*delta.keep, *delta.restore) if k not in params]
        if unknown:
            raise JobError(f"the weights name tensors this model does not have: {', '.join(unknown[:5])}")
        for key, vid in delta.keep.items():
            self.kept[vid] = params[key].detach().clone()
        for key, vid in delta.restore.items():
            if vid not in self.kept:
                raise RuntimeError(f"the pool client restores weight '{key}' from kept tensor {vid}, which this "
                                   f"rank does not hold (client and worker records disagree)")
            params[key].copy_(self.kept[vid])
        for path in delta.files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if key not in params:
                        raise JobError(f"the weights name a tensor this model does not have: '{key}'")
                    params[key].copy_(f.get_tensor(key))
        if delta.shared:
            self._copy_shared(delta, params)
        changed = bool(delta.restore or delta.files or delta.shared)
        if changed:
            self.model.refresh_derived()
        return changed

    def _copy_shared(self, delta: WeightDelta, params: dict) -> None:
        """Tensors the client shares from GPU memory (CUDA IPC): the rank on that GPU copies them device to
        device, then broadcasts each to the other ranks (NCCL; every rank applies the same delta in order)."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        if self.device.type != "cuda":
            raise RuntimeError("the pool client shared GPU tensors with a CPU worker")
        for key, args in delta.shared.items():
            if key not in params:
                raise JobError(f"the weights name a tensor this model does not have: '{key}'")
            if self.rank == delta.shared_rank:
                src = rebuild_cuda_tensor(*args)
                params[key].copy_(src)
                del src                       # releases the client's memory (its IPC reference count)
            if self.world_size > 1:
                dist.broadcast(params[key], src=delta.shared_rank)

    def _receive_whole(self, shared: SharedWeights) -> dict[str, torch.Tensor]:
        """A whole model from the client's GPU memory (SharedWeights): the rank on that GPU opens its one
        buffer, the others receive a copy of it by one broadcast; then every tensor is copied out of the buffer
        in this pool's dtype (device to device) and the buffer is let go."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor
        if self.device.type != "cuda":
            raise RuntimeError("the pool client shared GPU tensors with a CPU worker")
        if self.rank == shared.rank:
            buffer = rebuild_cuda_tensor(*shared.handle)
        else:
            buffer = torch.empty(shared.nbytes, dtype=torch.uint8, device=self.device)
        if self.world_size > 1:
            dist.broadcast(buffer, src=shared.rank)
        out = {}
        for key, (offset, dtype, shape) in shared.entries.items():
            n = math.prod(shape) * dtype.itemsize
            out[key] = buffer[offset:offset + n].view(dtype).view(shape).to(self.dtype, copy=True)
        torch.cuda.synchronize(self.device)
        del buffer                            # releases the client's memory (its IPC reference count)
        return out

    def compute_options(self) -> ComputeOptions:
        """How this rank's model computes, from the pool's config and the device. The cross-attention's keys
        are the text tokens (a few hundred): its kernel is chosen for that size."""
        cfg = self.model.cfg
        return ComputeOptions(fused_kernels=kernels.wanted(self.device, self.pool.fused_kernels),
                              fused_gelu=self.device.type == "cuda",
                              cross_attention=resolve_backend(self.pool.attention, self.device, self.dtype,
                                                              in_graph=self.pool.compile,
                                                              keys=cfg.text_len + cfg.text_len_t5))

    def attention_backend(self, plan: ParallelConfig) -> str:
        """The self-attention kernel of a job under `plan`. Padding the head dim is free inside the compiled
        block graphs (self-attention runs there only without sequence parallelism / PipeFusion), and so it is
        wherever the fused kernels prepare q, k, v for an attention that communicates (they write the padded
        head dim at no cost: SequenceParallelAttention.attend_projection)."""
        local = plan.sp_degree == 1 and plan.pipefusion_degree == 1
        pad_free = (self.pool.compile and local) or (not local and self.model.options.fused_kernels)
        return resolve_backend(self.pool.attention, self.device, self.dtype, in_graph=pad_free)

    def mesh_for(self, plan: ParallelConfig):
        degrees = plan.mesh_degrees
        key = tuple(degrees.values())
        if plan.world_size != self.world_size and (self.mesh_builder is None or plan.world_size <= self.rank):
            raise JobError(f"the plan needs {plan.world_size} ranks but the pool has {self.world_size}")
        if key not in self.meshes:
            self.meshes[key] = (build_mesh(degrees, self.rank, ctrl=self.ctrl) if self.mesh_builder is None
                                else self.mesh_builder(degrees, self.rank))
        return self.meshes[key]

    def run(self, job: Job, plan: ParallelConfig, *, report: Callable[[dict], None],
            cancel_requested: Callable[[], bool], eager: bool = False) -> torch.Tensor | None:
        """Run one job under `plan` (degrees resolved for this job; product == world size).

        Loads job.weights when its identity differs from the loaded one. A GPU pool that compiles compiles the
        blocks before the first job that is not `eager` (the pool client runs a cold pool's first jobs eager
        while a helper process fills the compile cache: PoolConfig.background_compile). Progress messages
        {"type": "progress", "step", "total", "preview"} come from one rank (the last pipeline stage's
        first rank). Cancellation is agreed by all ranks at the same step (JobCancelled everywhere).
        Returns the final LATENT samples (CPU float32) on rank 0, None elsewhere.
        """
        t0 = time.perf_counter()
        self.ensure_weights(job.weights)
        self.last_weights_seconds = time.perf_counter() - t0
        report({"type": "loaded", "identity": self.identity})     # every job: the client's record follows it
        if self.pool.compile and self.device.type == "cuda" and not self.compiled and not eager:
            self._compile()
        mesh = self.mesh_for(plan)
        runner = Runner(self.model, mesh, plan, backend=self.attention_backend(plan), report=report,
                        cancel_requested=cancel_requested, graphs=self.graphs)
        try:
            return runner.run(job)
        finally:
            self.last_setup_phases = runner.setup_phases

    def stats(self) -> dict:
        """Extra per-job statistics for the client (worker.main adds them to the job's answer)."""
        g = self.graphs
        graphs = None if g is None else {"entries": len(g.entries), "captures": g.captures, "failures": g.failures}
        phases = self.last_setup_phases
        return {"setup_seconds": sum(phases.values()) if phases else None, "setup_phases": phases,
                "cuda_graphs": graphs, "cpu_threads": torch.get_num_threads(), "kept_tensors": len(self.kept),
                "weights_seconds": self.last_weights_seconds, "load_phases": self.load_phases,
                "compile_times": _compile_times(), "compiled": self.compiled,
                "kept_bytes": sum(t.numel() * t.element_size() for t in self.kept.values())}
