#!/usr/bin/env bash
# Call B on nvidia-h100-x2: the compiled sweep of every 2-GPU config at 1024^2, 50 steps, with its own
# 1-GPU baseline. Usage: bash bench/device_x2_b.sh OUT
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 560 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 2 --compile on \
  --configs serial,cfg2,ulysses2,ring2,pp2 --hang-timeout 60 --startup-timeout 200 --out "$out/c1024" 2>&1 \
  | tee "$out/c1024.log"
