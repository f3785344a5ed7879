#!/usr/bin/env bash
# One call on nvidia-h100-x1: the fused Triton kernels (model/kernels.py) -- each kernel's launch
# configurations, latents and ms per step with and without them (compiled, CUDA graphs, batch 2 and 1), and
# where a compiled step's GPU time goes with and without them. Usage: bash bench/device_x1_fused.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 120 python3 bench/kernel_bench.py 2>&1 | tee "$out/kernel_bench.log"
timeout 200 python3 bench/gpu_checks.py --only fused --graph-steps 50 2>&1 | tee "$out/fused.log"
timeout 170 python3 bench/profile_step.py --variants compiled+pad+gelu,compiled+pad+gelu+fused --profile --rows 45 \
  2>&1 | tee "$out/profile_fused.log"
