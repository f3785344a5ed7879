#!/usr/bin/env bash
# Second call on nvidia-h100-x2: PipeFusion on NCCL after the pair-channel fix, where a step's time goes in
# serial / cfg2 / ulysses2 (compiled), pp2 in the pool at 1024^2, then every 2-GPU mode at 2048^2.
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 150 python3 bench/nccl_probe.py --compile --steps 3 --watchdog 60 --phases pp2,prof:cfg2,prof:ulysses2,prof:serial 2>&1 \
  | grep -v "^\[rank 1\]" | tee "$out/probe.log"
timeout 120 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 1 --compile on \
  --configs serial,pp2 --hang-timeout 30 --startup-timeout 120 --out "$out/c1024pp" 2>&1 | tee "$out/c1024pp.log"
timeout 300 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 2048 --steps 10 --repeats 1 --compile on \
  --configs serial,cfg2,ulysses2,ring2,pp2 --hang-timeout 30 --startup-timeout 120 --out "$out/c2048" 2>&1 | tee "$out/c2048.log"
