#!/usr/bin/env bash
# On nvidia-h200 (one GPU): flash-attn-4 from carried files, the attention kernels at our shapes
# (bench/attention_bench.py: sets model.attention.FA4_MIN_TOKENS) and the per-rank compute floors of the
# parallel plans (bench/floors.py: rank shares on one GPU, collectives stood in).
#
#   bash bench/device_h200_fa4.sh OUT PART...
#   PART: unpack | install | attention | floors1024 | floors2048 | more1024 | more2048 | smoke
#
# The carried files are git-ignored folders of the repository: .fa4a/libs_cu13.tar.xz (too large to travel
# with the rest: its own call), .fa4b/*.whl (flash-attn-4 and its CuTe DSL) and .comfywhl/*.whl. The install
# is pip's (one call for all wheels, --no-deps, into /tmp/site) and then the archive unpacked over it; when
# the archive came in an earlier call on the same warm machine it is already unpacked under /tmp/site, and
# the wheels are then merged in without replacing its files (the same result as pip first, archive second).
# Every part that runs Python first says whether flash-attn-4 imports; without it the benches still run
# (attention without the flash-attn-4 rows, floors with the cuDNN kernels).
#
# The calls (the machine stays warm for 30 s after a call, and /tmp/site with it: send the next one at once):
#   1. carry .fa4a:              bash bench/device_h200_fa4.sh "$OUT" unpack              (~1 min)
#   2. carry .fa4b, .comfywhl:   bash bench/device_h200_fa4.sh "$OUT" install attention   (~3-4 min)
#   3. no carry:                 bash bench/device_h200_fa4.sh "$OUT" floors2048          (~5-9 min)
#   4. no carry:                 bash bench/device_h200_fa4.sh "$OUT" floors1024          (~5-9 min)
#   optional, if time is left:   ... more1024 / more2048 (4- and 8-way plans' ranks, ~9 min each)
# 2048² before 1024²: only 2048² reaches flash-attn-4's threshold (8192 tokens), so it goes while the install
# is warm; 1024² runs the same with or without it. Each part stops itself inside the 10-minute limit of a
# call (floors writes its JSON after every row).
set -uo pipefail
out=${1:?usage: bash bench/device_h200_fa4.sh OUT PART...}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
SITE=/tmp/site
export PYTHONPATH="$PWD:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
ARCHIVE=.fa4a/libs_cu13.tar.xz

unpack() {
  if [ -f "$ARCHIVE" ]; then
    mkdir -p "$SITE" && tar -xJf "$ARCHIVE" -C "$SITE" && touch "$SITE/.libs_cu13_unpacked" \
      && echo "unpacked $ARCHIVE into $SITE ($(du -sh "$SITE" | cut -f1))"
  elif [ -f "$SITE/.libs_cu13_unpacked" ]; then
    echo "$ARCHIVE not carried; already unpacked under $SITE"
  else
    echo "WARNING: $ARCHIVE not carried and not unpacked under $SITE (a fresh machine?): flash-attn-4 may not import"
  fi
}

install() {
  shopt -s nullglob
  local wheels=(.fa4b/*.whl .comfywhl/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels carried (.fa4b/*.whl, .comfywhl/*.whl)"
  else
    local stage=/tmp/site_wheels
    rm -rf "$stage"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$stage" "${wheels[@]}" \
      || { echo "pip install of ${#wheels[@]} wheels failed"; return 1; }
    python3 - "$stage" "$SITE" <<'EOF'
import os, sys
src, dst = sys.argv[1:]
moved = kept = 0
for root, dirs, files in os.walk(src):
    rel = os.path.relpath(root, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for f in files:
        target = os.path.join(dst, rel, f)
        if os.path.lexists(target):
            kept += 1                      # the archive's (unpacked earlier): it wins, as if unpacked after pip
        else:
            os.rename(os.path.join(root, f), target)
            moved += 1
print(f"installed {moved} files into {dst}; {kept} already there (the archive's) kept")
EOF
    echo "wheels: ${wheels[*]}"
  fi
  if [ -f "$ARCHIVE" ]; then unpack; fi
}

check() {
  python3 - <<'EOF' 2>&1 | tail -3
import time, torch
t = time.perf_counter()
try:
    from flash_attn.cute import flash_attn_func  # noqa: F401
    from comfyui_xdit_hunyuan.model import attention as A
    print(f"flash-attn-4 imports ({time.perf_counter() - t:.1f} s); auto on this GPU:",
          A.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, in_graph=True),
          "| torch", torch.__version__, torch.cuda.get_device_name(0))
except Exception as e:
    print(f"flash-attn-4 does NOT import: {type(e).__name__}: {str(e)[:300]}")
EOF
}

floors() {   # size, plans, steps, seconds
  check
  timeout "$4" python3 bench/floors.py --sizes "$1" --plans "$2" --ranks stages --steps "$3" \
    --out "$out/floors_$2_$1.json" 2>&1 | tee "$out/floors_$2_$1.log"
}

for part in "$@"; do
  echo "=== $part ($(date +%T)) ==="
  case "$part" in
    unpack) unpack ;;
    install) install ;;
    attention) check; timeout 240 python3 bench/attention_bench.py --out "$out/attention.json" 2>&1 | tee "$out/attention.log"
               timeout 60 python3 bench/gpu_checks.py --only seqfirst 2>&1 | tee "$out/seqfirst.log" ;;
    floors1024) floors 1024 default 20 560 ;;
    floors2048) floors 2048 default 10 560 ;;
    more1024) floors 1024 more 20 560 ;;
    more2048) floors 2048 more 10 560 ;;
    smoke) check; timeout 200 python3 bench/floors.py --sizes 512 --plans serial,ulysses2,ring2 --steps 5 \
             --out "$out/floors_smoke.json" 2>&1 | tee "$out/floors_smoke.log" ;;
    *) echo "unknown part $part (unpack, install, attention, floors1024, floors2048, more1024, more2048, smoke)" ;;
  esac
done
