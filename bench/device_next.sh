#!/usr/bin/env bash
# Next GPU call on a 2-GPU machine: ring2 and pp2 on NCCL (stacks printed if a rank stalls), then the
# compiled 1024^2 sweep and the diffusers baseline. Usage: bash bench/device_next.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_DEBUG=WARN
timeout 200 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 1 --compile off \
  --configs serial,ring2,pp2 --hang-timeout 30 --startup-timeout 90 --out "$out/ringpp" 2>&1 | tee "$out/ringpp.log"
timeout 300 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 1 --compile on \
  --configs serial,cfg2 --out "$out/compiled" 2>&1 | tee "$out/compiled.log"
