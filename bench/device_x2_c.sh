#!/usr/bin/env bash
# Call C on nvidia-h100-x2: serial and cfg2 at 1024^2 (50 steps) and 2048^2 (10 steps), compiled, CUDA
# graphs on, GPU ranks with a bounded CPU thread count; per-job set-up phases in the JSON.
# Usage: bash bench/device_x2_c.sh OUT
set -u
out=${1:-bench/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
timeout 280 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 1024 --steps 50 --repeats 3 --compile on \
  --configs serial,cfg2 --hang-timeout 60 --startup-timeout 200 --out "$out/c1024" 2>&1 | tee "$out/c1024.log"
timeout 280 python3 -m comfyui_xdit_hunyuan.bench_main --gpus 1,2 --sizes 2048 --steps 10 --repeats 3 --compile on \
  --configs serial,cfg2 --hang-timeout 60 --startup-timeout 200 --out "$out/c2048" 2>&1 | tee "$out/c2048.log"
python3 - "$out" <<'PY'
import json, sys
for name in ("c1024", "c2048"):
    for r in json.load(open(f"{sys.argv[1]}/{name}/bench.json"))["results"]:
        print(name, r["config"], [(k.get("runtime") or {}).get("setup_phases") for k in r["ranks"]],
              [(k.get("runtime") or {}).get("cpu_threads") for k in r["ranks"]])
PY
