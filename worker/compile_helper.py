"""The compile helper: a short-lived process that fills the compile cache for a cold pool while the workers run
its first jobs eager (PoolConfig.background_compile; the client's side is worker/background.py).

    python -P -m comfyui_xdit_hunyuan.worker.compile_helper --config JSON --device cuda:0 --job PATH \
        --parent-pid N

It runs what rank 0 of the job's plan runs (`parallel.mesh.standin_mesh`: the same RankRuntime, Runner and
compiled blocks, every collective stood in), on random weights of the job's architecture in the pool's dtype,
for one step of the job (`--job`: a pickle of {"job": Job without weights, "plan": ParallelConfig, "arch":
HunyuanDiTConfig}). torch.compile writes what it compiled into the cache folders of its environment
(TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, as the workers'), where the workers find it. Exit status 0: the
cache holds the compiled code. It dies with its parent (Linux), and the client kills it when the pool closes.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import replace


def _parse(argv):
    p = argparse.ArgumentParser(prog="compile_helper")
    p.add_argument("--config", required=True, help="config.PoolConfig as JSON")
    p.add_argument("--device", required=True)
    p.add_argument("--job", required=True, help="pickle of the job (no weights), its plan and the architecture")
    p.add_argument("--parent-pid", type=int, required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    from .processes import exit_with_parent
    exit_with_parent(args.parent_pid)
    import torch

    from ..config import PoolConfig
    from ..job import WeightsRef
    from ..parallel.mesh import standin_mesh
    from ..parallel.runtime import RankRuntime, resolve_dtype
    from ..tiny import random_model

    with open(args.job, "rb") as f:
        spec = pickle.load(f)
    pool = PoolConfig(**json.loads(args.config))
    plan, arch = spec["plan"], spec["arch"]
    runtime = RankRuntime(pool, 0, plan.world_size, args.device, mesh_builder=standin_mesh)
    weights = random_model(arch, seed=0, dtype=resolve_dtype(pool.dtype, torch.device(args.device)),
                           device=args.device).state_dict()
    job = replace(spec["job"], weights=WeightsRef("compile-helper", weights), sigmas=spec["job"].sigmas[:2],
                  step_noises=None, preview_every=0)
    runtime.run(job, plan, report=lambda msg: None, cancel_requested=lambda: False)
    print(f"compile helper: compiled for {plan.describe()} on {args.device}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
