#!/usr/bin/env bash
# One call on nvidia-h100-x1 (diffusers wheels carried in .whl, installed first by the caller):
# where a step's time goes (variants), diffusers' HunyuanDiT2DModel eager and compiled in the same call,
# and the pool benchmark on one GPU (eager and compiled, cold first image). Usage: bash bench/device_x1.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 170 python3 bench/profile_step.py --profile --variants eager,eager+gelu,compiled,compiled+pad+gelu,graph 2>&1 | tee "$out/profile_b2.log"
timeout 90 python3 bench/profile_step.py --batch 1 --variants compiled+pad+gelu,graph 2>&1 | tee "$out/profile_b1.log"
timeout 30 python3 bench/diffusers_baseline.py 2>&1 | tee "$out/diffusers.log"
timeout 160 python3 bench/diffusers_baseline.py --compile 2>&1 | tee -a "$out/diffusers.log"
timeout 150 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1 --sizes 1024 --steps 50 --repeats 2 --compile both \
  --configs serial --out "$out/x1" 2>&1 | tee "$out/bench_x1.log"
