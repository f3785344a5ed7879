"""`python -m comfyui_xdit_hunyuan bench`: latency of every parallel configuration that fits the visible
devices, on a warm worker pool, eager and compiled; a table, JSON, a chart in the style of the seed's
figures, and the best configuration per (device count, resolution) for the "auto" strategy.

A job is what a ComfyUI user queues: random full-size HunyuanDiT v1.2 weights (or --ckpt), CFG on
(guidance 5, a negative and a positive prompt), euler / normal, one image. Latency is measured from
submitting the job to having the final latent back in the client process (pool overhead included).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from .job import Job, WeightsRef
from .compile_cache import default_root
from .config import PoolConfig, env_overrides, parse_devices
from .plan import AUTO_TABLE, ParallelConfig
from .tiny import preset as model_preset, random_cond

GUIDANCE = 5.0          # the classifier-free guidance scale of every measured job (KSampler's cfg)


def degree_configs(n: int, num_heads: int = 16, depth: int = 40) -> list[dict]:
    """Every degree set (cfg_degree, pipefusion_degree, ring_degree, ulysses_degree) with product n that the
    engine accepts for a model of `num_heads` heads and `depth` blocks, most useful first."""
    out = []
    for c, pp, r, u in itertools.product((1, 2), (1, 2, 4, 8), range(1, n + 1), (1, 2, 4, 8, 16)):
        if c * pp * r * u != n or num_heads % u or pp > depth // 2:
            continue
        out.append(dict(cfg_degree=c, pipefusion_degree=pp, ring_degree=r, ulysses_degree=u))
    return sorted(out, key=lambda d: (-d["cfg_degree"], d["ring_degree"], d["pipefusion_degree"]))


def config_name(d: dict) -> str:
    parts = [f"{k}{v}" for k, v in (("cfg", d["cfg_degree"]), ("pp", d["pipefusion_degree"]),
                                      ("ring", d["ring_degree"]), ("ulysses", d["ulysses_degree"])) if v > 1]
    return "x".join(parts) or "serial"


def bench_job(arch, pixels: int, steps: int, seed: int, weights: WeightsRef) -> Job:
    """The measured job for a model of architecture `arch` (model.HunyuanDiTConfig): a pixels² image."""
    from . import sampling
    ms = sampling.DiscreteVSampling.for_model(arch)
    lat = torch.zeros(1, arch.in_channels, pixels // 8, pixels // 8)
    hw = (pixels, pixels)
    return Job(weights=weights, positive=[random_cond(arch, 1, hw=hw)], negative=[random_cond(arch, 2, hw=hw)],
               latent=lat, noise=sampling.prepare_noise(lat, seed),
               sigmas=sampling.calculate_sigmas(ms, "normal", steps), sampler="euler", guidance=GUIDANCE, seed=seed)


def measure(client, job: Job, plan: ParallelConfig, repeats: int) -> dict:
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = client.run(job, plan)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "all_seconds": times, "latent": out}


def run_bench(args) -> dict:
    from .worker.client import PoolClient

    devices = parse_devices(args.devices)
    counts = [int(x) for x in args.gpus.split(",")] if args.gpus else sorted({1, 2, 4, 8, len(devices)} & set(range(1, len(devices) + 1)))
    sizes = [int(s) for s in args.sizes.split(",")]
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    arch = model_preset(args.preset)
    weights = WeightsRef(f"{args.ckpt or 'random:0:' + args.preset}", args.ckpt or f"random:0:{args.preset}")
    wanted = set(args.configs.split(",")) if args.configs else None
    results, reference = [], {}
    for compiled in compile_modes:
        for n in counts:
            # one pool per device count: a change of degrees runs on the same warm workers
            pool_config = PoolConfig(devices=",".join(devices[:n]) if devices[0] != "cpu" else f"cpu:{n}",
                                     compile=compiled, dtype=args.dtype, attention=args.attention,
                                     cache_dir=str(default_root()),
                                     # measured as asked: compiled jobs compile in the workers, never eager;
                                     # no spare's warm-up next to the measured jobs
                                     background_compile=False,
                                     spare_workers="off").with_overrides(env_overrides(os.environ))
            t_start = time.perf_counter()
            try:
                client = PoolClient(pool_config, hang_timeout=args.hang_timeout,
                                    startup_timeout=args.startup_timeout).start()
                pool_start = time.perf_counter() - t_start
            except Exception as e:  # noqa: BLE001 - report and go on with the sweep
                print(f"  {n} devices: pool failed to start: {e}")
                continue
            try:
                for i_deg, deg in enumerate(degree_configs(n, arch.num_heads, arch.depth)):
                    name = config_name(deg)
                    if wanted and name not in wanted:
                        continue
                    config = ParallelConfig(strategy="manual", **deg)
                    for i_size, px in enumerate(sizes):
                        job = bench_job(arch, px, args.steps, args.seed, weights)
                        warm = job if args.warmup_job_steps <= 0 else \
                            bench_job(arch, px, args.warmup_job_steps, args.seed, weights)
                        first = None
                        try:
                            t0 = time.perf_counter()
                            client.run(warm, config)
                            first = time.perf_counter() - t0
                            m = measure(client, job, config, args.repeats)
                        except Exception as e:  # noqa: BLE001
                            print(f"  {name} {px}px: failed: {e}")
                            continue
                        cold = pool_start if i_size == 0 and i_deg == 0 else None
                        row = {"devices": n, "config": name, "degrees": deg, "pixels": px, "steps": args.steps,
                               "compiled": compiled, "seconds": m["seconds"], "all_seconds": m["all_seconds"],
                               "first_job_seconds": first, "first_job_steps": len(warm.sigmas) - 1,
                               "pool_start_seconds": cold,
                               # a cold pool: process start, NCCL, weights, compilation, the first image
                               "cold_first_image_seconds": cold + first if cold is not None and warm is job
                               else None,
                               "ms_per_step": 1000 * m["seconds"] / args.steps,
                               "ranks": client.last_stats.get("ranks"),
                               "overhead_parts": client.last_stats.get("overhead")}
                        jobs = [r.get("job_seconds") for r in row["ranks"] or [] if r.get("job_seconds")]
                        # submit -> latent back, beyond the ranks' own job time (of the last timed run)
                        row["pool_overhead_seconds"] = m["all_seconds"][-1] - max(jobs) if jobs else None
                        key = (px, compiled)
                        if n == 1:
                            reference[key] = (m["seconds"], m["latent"])
                        if key in reference:
                            base_s, base_lat = reference[key]
                            row["speedup_vs_1gpu"] = base_s / m["seconds"]
                            if m["latent"] is not None and base_lat is not None:
                                row["rel_diff_vs_1gpu"] = float((m["latent"] - base_lat).norm() / base_lat.norm())
                        results.append(row)
                        print(f"  {n} dev  {name:<22} {px}px {'compiled' if compiled else 'eager   '} "
                              f"{m['seconds']:7.3f} s  ({row['ms_per_step']:.1f} ms/step)"
                              + (f"  x{row['speedup_vs_1gpu']:.2f}" if "speedup_vs_1gpu" in row else "")
                              + (f"  diff {row['rel_diff_vs_1gpu']:.2e}" if "rel_diff_vs_1gpu" in row else "")
                              + (f"  pool overhead {1000 * row['pool_overhead_seconds']:.0f} ms"
                                 if row["pool_overhead_seconds"] is not None else "")
                              + ("  (" + ", ".join(f"{k} {1000 * v:.0f}" for k, v in row["overhead_parts"].items()
                                                  if v is not None) + " ms)" if row["overhead_parts"] else ""),
                              flush=True)
            finally:
                client.close()
    return {"device": _device_name(devices), "preset": args.preset, "steps": args.steps, "results": results}


def _device_name(devices: list[str]) -> str:
    if devices and devices[0].startswith("cuda") and torch.cuda.is_available():
        return f"{len(devices)} x {torch.cuda.get_device_name(0)}"
    return f"{len(devices)} CPU processes"


def best_table(report: dict) -> dict:
    """Fastest configuration per (device count, resolution bucket, with guidance: "cfg") for plan.auto_degrees."""
    best: dict[str, tuple[float, dict]] = {}
    for r in report["results"]:
        res = "2048" if r["pixels"] >= 1536 else "1024"
        key = f"{r['devices']}:{res}:cfg"
        if key not in best or r["seconds"] < best[key][0]:
            best[key] = (r["seconds"], r["degrees"])
    return {k: v[1] for k, v in sorted(best.items())}


def chart(report: dict, path: Path) -> bool:
    """Latency per configuration, grouped by device count, one panel per resolution (seed's style). Of rows
    measured more than once (merged runs), the first is drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    rows = report["results"]
    sizes = sorted({r["pixels"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 4.5), squeeze=False)
    for ax, px in zip(axes[0], sizes):
        sel = [r for r in rows if r["pixels"] == px]
        labels = sorted({(r["devices"], r["config"]) for r in sel})
        xs = range(len(labels))
        for k, compiled in enumerate((False, True)):
            vals = []
            for lab in labels:
                m = [r["seconds"] for r in sel if (r["devices"], r["config"]) == lab and r["compiled"] == compiled]
                vals.append(m[0] if m else math.nan)
            ax.bar([x + 0.4 * k for x in xs], vals, width=0.4, label="compiled" if compiled else "eager")
            for x, v in zip(xs, vals):
                if not math.isnan(v):
                    ax.text(x + 0.4 * k, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks([x + 0.2 for x in xs])
        ax.set_xticklabels([f"{n} GPU\n{c}" for n, c in labels], fontsize=7)
        steps = sorted({r["steps"] for r in sel})
        ax.set_ylabel(f"seconds, {'/'.join(map(str, steps))} steps")
        ax.set_title(f"HunyuanDiT {px}x{px}, {report['device']}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def table(report: dict) -> str:
    lines = ["| devices | config | size | steps | mode | seconds | ms/step | x 1 GPU | rel. diff | cold first image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        cold = r.get("cold_first_image_seconds")
        lines.append(f"| {r['devices']} | {r['config']} | {r['pixels']}² | {r['steps']} "
                     f"| {'compiled' if r['compiled'] else 'eager'} "
                     f"| {r['seconds']:.3f} | {r['ms_per_step']:.1f} | {r.get('speedup_vs_1gpu', float('nan')):.2f} "
                     f"| {r.get('rel_diff_vs_1gpu', float('nan')):.1e} | {f'{cold:.1f} s' if cold else '-'} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="all", help="devices to sweep over (default: all visible GPUs)")
    p.add_argument("--gpus", default="", help="device counts to measure, e.g. '1,2' (default: 1, 2, 4, 8 up to all)")
    p.add_argument("--sizes", default="1024,2048", help="square image sizes in pixels, comma separated")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (median reported)")
    p.add_argument("--warmup-job-steps", type=int, default=0,
                   help="steps of the untimed first job (loads, compiles); 0: the full job, which also times a "
                        "cold pool's first image")
    p.add_argument("--compile", choices=("off", "on", "both"), default="both")
    p.add_argument("--configs", default="", help="only these configurations, e.g. 'serial,cfg2,ulysses2'")
    p.add_argument("--preset", default="full", help="random model preset when no --ckpt (default: full)")
    p.add_argument("--ckpt", default="", help="a HunyuanDiT checkpoint instead of random weights")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench", help="folder for bench.json and bench.png")
    p.add_argument("--save-auto", action="store_true", help=f"write the best configurations to {AUTO_TABLE.name}")
    p.add_argument("--hang-timeout", type=float, default=60.0,
                   help="seconds without a step before a configuration is reported stuck (stacks are printed)")
    p.add_argument("--from", dest="from_json", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: merge these bench.json files (e.g. from several machines' runs) into "
                        "one table, chart and JSON under --out (with --save-auto, the auto table)")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds for a pool to start and a job to reach its first step (compilation included)")


def merge(paths: list[str]) -> dict:
    """One report from several: rows keep the speed-up and difference measured against the 1-GPU run of
    their own call; each row records the file it came from."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    rows = [dict(r, run=_run_name(Path(p))) for p, rep in zip(paths, reports) for r in rep["results"]]
    devices = sorted({rep["device"] for rep in reports})
    return {"device": " / ".join(devices), "preset": reports[0]["preset"], "steps": reports[0]["steps"],
            "results": rows}


def _run_name(path: Path) -> str:
    """A run's label: its folder for a bench.json as written by a run, else the file's own name."""
    return (path.parent.name or path.stem) if path.name == "bench.json" else path.stem


def main(args) -> int:
    report = merge(args.from_json) if getattr(args, "from_json", None) else run_bench(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    chart(report, out / "bench.png")
    print(table(report))
    if args.save_auto:
        AUTO_TABLE.write_text(json.dumps(best_table(report), indent=1))
    return 0
