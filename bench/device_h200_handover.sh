#!/usr/bin/env bash
# On nvidia-h200 (one GPU): the whole model's hand-over to a cold pool (bench/handover.py: staged file vs CUDA
# IPC, side by side; the first step with the compile cache cold and warm, CUDA graphs on and off), the GPU
# tests, then the artist session (bench/session.py, the node's entry vs KSampler on the same MODEL).
#
#   bash bench/device_h200_handover.sh OUT PART...      PART: handover | session | background
#
# Carry .comfywhl (av, torchsde, trampoline wheels) and .comfy (a ComfyUI 0.3.64 tree; session only). Each part
# installs what it needs, so the two parts may go in two calls (each well inside a call's 10 minutes).
set -uo pipefail
out=${1:?usage: bash bench/device_h200_handover.sh OUT PART...}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .comfywhl/*.whl 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PYTHONPATH=/tmp/site
filter() { grep -v -E '^W[0-9]{4}|it/s\]|s/it\]|UserWarning|warnings.warn' ; }
for part in "$@"; do
  case "$part" in
    handover)
      nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
      echo "== GPU tests =="
      timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_weight_updates.py tests/test_compile.py \
        tests/test_loading.py 2>&1 | tail -4
      echo "== hand-over of a whole model to a cold pool =="
      timeout 330 python3 bench/handover.py --devices cuda:0 --size 1024 --steps 50 --out "$out/handover.json" \
        2>&1 | tee "$out/handover.log" | filter | tail -60; for f in "$out"/handover/*/rank0.txt; do echo "== $f"; head -75 "$f" | cut -c1-160; done ;;
    session)
      echo "== session (pack first, cold; then KSampler) =="
      COMFYUI_DIR=$PWD/.comfy timeout 560 python3 bench/session.py --devices all --preset full --size 1024 --steps 50 \
        --verbose --out "$out/session" 2>&1 | tee "$out/session.log" | filter \
        | grep -E "^  (pack|KSampler)|^    start|ready on|^[a-z].*[0-9]" | tail -60 ;;
    background)
      echo "== GPU tests: compiling in the background, weights over CUDA IPC =="
      timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_background_compile.py \
        tests/test_weight_updates.py 2>&1 | tail -4 ;;
    *) echo "unknown part $part" ;;
  esac
done
