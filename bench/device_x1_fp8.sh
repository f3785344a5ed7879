#!/usr/bin/env bash
# One call on nvidia-h100-x1: dtype fp8 against bf16 -- ms per step and the final latent's difference
# (compiled, CUDA graphs, batch 2 and 1), where a compiled step's GPU time goes with and without FP8, and
# the pool benchmark on one GPU with --dtype fp8. Usage: bash bench/device_x1_fp8.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 200 python3 bench/gpu_checks.py --only fp8 --graph-steps 50 2>&1 | tee "$out/fp8.log"
timeout 170 python3 bench/profile_step.py --variants compiled+pad+gelu,compiled+pad+fp8 --profile --rows 45 \
  2>&1 | tee "$out/profile_fp8.log"
timeout 170 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1 --sizes 1024 --steps 50 --repeats 2 --compile on \
  --configs serial --dtype fp8 --out "$out/x1_fp8" 2>&1 | tee "$out/bench_x1_fp8.log"
