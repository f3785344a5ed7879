#!/usr/bin/env bash
# One call on nvidia-h200: the artist session (bench/session.py: the node's entry vs KSampler on the same MODEL,
# one process, a cold pool and an empty compile cache first), then the pack's own bench at 2048^2 (10 steps) and
# at 1024^2 with the token count symbolic in the compiled code (the default) and not.
# Needs, in git-ignored folders of the repo: .comfy (a ComfyUI 0.3.64 tree) and .comfywhl (av, torchsde,
# trampoline wheels). Usage: bash bench/device_h200_session.sh OUTDIR
set -u
out=${1:?usage: bash bench/device_h200_session.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .comfywhl/*.whl || exit 1
# the pack installed editable, as in a clone (into the machine's own Python: the machine is discarded after)
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
export PYTHONPATH=/tmp/site
python3 -c "import comfyui_xdit_hunyuan.worker.client as c; print('pack at', c.__file__)" || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv
filter() { grep -v -E '^W[0-9]{4}|it/s\]|s/it\]|UserWarning|warnings.warn' ; }

echo "== GPU tests =="
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_compile.py tests/test_loading.py 2>&1 | tail -3

echo "== session (pack first, cold; then KSampler) =="
COMFYUI_DIR=$PWD/.comfy timeout 420 python3 bench/session.py --devices all --preset full --size 1024 --steps 50 \
  --cache-dir "$HOME/.cache/comfyui_xdit_hunyuan" \
  --verbose --out "$out/session" 2>&1 | tee "$out/session.log" | filter | grep -E "^  (pack|KSampler)|^    start|ready on|^[a-z].*[0-9]" | tail -60

echo "== 2048^2, 10 steps, 1 GPU (compile cache of the session) =="
timeout 150 python3 -m comfyui_xdit_hunyuan bench --gpus 1 --sizes 2048 --steps 10 --repeats 3 --configs serial --compile on \
  --warmup-job-steps 2 --out "$out/b2048" 2>&1 | tee "$out/b2048.log" | filter | tail -8

echo "== 1024^2, 50 steps: token count symbolic (default) vs static =="
timeout 120 python3 -m comfyui_xdit_hunyuan bench --gpus 1 --sizes 1024 --steps 50 --repeats 3 --configs serial --compile on \
  --warmup-job-steps 2 --out "$out/b1024_any" 2>&1 | filter | tail -4
XDIT_HUNYUAN_COMPILE_ANY_SIZE=0 timeout 150 python3 -m comfyui_xdit_hunyuan bench --gpus 1 --sizes 1024 --steps 50 \
  --repeats 3 --configs serial --compile on --warmup-job-steps 2 --out "$out/b1024_static" 2>&1 | filter | tail -4

