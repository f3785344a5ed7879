"""Run jobs on a mesh of CPU processes (torch.distributed gloo) with the engine's RankRuntime, and the
oracles the parallel tests compare against.

`run_on_mesh(plan, jobs)` spawns plan.world_size processes, runs every job in order in the same process
group (so channels must be clean between jobs), and returns rank 0's results (a tensor, or the name of
the exception raised on rank 0)."""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from comfyui_xdit_hunyuan import sampling
from comfyui_xdit_hunyuan.job import Job, JobCancelled, WeightsRef
from comfyui_xdit_hunyuan.model import TokenGrid
from comfyui_xdit_hunyuan.model.attention import attention
from comfyui_xdit_hunyuan.parallel.graphs import GraphCache
from comfyui_xdit_hunyuan.parallel.runtime import RankRuntime
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.tiny import preset, random_cond, random_model

PRESET, SEED = "tiny", 0


def make_job(h=16, w=16, steps=3, sampler="euler", guidance=5.0, seed=7, negative=None, positive=None,
             scheduler="normal") -> Job:
    c = preset(PRESET)
    ms = sampling.DiscreteVSampling.for_model(c)
    lat = torch.zeros(1, 4, h, w)
    return Job(weights=WeightsRef(f"random:{SEED}:{PRESET}", f"random:{SEED}:{PRESET}"),
               positive=positive or [random_cond(c, 1, hw=(8 * h, 8 * w))],
               negative=negative or [random_cond(c, 2, bert_len=c.text_len + 3, hw=(8 * h, 8 * w))],
               latent=lat, noise=sampling.prepare_noise(lat, seed),
               sigmas=sampling.calculate_sigmas(ms, scheduler, steps), sampler=sampler, guidance=guidance,
               seed=seed)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ReplayOnBuffers:
    """Stands for CUDA graph recording on the CPU: records by running fn once on the graph's buffers; a
    replay runs it again there (collectives included), into the same output tensor."""

    def __init__(self, fail: bool = False):
        self.fail, self.records = fail, 0

    def record(self, fn, args):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.records += 1
        out = fn(*args)

        def replay():
            out.copy_(fn(*args))
        return replay, out


def _rank_main(rank, world, port, plan, jobs, cancel_at, out, graphs=False, pool=PoolConfig(devices="cpu")):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rt = RankRuntime(pool, rank, world, "cpu")
    if graphs:
        rt.graphs = GraphCache(ReplayOnBuffers(), max_entries=2)
    results = []
    for j, job in enumerate(jobs):
        calls = {"n": 0}

        def cancel(j=j):
            calls["n"] += 1
            # cancel_at: {job index: (rank, call)} -- only that rank asks, at that evaluation
            want = cancel_at.get(j)
            return want is not None and want[0] == rank and calls["n"] >= want[1]
        try:
            results.append(rt.run(job, plan, report=lambda m: None, cancel_requested=cancel))
        except JobCancelled:
            results.append("JobCancelled")
    if graphs:
        results.append({"captures": rt.graphs.captures, "replays": sum(e.replays for e in rt.graphs.entries.values())})
    if rank == 0:
        torch.save(results, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_on_mesh(plan: ParallelConfig, jobs: list[Job], cancel_at: dict | None = None, graphs: bool = False,
                pool: PoolConfig = PoolConfig(devices="cpu")) -> list:
    """pool: what the ranks' runtime is configured with. graphs: the ranks keep a graph cache whose recording is ReplayOnBuffers (CPU stand-in); rank 0's
    graph counts are then appended to the results."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "results.pt")
        args = (plan.world_size, _free_port(), plan, jobs, cancel_at or {}, out, graphs, pool)
        if plan.world_size == 1:
            _rank_main(0, *args)
        else:
            mp.spawn(_rank_main, args=args, nprocs=plan.world_size)
        return torch.load(out)


# ---------------------------------------------------------------------------------------------------------
# Oracles written independently of the engine's runner
def serial_reference(job: Job) -> torch.Tensor:
    """KSampler's loop, written plainly: the whole model per call, cond/uncond separate, CFG, sampler."""
    model = random_model(PRESET, seed=SEED)
    ms = sampling.DiscreteVSampling.for_model(model.cfg)
    x = sampling.initial_latent(ms, job.sigmas, job.noise, job.latent)

    def denoise(xe, sigma):
        s = torch.tensor(sigma)
        t = ms.timestep(s.reshape(1))
        preds = []
        for entries in (job.negative, job.positive):
            acc = sum(ms.calculate_denoised(s, model(ms.calculate_input(s, xe), t, **e.model_kwargs()), xe)
                      * e.strength for e in entries)
            preds.append(acc / sum(e.strength for e in entries))
        return preds[0] + (preds[1] - preds[0]) * job.guidance

    x = sampling.sample(denoise, x, job.sigmas, job.sampler, noise=job.seed, options=job.sampler_options)
    return sampling.final_latent(ms, job.sigmas, x)


class _StaleKV:
    """Self-attention with PipeFusion's buffer semantics: a patch's keys/values are written into its slot
    of a whole-image buffer, and queries attend to the whole buffer."""

    def __init__(self):
        self.buf, self.slot, self.key = {}, None, 0

    def __call__(self, q, k, v, block):
        key = (self.key, block)
        if self.slot is None:
            self.buf[key] = [k.clone(), v.clone()]
        else:
            a, b = self.slot
            self.buf[key][0][:, :, a:b] = k
            self.buf[key][1][:, :, a:b] = v
        return attention(q, *self.buf[key], "math")


def pipefusion_reference(job: Job, patches: int, warmup: int) -> torch.Tensor:
    """PipeFusion's result computed in one process: warm-up steps on the whole image, then each step patch
    by patch in order, every self-attention reading the buffer (fresh for patches done this step, one
    step old for the others), the sampler stepping each patch's rows."""
    model = random_model(PRESET, seed=SEED)
    ms = sampling.DiscreteVSampling.for_model(model.cfg)
    x = sampling.initial_latent(ms, job.sigmas, job.noise, job.latent)
    B, _, H, W = x.shape
    if H % 2:
        raise ValueError("the PipeFusion reference takes even latent heights")
    grid = TokenGrid(H, W)
    sizes = [grid.rows // patches + (i < grid.rows % patches) for i in range(patches)]
    starts = [sum(sizes[:i]) for i in range(patches)]
    rows = [(2 * s, min(2 * (s + n), H)) for s, n in zip(starts, sizes)]
    sides = (job.negative, job.positive)
    texts = [[model.encode_text(**e.model_kwargs(), batch=B) for e in side] for side in sides]
    cos, sin = model.rope(grid)
    noise = sampling.StepNoise(job.seed, x.shape)
    machines = [sampling.SliceSampler(job.sampler, job.sigmas, x[:, :, a:b], noise=noise.rows(slice(a, b)),
                                      options=job.sampler_options) for a, b in rows]
    kv = _StaleKV()
    steps = sampling.evaluation_steps(job.sampler, job.sigmas, job.sampler_options)
    for step in steps:
        views = [list(range(patches))] if step < warmup else [[m] for m in range(patches)]
        for view in views:
            ins = [machines[m].next_input() for m in view]
            xe, sigma = torch.cat([i[0] for i in ins], 2), ins[0][1]
            s = torch.tensor(sigma)
            t0, t1 = starts[view[0]] * grid.cols, (starts[view[-1]] + sizes[view[-1]]) * grid.cols
            kv.slot = None if len(view) == patches else (t0, t1)
            tok = model.embed_image(ms.calculate_input(s, xe))
            preds = []
            for si, side in enumerate(sides):
                acc = 0
                for ei, (entry, text) in enumerate(zip(side, texts[si])):
                    kv.key = (si, ei)
                    cond = model.conditions(text, ms.timestep(s.reshape(1)))
                    h = model.run_blocks(tok, cond, (cos[t0:t1], sin[t0:t1]), range(model.cfg.depth), {}, kv)
                    v = model.unpatchify(model.final_tokens(h, cond), grid,
                                         rows=(starts[view[0]], starts[view[-1]] + sizes[view[-1]]))
                    acc = acc + ms.calculate_denoised(s, v, xe) * entry.strength
                preds.append(acc / sum(e.strength for e in side))
            den = preds[0] + (preds[1] - preds[0]) * job.guidance
            a0 = rows[view[0]][0]
            for m in view:
                a, b = rows[m]
                machines[m].feed(den[:, :, a - a0:b - a0])
    return sampling.final_latent(ms, job.sigmas, torch.cat([mc.x for mc in machines], 2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (latents are ~1/0.13 in scale, so absolute tolerances mislead)."""
    return float((a - b).abs().max() / b.abs().max())
