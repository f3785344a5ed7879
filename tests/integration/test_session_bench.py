"""bench/session.py on CPU workers with a tiny model, in one process with ComfyUI's KSampler: every event's
latent equals KSampler's, and only what changed travels (the LoRA's tensors when it is added or its strength
changes, nothing when it is removed: the workers kept the base tensors; everything after a restart), and the
cold start and the restart start from spare workers.

Needs COMFYUI_DIR (and COMFYUI_PYTHON with ComfyUI's requirements, default this interpreter)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: the session bench needs ComfyUI")
DEPTH = 6                      # bench/session.py's comfy-tiny: 3 LoRA targets per block
REL_TOL = 1e-5                 # as tests/integration/test_comfyui_server.py (float32, the attention kernels)


def test_the_session_matches_ksampler_and_sends_only_what_changed(tmp_path):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    p = subprocess.run([python, str(ROOT / "bench" / "session.py"), "--comfyui", COMFYUI_DIR, "--devices", "cpu:1",
                        "--preset", "comfy-tiny", "--size", "64", "--steps", "2", "--spares", "on", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    report = json.loads((tmp_path / "session.json").read_text())
    events = {e["event"]: e for e in report["events"]}
    assert len(events) == 12
    for e in events.values():
        assert e["max_rel_vs_ksampler"] <= REL_TOL, e
    sent = {name: (e["weights"]["whole"], e["weights"]["sent"], e["weights"]["restored"]) for name, e in events.items()}
    lora = 3 * DEPTH
    assert sent["cold start"][0] and sent["restart"][0]
    assert sent["seed 2"] == sent["prompt change"] == sent["new size"] == (False, 0, 0)
    assert sent["LoRA added"] == sent["LoRA strength changed"] == (False, lora, 0)
    assert sent["LoRA removed"] == (False, 0, lora)
    assert report["speedup"] > 0 and "pack" in p.stdout and "KSampler" in p.stdout
    # the first pool took the spare started before the MODEL was built, the restarted pool the one the first
    # pool had started after its first job
    assert events["cold start"]["spares_taken"] == 1 and events["restart"]["spares_taken"] == 1
