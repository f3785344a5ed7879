"""A whole model handed to a cold pool, side by side in one run: where the first image's seconds go before its
first step, by way of the weights' transfer (PoolConfig.weights_transfer), and what the first step costs.

    python bench/handover.py [--devices cuda:0] [--size 1024] [--out out/handover.json]

The client holds random full-size HunyuanDiT v1.2 weights as a state dict in fp16 (what ComfyUI's loader
chose on an H200), as the node's PatchedStateDict hands them over. Cases, each on a fresh pool:
  file     the state dict staged in one safetensors file (/dev/shm), read by the workers;
  gpu      the same tensors (on the CPU) copied by the client to the worker's GPU, handed over by CUDA IPC;
  resident the tensors already on that GPU in the client (ComfyUI holds the model loaded), CUDA IPC;
all with compile off (a 2-step job), then two pools with compile on and the compile cache of this run: the
first compiles (cold), the second finds the cache warm (the first image after a restart), each with CUDA
graphs on and off. Prints the pool's own timings (start, staging, weights, first step) and checks that every
case's latent equals the file case's bit for bit.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from comfyui_xdit_hunyuan.bench import bench_job  # noqa: E402
from comfyui_xdit_hunyuan.config import PoolConfig  # noqa: E402
from comfyui_xdit_hunyuan.job import WeightsRef  # noqa: E402
from comfyui_xdit_hunyuan.plan import ParallelConfig  # noqa: E402
from comfyui_xdit_hunyuan.tiny import preset, random_model  # noqa: E402
from comfyui_xdit_hunyuan.worker.client import PoolClient  # noqa: E402


def one(name: str, pool: PoolConfig, weights: dict, size: int, steps: int, arch) -> dict:
    job = bench_job(arch, size, steps, 0, WeightsRef(f"handover:{name}", weights))
    t0 = time.perf_counter()
    client = PoolClient(pool, startup_timeout=600)      # started by its first job, as the node's pool is
    try:
        out = client.run(job, ParallelConfig())
        seconds = time.perf_counter() - t0
        s = client.last_stats
    finally:
        client.close()
    r0 = s["ranks"][0]
    rt = r0.get("runtime") or {}
    c = s.get("client_seconds") or {}
    steps_s = s.get("step_seconds") or []
    row = {"case": name, "seconds": seconds, "start": c.get("start_seconds"), "stage": c.get("stage_seconds"),
           "weights": rt.get("weights_seconds"), "load_phases": rt.get("load_phases"),
           "start_phases": r0.get("start_phases"), "first_step": steps_s[0] if steps_s else None,
           "other_steps": sum(steps_s[1:]), "sent": s.get("weights"), "latent": out}
    f = lambda x: "-" if x is None else f"{x:.2f}"   # noqa: E731
    print(f"  {name:<28} {seconds:6.2f} s   start {f(row['start'])} stage {f(row['stage'])} weights "
          f"{f(row['weights'])} first step {f(row['first_step'])} other {f(row['other_steps'])}   "
          f"load {rt.get('load_phases')}  shared {s.get('weights', {}).get('shared', 0)}", flush=True)
    if pool.compile and rt.get("compile_times"):
        lines = str(rt["compile_times"]).splitlines()
        print("    " + "\n    ".join(lines[:14]), flush=True)
    row["compile_times"] = rt.get("compile_times")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cuda:0")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50, help="steps of the compiled jobs (the others run 2)")
    ap.add_argument("--preset", default="full", help="full (the figures) or small (a CPU smoke run)")
    ap.add_argument("--out", default="out/handover.json")
    a = ap.parse_args(argv)
    arch = preset(a.preset)
    model = random_model(a.preset, seed=0, dtype=torch.float16, device="cpu")
    cpu = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del model
    print(f"handover: {sum(t.numel() * t.element_size() for t in cpu.values()) / 2**30:.2f} GiB in {len(cpu)} "
          f"tensors (fp16), {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}", flush=True)
    base = PoolConfig(devices=a.devices, dtype="fp16", compile=False, spare_workers="off")   # every pool cold
    file = PoolConfig(**{**base.to_dict(), "weights_transfer": "file"})
    # the machine's first GPU process reads cuDNN & co. from disk: a warm-up pool first
    first = one("warm-up (page cache, GPU)", file, cpu, a.size, 2, arch)
    rows = [one("file", file, cpu, a.size, 2, arch),
            one("gpu (client copies, IPC)", base, cpu, a.size, 2, arch)]
    if a.devices.startswith("cuda"):
        resident = {k: v.to(a.devices.split(",")[0]) for k, v in cpu.items()}
        rows.append(one("resident (IPC)", base, resident, a.size, 2, arch))
        del resident
        torch.cuda.empty_cache()
    compiled = PoolConfig(**{**base.to_dict(), "compile": True, "background_compile": False,
                             "cache_dir": tempfile.mkdtemp(prefix="xdit-handover-cache-")})
    rows.append(one("compile cold", compiled, cpu, a.size, a.steps, arch))
    rows.append(one("compile warm", compiled, cpu, a.size, a.steps, arch))
    profile = Path(a.out).with_suffix("")
    rows.append(one("compile warm, profiled", replace(compiled, profile_dir=str(profile / "warm")), cpu, a.size,
                    a.steps, arch))
    cold = replace(compiled, cache_dir=tempfile.mkdtemp(prefix="xdit-handover-cache-"),
                   profile_dir=str(profile / "cold"))
    rows.append(one("compile cold, profiled", cold, cpu, a.size, a.steps, arch))
    ref = rows[0]["latent"]
    for r in rows[1:]:
        same = r["latent"].shape == ref.shape and r["case"].startswith(("gpu", "resident"))
        if same:
            d = (r["latent"] - ref).abs().max().item()
            print(f"  {r['case']}: latent equals the file case's: {torch.equal(r['latent'], ref)} (max |diff| {d:.3g})")
    print(f"  file (second pool) vs warm-up (first): equal {torch.equal(rows[0]['latent'], first['latent'])}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{k: v for k, v in r.items() if k != "latent"} for r in rows], indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
