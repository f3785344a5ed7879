"""The fault and load guarantees on real devices (the CPU tests prove them with gloo workers):

    python bench/device_faults.py [--devices all] [--preset full] [--size 1024] [--jobs 20]

On the pool of the given devices (on two: cfg 2, or ulysses 2 / ring 2 with --first; NCCL on GPUs), with the
real engine:
1. load: --jobs consecutive jobs of varying size, seed and sampler, the degrees changed half-way; each
   equals the same job run before under the same degrees; worker RSS and GPU memory (allocated / reserved)
   after the first four jobs (one of each kind) and after the last;
2. cancel mid-job: every rank stops at the same step, the next job equals its reference;
3. SIGKILL one worker mid-job: seconds until the caller gets the error; the next job runs on a fresh pool
   and equals its reference;
4. SIGSTOP one worker mid-job: seconds until the hang timeout reports it; recovery;
5. the parent process killed mid-job: seconds until every worker process is gone.
Prints one line per check and exits 1 if any failed. Also runs on CPU workers (--devices cpu:2 --preset
tiny --size 128) as a check of this script.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


from comfyui_xdit_hunyuan.bench import bench_job  # noqa: E402
from comfyui_xdit_hunyuan.job import Job, JobCancelled, PoolError, WeightsRef  # noqa: E402
from comfyui_xdit_hunyuan.config import PoolConfig, parse_devices  # noqa: E402
from comfyui_xdit_hunyuan.plan import ParallelConfig  # noqa: E402
from comfyui_xdit_hunyuan.worker.client import PoolClient  # noqa: E402
from comfyui_xdit_hunyuan.tiny import preset  # noqa: E402

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)


def make_job(a, pixels: int, seed: int, sampler: str = "euler", steps: int | None = None) -> Job:
    ref = f"random:0:{a.preset}"
    return replace(bench_job(preset(a.preset), pixels, steps or a.steps, seed, WeightsRef(ref, ref)), sampler=sampler)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def memory(stats: dict) -> tuple[int, int, int]:
    ranks = stats.get("ranks") or []
    return (max(r.get("rss_bytes") or 0 for r in ranks), max(r.get("gpu_allocated_bytes") or 0 for r in ranks),
            max(r.get("gpu_reserved_bytes") or 0 for r in ranks))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def kill_during(client, job, plan, sig, at_step: int = 2) -> tuple[str, float]:
    pids, t = client.pids, []

    def on_progress(step, total, preview):
        if step == at_step and not t:
            os.kill(pids[-1], sig)
            t.append(time.monotonic())
    try:
        client.run(job, plan, on_progress=on_progress)
        return "no error", 0.0
    except PoolError as e:
        return str(e).splitlines()[0], time.monotonic() - t[0]
    finally:
        if sig == signal.SIGSTOP:
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGCONT)


def parent_child(a) -> None:
    """Runs in a child process: start a pool, report the worker pids, run a long job (killed meanwhile)."""
    client = PoolClient(pool_for(a)).start()
    print("PIDS", *client.pids, flush=True)
    client.run(make_job(a, a.size, 0, steps=10_000), plan_for(a))


def plan_for(a, first: str | None = None) -> ParallelConfig:
    """The plan of the checks: on two devices the degree `--first` names (cfg 2, ulysses 2 or ring 2); on more,
    cfg 2 x ulysses."""
    n = len(parse_devices(a.devices))
    first = first or a.first
    if n == 2:
        return ParallelConfig(strategy="manual", **{f"{first}_degree": 2})
    return ParallelConfig(strategy="manual", cfg_degree=2 if n > 2 else 1, ulysses_degree=n // 2 if n > 2 else 1)


def pool_for(a) -> PoolConfig:
    return PoolConfig(devices=a.devices, compile=a.compile, spare_workers="off")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="all")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--hang-timeout", type=float, default=20.0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--first", choices=("cfg", "ulysses", "ring"), default="cfg",
                    help="on two devices: the degree of the first half and of the fault checks (then the next one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        parent_child(a)
        return 0
    plan = plan_for(a)
    client = PoolClient(pool_for(a), hang_timeout=a.hang_timeout).start()
    sizes = [a.size, a.size - 64, a.size + 64 if a.size < 2048 else a.size - 128]
    refs: dict[tuple, torch.Tensor] = {}
    try:
        # 1. load: four distinct jobs in turn, the degrees changed half-way (the mesh changes, the pool stays)
        first_mem = None
        nxt = {"cfg": "ulysses", "ulysses": "ring", "ring": "cfg"}[a.first]
        other = plan_for(a, nxt) if plan.world_size == 2 else \
            replace(plan, cfg_degree=1, ulysses_degree=plan.world_size) if plan.world_size > 1 else plan
        for i in range(a.jobs):
            p = plan if i < a.jobs // 2 else other
            key = [(sizes[0], 0, "euler"), (sizes[1], 1, "dpmpp_2m"), (sizes[2], 2, "euler_ancestral"),
                   (sizes[0], 3, "heun")][i % 4]
            out = client.run(make_job(a, *key), p)
            if i == min(3, a.jobs - 1):
                # after one job of every kind: the CUDA graphs of each shape (a bounded cache) are recorded
                first_mem = memory(client.last_stats)
            ref = refs.setdefault((p.describe(), key), out)
            if ref is not out:
                d = rel(out, ref)
                check(d <= 1e-6, f"load job {i + 1}/{a.jobs} ({p.describe()}, {key}): equals the same job run "
                                 f"before (rel diff {d:.1e})")
        last = memory(client.last_stats)
        mib = [(y - x) / 2**20 for x, y in zip(first_mem, last)]     # jobs 5.. against job 4
        check(mib[0] < 256 and mib[1] < 64 and mib[2] < 512,
              f"memory growth over {a.jobs} jobs: RSS {mib[0]:+.0f} MiB, GPU allocated {mib[1]:+.0f} MiB, "
              f"reserved {mib[2]:+.0f} MiB (bounds 256 / 64 / 512)")
        key = (sizes[0], 0, "euler")
        # 2. cancel
        steps_seen = []
        try:
            client.run(make_job(a, *key, steps=30), plan, on_progress=lambda s, t, p: steps_seen.append(s),
                       cancel=lambda: len(steps_seen) >= 3)
            check(False, "cancel: the job was not cancelled")
        except JobCancelled as e:
            check(max(steps_seen) <= 4, f"cancel: stopped after step {max(steps_seen)} (asked at 3): {e}")
        d = rel(client.run(make_job(a, *key), plan), refs[(plan.describe(), key)])
        check(d <= 1e-6, f"after cancel: the next job equals its reference (rel diff {d:.1e})")
        # 3. SIGKILL, 4. SIGSTOP
        for sig, bound in ((signal.SIGKILL, 10.0), (signal.SIGSTOP, a.hang_timeout + 10.0)):
            msg, waited = kill_during(client, make_job(a, *key, steps=200), plan, sig)
            check(0 < waited < bound, f"{sig.name} on a worker mid-job: error after {waited:.1f} s "
                                      f"(bound {bound:.0f} s): {msg[:140]}")
            t0 = time.monotonic()
            d = rel(client.run(make_job(a, *key), plan), refs[(plan.describe(), key)])
            check(d <= 1e-6, f"after {sig.name}: a fresh pool ({time.monotonic() - t0:.1f} s with start-up) gives "
                             f"the reference (rel diff {d:.1e})")
    finally:
        pids = client.pids
        client.close()
        check(not any(alive(p) for p in pids), "close(): no worker left")
    # 5. the parent killed
    child = subprocess.Popen([sys.executable, __file__, "--child", "--devices", a.devices, "--preset", a.preset,
                              "--size", str(a.size), "--first", a.first] + (["--compile"] if a.compile else []),
                             stdout=subprocess.PIPE, text=True)
    pids = []
    for line in child.stdout:
        if line.startswith("PIDS"):
            pids = [int(p) for p in line.split()[1:]]
            break
    time.sleep(3.0)                          # the long job is running
    child.kill()
    t0 = time.monotonic()
    while any(alive(p) for p in pids) and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    gone = time.monotonic() - t0
    check(bool(pids) and gone < 10.0, f"parent killed mid-job: every worker gone after {gone:.1f} s (bound 10 s)")
    print("FAILED:" if FAILED else "all checks passed", *FAILED, sep="\n  " if FAILED else "")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
