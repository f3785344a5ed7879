"""A stand-in for RankRuntime that the pool tests host in real worker processes (`--runtime
tests.fake_runtime:FakeRuntime`): a few "steps", each with collectives, so ranks depend on each other.

job.sampler_options steer it: sleep (seconds per step), job_error (JobError on every rank before any
collective; with job_error_rank only on that rank, a runtime bug), fail_step + fail_rank (RuntimeError
on one rank at that step), stall_step + stall_rank (that rank blocks at that step while its heartbeat
thread goes on, as a rank stuck in a collective does). Environment at start-up:
FAKE_RUNTIME_INIT_SLEEP (seconds), FAKE_RUNTIME_INIT_ERROR (message of a RuntimeError).
"""
from __future__ import annotations

import os
import time
from collections import Counter

import torch
import torch.distributed as dist

from comfyui_xdit_hunyuan.job import Job, JobCancelled, JobError, WeightDelta


def weight_value(source) -> float:
    """What the fake "loads": the seed of 'random:<seed>[:preset]', or the sum of a safetensors file."""
    if source.startswith("random:"):
        return float(source.split(":")[1])
    return sum(file_sums(source).values())


def file_sums(path) -> dict[str, float]:
    from safetensors.torch import load_file
    return {k: float(t.double().sum()) for k, t in load_file(path).items()}


def step(x: torch.Tensor, sigma: float, sigma_next: float, collective: float, weight: float,
         guidance: float) -> torch.Tensor:
    return x * (1.0 - 0.1 * (sigma - sigma_next)) + 0.01 * collective + 1e-3 * weight * guidance


def expected_latent(job: Job, world_size: int, weight: float) -> torch.Tensor:
    """The fake's result computed without any process: the oracle of the pool tests."""
    x = job.noise.clone().float()
    for i in range(job.steps):
        x = step(x, float(job.sigmas[i]), float(job.sigmas[i + 1]), world_size * (world_size + 1) / 2, weight,
                 job.guidance)
    return x + job.latent


class FakeRuntime:
    def __init__(self, config, rank: int, world_size: int, device: str):
        if os.environ.get("FAKE_RUNTIME_INIT_SLEEP"):
            time.sleep(float(os.environ["FAKE_RUNTIME_INIT_SLEEP"]))
        if os.environ.get("FAKE_RUNTIME_INIT_ERROR"):
            raise RuntimeError(os.environ["FAKE_RUNTIME_INIT_ERROR"])
        self.config, self.rank, self.world_size, self.device = config, rank, world_size, torch.device(device)
        self.loads = 0
        self.loads_by_identity: Counter = Counter()
        self.loaded_identity: str | None = None
        self.weight = 0.0
        self.held: dict[str, float] = {}          # per key: the sum of the tensor held
        self.kept: dict[int, float] = {}
        self.last_source: str | None = None

    def stats(self) -> dict:
        return {"loads_by_identity": dict(self.loads_by_identity), "last_source": self.last_source,
                "kept": len(self.kept),
                "cache_env": {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}}

    def _load(self, weights) -> None:
        """Follows the pool client's WeightDelta like RankRuntime does, on per-key sums instead of tensors: the
        fake's weight is the sum of what it holds."""
        delta = weights.source
        self.last_source = delta.base if isinstance(delta, WeightDelta) else delta
        if not isinstance(delta, WeightDelta):
            delta = WeightDelta() if weights.identity == self.loaded_identity else WeightDelta(base=delta)
        if delta.base is not None:
            if not isinstance(delta.base, str):
                raise JobError(f"weights '{weights.identity}' are not loaded and the source is "
                               f"{type(delta.base).__name__}; a file path or 'random:<seed>' was expected")
            self.held = {"": weight_value(delta.base)} if delta.base.startswith("random:") else file_sums(delta.base)
            self.kept, self.loads = {}, self.loads + 1
            self.loads_by_identity[weights.identity] += 1
        for vid in delta.drop:
            self.kept.pop(vid)
        for key, vid in delta.keep.items():
            self.kept[vid] = self.held[key]
        for key, vid in delta.restore.items():
            self.held[key] = self.kept[vid]
        for path in delta.files:
            self.held.update(file_sums(path))
        self.weight = sum(self.held.values())
        self.loaded_identity = weights.identity

    def _all_reduce(self, value: float, op=dist.ReduceOp.SUM) -> float:
        if self.world_size == 1:                 # a one-worker pool has no process group
            return value
        t = torch.tensor([value], dtype=torch.float32, device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def run(self, job: Job, plan, *, report, cancel_requested):
        opts = job.sampler_options
        if opts.get("job_error") and opts.get("job_error_rank", self.rank) == self.rank:
            raise JobError("the fake runtime rejects this job (sampler_options job_error); remove it")
        self._load(job.weights)
        report({"type": "loaded", "identity": self.loaded_identity})
        x = job.noise.clone().float()
        total = job.steps
        for i in range(total):
            time.sleep(float(opts.get("sleep", 0.0)))
            if opts.get("stall_step") == i and opts.get("stall_rank", self.rank) == self.rank:
                time.sleep(3600)
            if opts.get("fail_step") == i and opts.get("fail_rank", self.rank) == self.rank:
                raise RuntimeError(f"fake engine failure on rank {self.rank} at step {i}")
            if self._all_reduce(float(cancel_requested()), dist.ReduceOp.MAX) > 0:
                raise JobCancelled(f"cancelled after step {i} of {total}")
            x = step(x, float(job.sigmas[i]), float(job.sigmas[i + 1]), self._all_reduce(self.rank + 1.0),
                     self.weight, job.guidance)
            if self.rank == 0:
                show = job.preview_every and (i + 1) % job.preview_every == 0
                report({"type": "progress", "step": i + 1, "total": total,
                        "preview": x[:, :, ::2, ::2].half() if show else None})
        return x + job.latent if self.rank == 0 else None
