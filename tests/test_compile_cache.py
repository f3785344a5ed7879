"""The workers' persistent compile caches (compile_cache.py): one folder per software stack, made by the pool
client before any worker starts, reused by torch.compile across processes (so a pool or ComfyUI restart
compiles nothing again), kept across pool restarts, and a foreign or corrupted cache never crashes: it is
replaced or recompiled with a warning."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_xdit_hunyuan import compile_cache
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.worker import PoolClient
from tests.fake_runtime import expected_latent
from tests.test_pool import FAKE, make_job

COMPILE_TWICE = """
import sys, torch
from torch._dynamo.utils import counters
f = torch.compile(lambda x: torch.nn.functional.gelu(x * 2 + 1).sum(-1))
f(torch.randn(16, 16))
print(dict(counters["inductor"]))
"""


def test_one_folder_per_stack_kept_or_replaced_with_a_warning(tmp_path, caplog):
    folder = compile_cache.prepare(tmp_path)
    manifest = json.loads((folder / compile_cache.MANIFEST).read_text())
    assert manifest == compile_cache.stack() and folder.parent == tmp_path
    (folder / "inductor").mkdir()
    (folder / "inductor" / "entry").write_text("compiled")
    assert compile_cache.prepare(tmp_path) == folder and (folder / "inductor" / "entry").exists()   # reused
    env = compile_cache.environment(folder)
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(folder)) and env["TRITON_CACHE_DIR"].startswith(str(folder))

    for bad in ("{not json", json.dumps({**manifest, "torch": "1.0"})):       # corrupted, then foreign
        (folder / compile_cache.MANIFEST).write_text(bad)
        with caplog.at_level(logging.WARNING, logger="comfyui_xdit_hunyuan"):
            assert compile_cache.prepare(tmp_path) == folder
        assert "is not this software's" in caplog.text and "made anew" in caplog.text
        assert not (folder / "inductor" / "entry").exists()                  # nothing of it is read
        assert json.loads((folder / compile_cache.MANIFEST).read_text()) == manifest
        caplog.clear()
        (folder / "inductor").mkdir(exist_ok=True)
        (folder / "inductor" / "entry").write_text("compiled")
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]             # the stale copies are gone


def _compile_in_a_process(folder: Path) -> dict:
    env = {**os.environ, **compile_cache.environment(folder), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", COMPILE_TWICE], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return {"counters": eval(p.stdout.strip().splitlines()[-1]), "stderr": p.stderr}   # noqa: S307 - our own dict


def test_torch_compile_reuses_the_folder_across_processes_and_survives_a_corrupted_entry(tmp_path):
    folder = compile_cache.prepare(tmp_path)
    first = _compile_in_a_process(folder)["counters"]
    assert first.get("fxgraph_cache_miss", 0) >= 1 and not first.get("fxgraph_cache_hit")
    again = _compile_in_a_process(folder)["counters"]
    assert again.get("fxgraph_cache_hit", 0) >= 1 and not again.get("fxgraph_cache_miss")   # nothing recompiled
    entries = [p for p in (folder / "inductor" / "fxgraph").rglob("*") if p.is_file()]
    assert entries
    for p in entries:
        p.write_bytes(b"\x02garbage")
    broken = _compile_in_a_process(folder)                                   # no crash: recompiled, warned
    assert broken["counters"].get("fxgraph_cache_miss", 0) >= 1
    assert "codecache" in broken["stderr"]                                   # inductor's own warning


@pytest.mark.skipif(os.name != "posix", reason="POSIX worker processes")
def test_the_pool_gives_its_workers_the_folder_and_keeps_it_across_restarts(tmp_path):
    pool = PoolConfig(devices="cpu:1", cache_dir=str(tmp_path / "cache"))
    job = make_job("cache")
    seen = []
    for _ in range(2):                                                       # a restart in between
        with PoolClient(pool, runtime=FAKE, startup_timeout=120) as client:
            torch.testing.assert_close(client.run(job, ParallelConfig()), expected_latent(job, 1, 3.0),
                                       rtol=0, atol=0)
            seen.append(client.last_stats["ranks"][0]["runtime"]["cache_env"])
    folder = compile_cache.prepare(tmp_path / "cache")
    assert seen[0] == seen[1] == compile_cache.environment(folder)


def test_workers_get_a_bytecode_cache_only_where_torch_has_none(tmp_path):
    """Where a module's bytecode is cached as usual, nothing changes; where it is not (a read-only image without
    .pyc files, or PYTHONDONTWRITEBYTECODE set), the workers' Python writes its bytecode under the cache
    folder, where the next worker reads it."""
    import importlib.util
    from comfyui_xdit_hunyuan import compile_cache
    assert compile_cache.bytecode_environment(tmp_path) in ({}, {"PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"),
                                                                  "PYTHONDONTWRITEBYTECODE": ""})
    src = tmp_path / "mod" / "probe_mod.py"
    src.parent.mkdir()
    src.write_text("VALUE = 3\n")
    env = compile_cache.bytecode_environment(tmp_path, probe=str(src))
    assert env == {"PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}
    run_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env, "PYTHONPATH": str(src.parent)}
    subprocess.run([sys.executable, "-c", "import probe_mod"], env=run_env, check=True)
    assert not (src.parent / "__pycache__").exists()
    cached = list((tmp_path / "pycache").rglob("probe_mod*.pyc"))
    assert len(cached) == 1
    assert cached[0].name == os.path.basename(importlib.util.cache_from_source(str(src)))
