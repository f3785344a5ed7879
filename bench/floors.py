"""Compute vs communication, measured on one GPU: the per-rank compute floor of parallel plans.

    python bench/floors.py [--sizes 1024,2048] [--plans default|more|all|serial,cfg2,...] [--steps 20]
                           [--ranks 0|stages|all] [--out floors.json] [--compare bench.json ...]

For each size and plan, one rank's share of the plan (its token slice, its heads, its blocks, its side of
CFG) runs on this GPU as a worker runs it: full-size random HunyuanDiT v1.2 weights, bf16, the blocks
compiled, CUDA graphs where the runtime keeps them, the fused kernels and the attention backend the pool
would pick, through the same RankRuntime and Runner. Only the mesh differs: `parallel.mesh.standin_mesh`,
whose collectives (`parallel.collectives.LocalStandIn`) write outputs of the real shapes on this device
(copies of the local data, zeros for receives) and communicate nothing. So "ms/step" is the GPU time one
rank needs per step with communication and waiting for other ranks taken out; the time measured on N GPUs
minus that floor is what communication and synchronisation cost (`--compare` reads the pool benchmark's
JSON, `python -m comfyui_xdit_hunyuan bench`, and prints the difference).

The latents of these runs are not a real run's (the other ranks' data are stood in by this rank's own),
except for the serial plan, which has no collectives. ms/step = (job wall time - the job's set-up) / steps,
after a warm-up job of --warm-steps steps (compilation, the CUDA graph's plain call, recording, replay).

Columns: "x serial" is serial ms / plan ms, the speed-up the plan would have if communication were free;
"work" is world x plan ms / serial ms, what splitting costs in compute alone (1.00: none). With --ranks
stages (or all) a plan's floor is its slowest measured rank (PipeFusion stages differ: the first embeds,
the last runs the final layer and the sampler).

On CPU (a smoke test of the script): --device cpu --preset tiny --sizes 128 --compile off.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from comfyui_xdit_hunyuan import compile_cache
from comfyui_xdit_hunyuan.bench import bench_job, config_name
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.job import WeightsRef
from comfyui_xdit_hunyuan.parallel.mesh import coords_of, standin_mesh
from comfyui_xdit_hunyuan.parallel.runtime import RankRuntime
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.tiny import preset as model_preset


def _plan(cfg=1, pp=1, ring=1, ulysses=1) -> dict:
    return dict(cfg_degree=cfg, pipefusion_degree=pp, ring_degree=ring, ulysses_degree=ulysses)


DEFAULT = [_plan(), _plan(cfg=2), _plan(ulysses=2), _plan(ring=2), _plan(pp=2), _plan(cfg=2, ulysses=2)]
MORE = [_plan(ulysses=4), _plan(ring=4), _plan(ring=2, ulysses=2), _plan(cfg=2, ring=2), _plan(cfg=2, pp=2),
        _plan(pp=4), _plan(cfg=2, ulysses=4), _plan(ulysses=8), _plan(cfg=2, pp=4), _plan(cfg=2, pp=2, ring=2)]
PLANS = {config_name(d): d for d in DEFAULT + MORE}


def plans_named(spec: str) -> list[str]:
    """'default', 'more', 'all' or a comma-separated list of plan names (bench's names: cfg2xulysses2 ...)."""
    groups = {"default": [config_name(d) for d in DEFAULT], "more": [config_name(d) for d in MORE],
              "all": list(PLANS)}
    names = [n for part in spec.split(",") if part for n in groups.get(part, [part])]
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        raise SystemExit(f"unknown plan(s) {', '.join(unknown)}; choose from {', '.join(PLANS)}")
    return list(dict.fromkeys(names))


def ranks_of(plan: ParallelConfig, mode: str) -> list[int]:
    """The ranks measured: '0'; 'stages' (one rank per PipeFusion stage, the others' coordinates 0); 'all'."""
    degrees = plan.mesh_degrees
    if mode == "all":
        return list(range(plan.world_size))
    if mode == "stages":
        return [r for r in range(plan.world_size)
                if all(v == 0 for a, v in coords_of(r, degrees).items() if a != "pp")]
    return [int(mode)]


class Floors:
    """Stand-in runtimes, one per rank index measured, each holding the same random weights (loaded once per
    runtime; the compiled code is shared between them)."""

    def __init__(self, pool: PoolConfig, device: str, preset: str, seed: int = 0):
        self.pool, self.device, self.cfg = pool, device, model_preset(preset)
        self.weights = WeightsRef(f"random:{seed}:{preset}", f"random:{seed}:{preset}")
        self.runtimes: dict[int, RankRuntime] = {}

    def runtime(self, rank: int) -> RankRuntime:
        if rank not in self.runtimes:
            self.runtimes[rank] = RankRuntime(self.pool, rank, rank + 1, self.device, mesh_builder=standin_mesh)
        return self.runtimes[rank]

    def _sync(self):
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()

    def _job(self, rt: RankRuntime, pixels: int, steps: int, plan: ParallelConfig):
        job = bench_job(self.cfg, pixels, steps, 0, self.weights)
        self._sync()
        t0 = time.perf_counter()
        out = rt.run(job, plan, report=lambda m: None, cancel_requested=lambda: False)
        self._sync()
        return time.perf_counter() - t0, out

    def measure(self, name: str, pixels: int, steps: int, warm_steps: int, rank: int) -> dict:
        plan = ParallelConfig(**PLANS[name])
        rt = self.runtime(rank)
        warm, _ = self._job(rt, pixels, warm_steps, plan)
        seconds, out = self._job(rt, pixels, steps, plan)
        setup = sum(rt.last_setup_phases.values())
        graphs = rt.stats()["cuda_graphs"]
        if rt.graphs is not None:             # each plan's graphs are its own: free their memory
            rt.graphs.clear()
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()
        return {"plan": name, "degrees": plan.mesh_degrees, "world": plan.world_size, "pixels": pixels,
                "rank": rank, "coords": coords_of(rank, plan.mesh_degrees), "steps": steps,
                "ms_per_step": 1000 * (seconds - setup) / steps, "job_seconds": seconds, "setup_seconds": setup,
                "warm_job_seconds": warm, "warm_steps": warm_steps, "cuda_graphs": graphs,
                "backend": rt.attention_backend(plan), "cross_attention": rt.model.options.cross_attention,
                "fused_kernels": rt.model.options.fused_kernels,
                "latent_shape": None if out is None else list(out.shape)}


def floors_of(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (plan, pixels): the slowest measured rank's row."""
    out: dict = {}
    for r in rows:
        key = (r["plan"], r["pixels"])
        if key not in out or r["ms_per_step"] > out[key]["ms_per_step"]:
            out[key] = r
    return out


def measured_steps(paths: list[str]) -> dict[tuple[str, int], float]:
    """ms per step of multi-device runs in pool-benchmark JSON files, by (config, pixels); the last wins."""
    out = {}
    for p in paths:
        with open(p) as f:
            report = json.load(f)
        for r in report.get("results", []):
            if r.get("ms_per_step") and r.get("compiled", True):
                out[r["config"], r["pixels"]] = r["ms_per_step"]
    return out


def table(rows: list[dict], measured: dict | None = None) -> str:
    measured = measured or {}
    floors = floors_of(rows)
    lines = ["| size | plan | world | ranks | floor ms/step | x serial | work | 50 steps s | measured ms/step "
             "| comm + sync ms/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (name, px), r in floors.items():
        serial = floors.get(("serial", px))
        ranks = ",".join(str(x["rank"]) for x in rows if (x["plan"], x["pixels"]) == (name, px))
        ms = r["ms_per_step"]
        speed = f"{serial['ms_per_step'] / ms:.2f}" if serial else ""
        work = f"{r['world'] * ms / serial['ms_per_step']:.2f}" if serial else ""
        m = measured.get((name, px))
        lines.append(f"| {px}² | {name} | {r['world']} | {ranks} | {ms:.1f} | {speed} | {work} | {ms * 0.05:.2f} | "
                     f"{'' if m is None else f'{m:.1f}'} | {'' if m is None else f'{m - ms:+.1f}'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048", help="square image sizes in pixels")
    ap.add_argument("--plans", default="default", help="default, more, all, or names: " + ", ".join(PLANS))
    ap.add_argument("--steps", type=int, default=20, help="timed steps per job")
    ap.add_argument("--warm-steps", type=int, default=3, help="steps of the warm-up job before each timed one")
    ap.add_argument("--ranks", default="0", help="0 (or another rank), stages, all")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--compile", choices=("on", "off"), default="on")
    ap.add_argument("--cuda-graphs", choices=("all", "local", "off"), default="all")
    ap.add_argument("--fused-kernels", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--cache-dir", default="/tmp/xdit_floors_cache",
                    help="compile caches (kept between calls on a warm machine); '' for the compilers' defaults")
    ap.add_argument("--out", default="", help="JSON file for the rows")
    ap.add_argument("--compare", nargs="*", default=[], metavar="JSON",
                    help="pool-benchmark JSON of real multi-GPU runs: their ms/step minus the floor")
    return ap.parse_args(argv)


def _write(path: str, report: dict) -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)


def collect(args) -> dict:
    if args.cache_dir:
        os.environ.update(compile_cache.environment(compile_cache.prepare(args.cache_dir)))
    # one process compiles the block graphs of every plan's shapes (a worker sees a few): room for all of them,
    # so that no plan silently runs eager past dynamo's cache limit
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 512)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 2048)
    pool = PoolConfig(devices=args.device, dtype=args.dtype, attention=args.attention, compile=args.compile == "on",
                      cuda_graphs=args.cuda_graphs, fused_kernels=args.fused_kernels).validate()
    bench = Floors(pool, args.device, args.preset)
    rows: list[dict] = []
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"# floors on {name}, torch {torch.__version__}, {args.preset} model, pool {pool.to_dict()}", flush=True)
    report = {"device": name, "torch": torch.__version__, "preset": args.preset, "pool": pool.to_dict(),
              "steps": args.steps, "results": rows}
    for px in (int(s) for s in args.sizes.split(",")):
        for plan_name in plans_named(args.plans):
            plan = ParallelConfig(**PLANS[plan_name])
            for rank in ranks_of(plan, args.ranks):
                t0 = time.perf_counter()
                try:
                    row = bench.measure(plan_name, px, args.steps, args.warm_steps, rank)
                except Exception as e:  # noqa: BLE001 - report and go on with the next plan
                    print(f"{px}² {plan_name} rank {rank}: failed after {time.perf_counter() - t0:.1f} s: "
                          f"{type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append(row)
                _write(args.out, report)                 # after every row: a killed run keeps what it measured
                g = row["cuda_graphs"]
                graphs = "" if g is None else f", CUDA graphs recorded {g['captures']}, failed {g['failures']}"
                print(f"{px}² {plan_name:<16} rank {rank}: {row['ms_per_step']:7.2f} ms/step (warm-up job "
                      f"{row['warm_job_seconds']:.1f} s, set-up {1000 * row['setup_seconds']:.0f} ms{graphs}; "
                      f"attention {row['backend']})", flush=True)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    report = collect(args)
    print(table(report["results"], measured_steps(args.compare)))
    _write(args.out, report)
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
