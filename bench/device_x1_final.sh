#!/usr/bin/env bash
# One call on nvidia-h100-x1 (diffusers wheels carried in .whl): the pool benchmark on one GPU (compiled, CUDA
# graphs and fused kernels on: the defaults) and diffusers' compiled HunyuanDiT2DModel in the same call.
# Usage: bash bench/device_x1_final.sh OUTDIR
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
timeout 200 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1 --sizes 1024 --steps 50 --repeats 3 --compile on \
  --configs serial --out "$out/x1" 2>&1 | tee "$out/bench_x1.log"
PYTHONPATH=/tmp/site timeout 250 python3 bench/diffusers_baseline.py --compile 2>&1 | tee "$out/diffusers.log"
