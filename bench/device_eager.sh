#!/usr/bin/env bash
# One call on a 2-GPU machine: kernel checks, then the eager sweep at 1024^2 (50 steps) and 2048^2 (10 steps).
# Usage: bash bench/device_eager.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 150 python3 bench/gpu_checks.py --only attention,runner --skip-compile 2>&1 | tee "$out/gpu_checks.log"
timeout 240 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 1 --compile off \
  --configs serial,cfg2,ulysses2,ring2,pp2 --out "$out/eager1024" 2>&1 | tee "$out/eager1024.log"
timeout 200 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 2048 --steps 10 --repeats 1 --compile off \
  --configs serial,cfg2,ulysses2,ring2,pp2 --out "$out/eager2048" 2>&1 | tee "$out/eager2048.log"
