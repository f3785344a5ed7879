#!/usr/bin/env bash
# The next call on nvidia-h100-x2 (about 9 minutes): the fault and load guarantees on GPUs, then the
# compiled 2-GPU sweep at 1024^2 with blocks compiled as two halves around communicating attention.
# Usage: bash bench/device_next.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 220 python3 bench/device_faults.py --devices all --preset full --size 1024 --jobs 16 --hang-timeout 30 2>&1 \
  | tee "$out/faults.log"
timeout 340 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 2 --compile on \
  --configs serial,cfg2,ulysses2,ring2,pp2 --hang-timeout 60 --startup-timeout 200 --out "$out/c1024" 2>&1 | tee "$out/c1024.log"
