#!/usr/bin/env bash
# One call on nvidia-h100-x1 (diffusers wheels carried in .whl and installed first by the caller):
# CUDA graphs of the model call (same latent, step time at batch 2 and 1), the pool benchmark on one GPU
# (compiled, graphs on), a step under max-autotune-no-cudagraphs, and diffusers' compiled model in the
# same call. Usage: bash bench/device_x1_graphs.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 150 python3 bench/gpu_checks.py --only graphs --graph-steps 20 2>&1 | tee "$out/graphs.log"
timeout 170 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1 --sizes 1024 --steps 50 --repeats 2 --compile on \
  --configs serial --out "$out/x1" 2>&1 | tee "$out/bench_x1.log"
XDIT_HUNYUAN_COMPILE_MODE=max-autotune-no-cudagraphs timeout 150 python3 bench/profile_step.py \
  --variants compiled+pad+gelu 2>&1 | tee "$out/autotune.log"
timeout 170 python3 bench/diffusers_baseline.py --compile 2>&1 | tee "$out/diffusers.log"
