#!/usr/bin/env bash
# Call A on nvidia-h100-x2: the fault and load guarantees on GPUs (cfg2 then ulysses2, NCCL, CUDA graphs
# on), then the compiled sweep of every 2-GPU config at 2048^2 (10 steps). Usage: bash bench/device_x2_a.sh OUT
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 200 python3 bench/device_faults.py --devices all --preset full --size 1024 --jobs 12 --hang-timeout 30 2>&1 \
  | tee "$out/faults.log"
timeout 380 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 2048 --steps 10 --repeats 2 --compile on \
  --configs serial,cfg2,ulysses2,ring2,pp2 --hang-timeout 60 --startup-timeout 200 --out "$out/c2048" 2>&1 \
  | tee "$out/c2048.log"
