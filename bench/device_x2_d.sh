#!/usr/bin/env bash
# Call D on nvidia-h100-x2: ulysses2 and ring2 at 1024^2 (50 steps, compiled) with their collectives recorded
# in the CUDA graph of the model call, with the 1-GPU baseline. Usage: bash bench/device_x2_d.sh OUT
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 285 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 1 --compile on \
  --configs serial,ulysses2,ring2 --hang-timeout 45 --startup-timeout 150 --out "$out/g" 2>&1 | tee "$out/g.log"
