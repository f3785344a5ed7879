#!/usr/bin/env bash
# Next call on nvidia-h100-x2 (about 7 minutes): the rows not re-measured since GPU ranks cap their CPU
# threads and Ulysses / Ring are graphed: 2048^2 (10 steps) serial, ulysses2, ring2, pp2, and pp2 at
# 1024^2 (50 steps), each with its 1-GPU baseline. Usage: bash bench/device_x2_e.sh OUT
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 330 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 2048 --steps 10 --repeats 2 --compile on \
  --configs serial,ulysses2,ring2,pp2 --hang-timeout 60 --startup-timeout 200 --out "$out/c2048" 2>&1 | tee "$out/c2048.log"
timeout 200 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 1 --compile on \
  --configs serial,pp2 --hang-timeout 60 --startup-timeout 200 --out "$out/c1024" 2>&1 | tee "$out/c1024.log"
