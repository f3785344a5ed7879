"""The parallel engine on NCCL without the worker pool, each phase under a watchdog that prints every
rank's Python stack if it stalls (2 GPUs):

    python bench/nccl_probe.py [--pixels 1024] [--steps 3] [--phases ring_attn,ring2,pp2,ulysses2,cfg2]

ring_attn: ring attention alone on random tensors vs plain attention over all tokens;
ring2/pp2/ulysses2/cfg2: a job through the Runner (full-size random v1.2 weights, bf16) whose final
latent is compared with the serial run of rank 0.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


from comfyui_xdit_hunyuan.model import ComputeOptions  # noqa: E402
from comfyui_xdit_hunyuan.bench import bench_job  # noqa: E402
from comfyui_xdit_hunyuan.job import WeightsRef  # noqa: E402
from comfyui_xdit_hunyuan.model.attention import attention_lse  # noqa: E402
from comfyui_xdit_hunyuan.parallel.mesh import build_mesh  # noqa: E402
from comfyui_xdit_hunyuan.parallel.runner import Runner  # noqa: E402
from comfyui_xdit_hunyuan.parallel.sequence import ring_attention  # noqa: E402
from comfyui_xdit_hunyuan.plan import ParallelConfig  # noqa: E402
from comfyui_xdit_hunyuan.tiny import preset, random_model  # noqa: E402

DEGREES = {"ring2": dict(ring_degree=2), "pp2": dict(pipefusion_degree=2), "ulysses2": dict(ulysses_degree=2),
           "cfg2": dict(cfg_degree=2)}


def job(pixels: int, steps: int, name: str = "full"):
    return bench_job(preset(name), pixels, steps, 0, WeightsRef("r", f"random:0:{name}"))


def rank_main(rank: int, world: int, a):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dev = torch.device("cpu") if a.cpu else torch.device("cuda", rank)
    name = "tiny" if a.cpu else "full"
    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    if not a.cpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if a.cpu else "nccl", init_method=f"tcp://127.0.0.1:{a.port}", rank=rank, world_size=world)
    ctrl = dist.new_group(backend="gloo")
    say = lambda *m: print(f"[rank {rank}]", *m, flush=True)  # noqa: E731
    model = random_model(name, seed=0, dtype=torch.float32 if a.cpu else torch.bfloat16, device=dev)
    model.configure(ComputeOptions(fused_gelu=not a.cpu, cross_attention="padded" if a.compile else "sdpa"))
    if a.compile:
        model.compile_blocks()
    serial = None
    if rank == 0:
        serial = Runner(model, build_mesh({}, 0), ParallelConfig()).run(job(a.pixels, a.steps, name))
    dist.barrier(group=ctrl)
    for phase in a.phases.split(","):
        # a phase's first run compiles when --compile: allow for it (a stall watchdog, not a time limit)
        faulthandler.dump_traceback_later(a.watchdog + (240 if a.compile else 0), exit=True)
        t0 = time.perf_counter()
        if phase == "ring_attn":
            mesh = build_mesh({"ring": 2}, rank, ctrl=ctrl)
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(1, 16, 4096, 88, device=dev, dtype=torch.float32 if a.cpu else torch.bfloat16,
                                   generator=g) for _ in range(3))
            ref = attention_lse(q, k, v, "math")[0]
            n = 2048
            mine = slice(rank * n, (rank + 1) * n)
            for i in range(3):
                out = ring_attention(q[:, :, mine], torch.stack((k[:, :, mine], v[:, :, mine])), [n, n], mesh, "auto")
                sync()
                err = ((out.float() - ref[:, :, mine].float()).norm() / ref[:, :, mine].float().norm()).item()
                say(f"ring_attn iteration {i}: rel err {err:.1e}")
        elif phase.startswith("prof:"):            # where a step's time goes in one mode (rank 0's view)
            mode = phase[5:]
            plan = ParallelConfig(**DEGREES.get(mode, {}), warmup_steps=1)
            if mode != "serial" or rank == 0:          # serial: rank 0 alone
                mesh = build_mesh(plan.mesh_degrees, rank, ctrl=ctrl) if mode != "serial" else build_mesh({}, 0)
                runner = Runner(model, mesh, plan, backend="padded" if (a.compile and mode in ("serial", "cfg2"))
                                else "sdpa")
                runner.run(job(a.pixels, 3, name))
                sync()
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([] if a.cpu else [ProfilerActivity.CUDA])
                with profile(activities=acts) as prof:
                    t1 = time.perf_counter()
                    runner.run(job(a.pixels, 10, name))
                    sync()
                    wall = time.perf_counter() - t1
                evs = prof.key_averages()
                gpu = sum(getattr(e, "self_device_time_total", 0) for e in evs) / 1000
                if rank == 0:
                    say(f"{phase}: {1000 * wall / 10:.1f} ms per step (profiled), GPU kernels {gpu / 10:.1f} ms per step")
                    for e in sorted(evs, key=lambda e: -e.self_cpu_time_total)[:14]:
                        say(f"   cpu {e.self_cpu_time_total / 1e4:7.2f} ms/step x{e.count // 10:<5d} {e.key[:90]}")
        else:
            plan = ParallelConfig(**DEGREES[phase], warmup_steps=1)
            mesh = build_mesh(plan.mesh_degrees, rank, ctrl=ctrl)
            out = Runner(model, mesh, plan).run(job(a.pixels, a.steps, name))
            sync()
            if rank == 0:
                err = ((out - serial).norm() / serial.norm()).item()
                say(f"{phase}: {a.steps} steps in {time.perf_counter() - t0:.2f} s, rel L2 to serial {err:.2e}")
        faulthandler.cancel_dump_traceback_later()
        dist.barrier(group=ctrl)
        say(f"{phase} done in {time.perf_counter() - t0:.1f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--pixels", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--phases", default="ring_attn,ring2,pp2,ulysses2,cfg2")
    ap.add_argument("--watchdog", type=float, default=60)
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks first")
    ap.add_argument("--cpu", action="store_true", help="gloo, tiny model: a smoke test of this script")
    a = ap.parse_args()
    mp.spawn(rank_main, args=(2, a), nprocs=2, join=True)
