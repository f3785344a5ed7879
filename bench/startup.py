"""Where a GPU worker's start and first job go before its steps, measured in fresh processes on one GPU.

    python bench/startup.py [--device cuda:0] [--size 1024] [--steps 10]

Cases, each a new Python process:
  import torch            `python -c "import torch"`, the image's bytecode as it is, then with a
                          PYTHONPYCACHEPREFIX written once (cold) and read (warm);
  first job, cold         a worker's path (import, CUDA context, RankRuntime) then a first job of the
                          full model (random v1.2 weights, fp16, eager, CUDA graphs, fused kernels), with an
                          empty Triton cache;
  first job, warmed up    the same after a warm-up job (`worker.warmup`: two blocks of the full width on
                          random weights, a small image), empty Triton cache at the start;
  first job, warm cache   the same without a warm-up, the Triton cache of the warmed-up case.
Each prints its phases (seconds) and the first job's first-step and other-steps seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from comfyui_xdit_hunyuan.parallel.runtime import RankRuntime
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.bench import bench_job
from comfyui_xdit_hunyuan.job import WeightsRef
from comfyui_xdit_hunyuan.tiny import preset, random_model
out = {"imports": time.perf_counter() - t0}
a = json.loads(sys.argv[1])
t = time.perf_counter()
torch.cuda.set_device(a["device"]); torch.empty(1, device=a["device"])
out["cuda"] = time.perf_counter() - t
pool = PoolConfig(devices=a["device"], dtype="fp16", compile=False)
if a["warmup"]:
    from comfyui_xdit_hunyuan.worker.warmup import warm_up
    t = time.perf_counter()
    out["warmup_phases"] = warm_up(pool, a["device"], dtypes=("fp16",))
    out["warmup"] = time.perf_counter() - t
t = time.perf_counter()
rt = RankRuntime(pool, 0, 1, a["device"])
out["runtime"] = time.perf_counter() - t
t = time.perf_counter()
arch = preset("full")
w = {k: v.to("cpu") for k, v in random_model("full", seed=0, dtype=torch.float16, device=a["device"]).state_dict().items()}
torch.cuda.synchronize()
out["random weights (not a worker's)"] = time.perf_counter() - t
steps = []
last = [time.perf_counter()]
def report(info):
    if info.get("type", "progress") == "progress":
        now = time.perf_counter(); steps.append(now - last[0]); last[0] = now
job = bench_job(arch, a["size"], a["steps"], 0, WeightsRef("probe", w))
t = last[0] = time.perf_counter()
rt.run(job, ParallelConfig(), report=report, cancel_requested=lambda: False)
torch.cuda.synchronize()
out["job"] = time.perf_counter() - t
st = rt.stats()
out["setup_phases"] = st.get("setup_phases")
out["weights"] = st.get("weights_seconds")
out["first_step"] = steps[0] if steps else None
out["other_steps"] = sum(steps[1:])
print("RESULT " + json.dumps(out))
"""


def _run(cmd, env) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
    return time.perf_counter() - t, p.stdout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv)
    env = dict(os.environ)
    prefix = tempfile.mkdtemp(prefix="xdit-pyc-")
    for name, extra in (("import torch, bytecode as shipped", {}),
                        ("import torch, bytecode prefix cold", {"PYTHONPYCACHEPREFIX": prefix}),
                        ("import torch, bytecode prefix warm", {"PYTHONPYCACHEPREFIX": prefix})):
        s, _ = _run([sys.executable, "-c", "import torch"], {**env, **extra})
        print(f"{name:<42} {s:6.2f} s", flush=True)
    # a worker's own imports, to write the prefix for the cases below
    _run([sys.executable, "-c", "import comfyui_xdit_hunyuan.parallel.runtime, comfyui_xdit_hunyuan.worker.warmup"],
         {**env, "PYTHONPYCACHEPREFIX": prefix})
    cache = tempfile.mkdtemp(prefix="xdit-triton-")
    rows = {}
    for name, warm, triton in (("first job, cold", False, tempfile.mkdtemp(prefix="xdit-triton-")),
                               ("first job, warmed up", True, cache),
                               ("first job, warm cache", False, cache)):
        args = json.dumps({"device": a.device, "size": a.size, "steps": a.steps, "warmup": warm})
        s, out = _run([sys.executable, "-c", CHILD, args],
                      {**env, "PYTHONPYCACHEPREFIX": prefix, "TRITON_CACHE_DIR": triton})
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        rows[name] = json.loads(line[7:]) if line else None
        print(f"{name:<42} {s:6.2f} s  {rows[name]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
