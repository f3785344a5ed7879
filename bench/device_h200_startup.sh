#!/usr/bin/env bash
# On nvidia-h200 (one GPU): where a worker's start and first job go (bench/startup.py: imports, CUDA, a
# first job cold / after a warm-up / with a warm Triton cache), eager vs compiled per-rank floors (fp16,
# bench/floors.py, 1024^2 and 2048^2), the GPU tests of compiling in the background, and the artist session
# with compile off and spare workers (bench/session.py; carry .comfywhl and .comfy for it).
#
#   bash bench/device_h200_startup.sh OUT PART...      PART: startup | floors | background | session | checks |
#                                                      restart (the session with ComfyUI's own restart)
# checks: the fused kernels against their references on the GPU (bench/gpu_checks.py) and the GPU tests.
set -uo pipefail
out=${1:?usage: bash bench/device_h200_startup.sh OUT PART...}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
if [ -d .comfywhl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .comfywhl/*.whl 2>&1 | tail -1
  export PYTHONPATH=/tmp/site
fi
filter() { grep -v -E '^W[0-9]{4}|it/s\]|s/it\]|UserWarning|warnings.warn' ; }
for part in "$@"; do
  case "$part" in
    startup)
      echo "== startup =="
      timeout 200 python3 bench/startup.py --device cuda:0 --size 1024 --steps 10 2>&1 | tee "$out/startup.log" | filter ;;
    floors)
      for c in off on; do
        echo "== floors, compile $c =="
        timeout 240 python3 bench/floors.py --device cuda:0 --sizes 1024,2048 --plans serial,cfg2,ulysses2,ring2,pp2 --ranks stages \
          --steps 10 --dtype fp16 --compile $c --cache-dir /tmp/xdit_floors_cache --out "$out/floors_$c.json" 2>&1 \
          | tee "$out/floors_$c.log" | filter | grep -E "rank|^\|" ; done ;;
    background)
      echo "== GPU tests: compiling in the background =="
      timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_background_compile.py 2>&1 | tail -4 ;;
    session)
      echo "== session, compile off, spare workers (pack first, cold; then KSampler) =="
      COMFYUI_DIR=$PWD/.comfy timeout 400 python3 bench/session.py --devices all --preset full --size 1024 --steps 50 \
        --no-compile --verbose --out "$out/session" 2>&1 | tee "$out/session.log" | filter \
        | grep -E "^  (pack|KSampler)|^    start|ready on|takes the spare|^session|^GPU proc|^spare |^[a-z].*[0-9]" | tail -70 ;;
    restart)
      echo "== session, ComfyUI restarted at the restart event (pack first, cold; then KSampler) =="
      COMFYUI_DIR=$PWD/.comfy timeout 400 python3 bench/session.py --devices all --preset full --size 1024 --steps 50 \
        --restart comfyui --verbose --out "$out/session_restart" 2>&1 | tee "$out/session_restart.log" | filter \
        | grep -E "^  (pack|KSampler)|^    start|^    restart|takes the spare|^session|^[a-z].*[0-9]" | tail -60 ;;
    checks)
      echo "== fused kernels on the GPU =="
      PYTHONPATH=.:${PYTHONPATH:-} timeout 200 python3 bench/gpu_checks.py --only fused,seqfirst --skip-compile 2>&1 | filter | tail -25
      echo "== GPU tests =="
      timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_background_compile.py \
        tests/test_weight_updates.py tests/test_loading.py tests/test_spares.py 2>&1 | tail -4 ;;
    *) echo "unknown part $part" ;;
  esac
done
