"""`python -m comfyui_xdit_hunyuan bench` on CPU workers (what the GPU runs use, small): the sweep, its
JSON (times, speed-up and difference against the 1-device run, cold first image, per-rank stats), the
table, merging runs with --from and the auto table written from them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from comfyui_xdit_hunyuan.bench import best_table, merge, table
from comfyui_xdit_hunyuan.plan import auto_degrees

ROOT = Path(__file__).resolve().parent.parent


def test_bench_sweeps_and_merges(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "comfyui_xdit_hunyuan", "bench", "--devices", "cpu:2", "--gpus", "1,2",
           "--preset", "tiny", "--sizes", "64", "--steps", "3", "--compile", "off", "--repeats", "1",
           "--configs", "serial,cfg2", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    rows = {r["config"]: r for r in report["results"]}
    assert set(rows) == {"serial", "cfg2"} and rows["cfg2"]["devices"] == 2
    assert rows["serial"]["speedup_vs_1gpu"] == 1.0 and rows["cfg2"]["rel_diff_vs_1gpu"] < 1e-5   # exact mode
    for r in rows.values():
        assert r["seconds"] > 0 and r["cold_first_image_seconds"] >= r["seconds"] > 0
        assert 0 <= r["pool_overhead_seconds"] < r["seconds"]
        parts = r["overhead_parts"]          # checks, delivery to the last rank, return of the last answer
        assert set(parts) == {"checks", "wiring", "delivery", "return"} and all(0 <= v < r["seconds"] for v in parts.values())
        assert sum(parts.values()) <= r["pool_overhead_seconds"] + 0.05
        assert len(r["ranks"]) == r["devices"] and all(len(k["step_seconds"]) == 3 for k in r["ranks"][:1])
    assert "| 2 | cfg2 | 64² | 3 | eager |" in p.stdout

    merged = merge([str(out / "bench.json"), str(out / "bench.json")])
    assert len(merged["results"]) == 4 and {r["run"] for r in merged["results"]} == {"run"}
    assert table(merged).count("cfg2") == 2
    best = best_table(merged)
    assert best["2:1024:cfg"]["cfg_degree"] in (1, 2) and best["1:1024:cfg"]["cfg_degree"] == 1
    assert auto_degrees(2, (8, 8), True, table=best) == best["2:1024:cfg"]
