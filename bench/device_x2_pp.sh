#!/usr/bin/env bash
# pp2 at 1024^2 on nvidia-h100-x2, 20 steps: with and without the fused kernels (compiled), and eager --
# where PipeFusion's time goes. Usage: bash bench/device_x2_pp.sh OUT
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
for run in "1 on" "0 on" "1 off"; do
  set -- $run
  echo "== pp2, fused kernels $1, compile $2 =="
  XDIT_HUNYUAN_FUSED_KERNELS=$1 timeout 200 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 2 --sizes 1024 \
    --steps 20 --repeats 1 --warmup-job-steps 3 --compile $2 --configs pp2 --hang-timeout 60 --startup-timeout 150 \
    --out "$out/pp_$1_$2" 2>&1 | grep -E "dev |rror|Trace"
done
