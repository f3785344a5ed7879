"""A GPU worker's warm-up before its first job: what a first job pays once per process (cuBLAS and the
attention library loading their kernels, the fused Triton kernels compiling into the Triton cache or loading
from it, the job code's lazy imports) paid ahead, on a model of four blocks of the full width.

A spare worker (worker/spares.py) runs it while it waits to be given a pool, so that a pool's first image
finds all of that done. Nothing it builds is kept: its model, runtime and CUDA graphs are dropped and the
memory given back; only the process-wide state (loaded libraries, Triton's compiled kernels in memory and in
its cache folder) remains, which is what the first job would otherwise make.

One case per dtype (most likely first: ComfyUI runs HunyuanDiT in fp16 on most GPUs): rank 0's share of
the serial plan, a 256² image, two steps. The fused kernels are compiled for any row count
(model/kernels.py, ROW_COUNTS), so these kernels serve every image size and CFG split; another plan's
(Ulysses' heads per rank) compile at its first job.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

WARMUP_PIXELS = 256        # 16 x 16 patches
WARMUP_DEPTH = 4           # blocks 0-2 plain, block 3 with the skip merge (HunyuanDiT's skips start after half)


def warm_up(pool, device: str, *, dtypes: tuple[str, ...] = ("fp16", "bf16"),
            stop: Callable[[], bool] = lambda: False, arch=None) -> dict[str, float]:
    """Run the warm-up job on `device` (a device of this process) in each dtype; returns seconds per dtype.
    `stop()` is asked before each: True ends the warm-up (a pool wants this worker now). `pool`: the
    config.PoolConfig it runs under (dtype and compile replaced: warm-up jobs run eager). `arch`: the model's
    architecture (default: the full width, WARMUP_DEPTH blocks; tests pass a tiny one)."""
    import torch

    from ..bench import bench_job
    from ..job import WeightsRef
    from ..parallel.runtime import DTYPES, RankRuntime
    from ..plan import ParallelConfig
    from ..tiny import preset, random_model

    arch = arch or replace(preset("full"), depth=WARMUP_DEPTH)
    cuda = torch.device(device).type == "cuda"
    seconds: dict[str, float] = {}
    for dtype in dtypes:
        if stop():
            break
        t0 = time.perf_counter()
        runtime = RankRuntime(replace(pool, dtype=dtype, compile=False, profile_dir=None), 0, 1, device)
        model = random_model(arch, seed=0, dtype=DTYPES[dtype], device=device)
        job = bench_job(arch, WARMUP_PIXELS, 2, 0, WeightsRef(f"warm-up:{dtype}", model.state_dict()))
        runtime.run(job, ParallelConfig(strategy="manual"), report=lambda msg: None, cancel_requested=lambda: False)
        if cuda:
            torch.cuda.synchronize(device)
        del runtime, model, job
        seconds[dtype] = time.perf_counter() - t0
    if cuda:
        torch.cuda.empty_cache()
    return seconds
