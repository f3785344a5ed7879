#!/usr/bin/env bash
# One call on nvidia-h100-x1: the fused Triton kernels (model/kernels.py) -- latents and ms per step with and
# without them (compiled, CUDA graphs, batch 2 and 1), where a compiled step's GPU time goes with and without
# them, and the pool benchmark on one GPU (kernels on, the default). Usage: bash bench/device_x1_fused.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 200 python3 bench/gpu_checks.py --only fused --graph-steps 50 2>&1 | tee "$out/fused.log"
timeout 170 python3 bench/profile_step.py --variants compiled+pad+gelu,compiled+pad+gelu+fused --profile --rows 45 \
  2>&1 | tee "$out/profile_fused.log"
timeout 170 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1 --sizes 1024 --steps 50 --repeats 2 --compile on \
  --configs serial --out "$out/x1" 2>&1 | tee "$out/bench_x1.log"
