#!/usr/bin/env bash
# One call on nvidia-h100-x2: the engine on NCCL without the pool (every 2-GPU mode, stacks on a stall),
# then the compiled pool benchmark at 1024^2, 50 steps, 1 and 2 GPUs. Usage: bash bench/device_x2.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 180 python3 bench/nccl_probe.py --steps 3 --watchdog 60 2>&1 | tee "$out/probe.log"
timeout 390 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 1 --compile on \
  --configs serial,cfg2,ulysses2,ring2,pp2 --hang-timeout 30 --startup-timeout 150 --out "$out/c1024" 2>&1 | tee "$out/c1024.log"
