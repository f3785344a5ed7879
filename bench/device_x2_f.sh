#!/usr/bin/env bash
# On nvidia-h100-x2, with the fused Triton kernels (on by default on GPUs): every 2-GPU config and its 1-GPU
# baseline, compiled, in one call per size. Usage: bash bench/device_x2_f.sh OUT 1024|2048
set -u
out=${1:-bench/out}; size=${2:-1024}; mkdir -p "$out"
steps=$([ "$size" = 2048 ] && echo 10 || echo 50)
export PYTHONUNBUFFERED=1
timeout 570 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes "$size" --steps "$steps" --repeats 2 \
  --compile on --configs serial,cfg2,ulysses2,ring2,pp2 --hang-timeout 60 --startup-timeout 200 \
  --out "$out/c$size" 2>&1 | tee "$out/c$size.log"
