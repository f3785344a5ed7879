"""Compiling in the background (worker/background.py): the client's decisions, with a stand-in helper program
(the real one compiles on a GPU: test_a_cold_gpu_pool_runs_eager_until_the_helper_filled_the_cache)."""
from __future__ import annotations

import logging
import os
import sys
import time

import pytest
import torch

from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.job import WeightsRef
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.tiny import preset
from comfyui_xdit_hunyuan.worker import background
from parallel_harness import PRESET, make_job

HELPER = '''
import pickle, sys, time
args = sys.argv[1:]
spec = pickle.load(open(args[args.index("--job") + 1], "rb"))
assert spec["job"].weights is None and spec["plan"].world_size >= 1
time.sleep(float({sleep!r}))
sys.exit({code})
'''


def _controller(tmp_path, monkeypatch, *, code=0, sleep=0.5, **pool):
    mod = tmp_path / f"fake_helper_{code}_{str(sleep).replace('.', '_')}.py"
    mod.write_text(HELPER.format(sleep=sleep, code=code))
    monkeypatch.setattr(background, "HELPER_MODULE", mod.stem)
    monkeypatch.setattr(background.P, "ISOLATE_CWD", ())
    env = {"PYTHONPATH": str(tmp_path)}
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    config = PoolConfig(devices="cuda:0", cache_dir=str(cache), **{"compile": True, **pool})
    return background.BackgroundCompile(config, ["cuda:0"], cache, str(work), sys.executable, env,
                                        logging.getLogger("test"))


def _wait(proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is not None


def test_eager_while_the_helper_runs_then_compiled_and_marked_for_the_next_pool(tmp_path, monkeypatch):
    arch, plan = preset(PRESET), ParallelConfig()
    job = make_job(h=8, w=8, steps=2)
    job.weights = WeightsRef("w", "random:0:" + PRESET)
    bg = _controller(tmp_path, monkeypatch)
    assert bg.enabled
    assert bg.eager(job, plan, arch) is True and bg.helper is not None            # started, this job eager
    assert bg.eager(job, plan, arch) is True                                      # still running
    _wait(bg.helper)
    assert bg.eager(job, plan, arch) is False                                     # done: compile from the cache
    assert len(list((tmp_path / "cache" / "warm").iterdir())) == 1
    bg.close()
    again = _controller(tmp_path, monkeypatch)                                    # a restarted pool
    assert again.eager(job, plan, arch) is False and again.helper is None
    other = make_job(h=8, w=8, steps=2, guidance=1.0)                             # another per-rank batch: its own
    other.weights = job.weights
    assert again.eager(other, plan, arch) is True
    again.close()


def test_a_failed_helper_leaves_compiling_to_the_workers_with_its_output_logged(tmp_path, monkeypatch, caplog):
    arch, plan = preset(PRESET), ParallelConfig()
    job = make_job(h=8, w=8, steps=2)
    bg = _controller(tmp_path, monkeypatch, code=3, sleep=0)
    assert bg.eager(job, plan, arch) is True
    _wait(bg.helper)
    with caplog.at_level(logging.WARNING):
        assert bg.eager(job, plan, arch) is False
    assert "the compile helper failed (exit 3)" in caplog.text
    assert not bg.enabled and not (tmp_path / "cache" / "warm").exists()
    assert bg.eager(job, plan, arch) is False


def test_close_stops_a_running_helper_and_nothing_runs_without_the_option(tmp_path, monkeypatch):
    arch, plan = preset(PRESET), ParallelConfig()
    job = make_job(h=8, w=8, steps=2)
    bg = _controller(tmp_path, monkeypatch, sleep=60)
    assert bg.eager(job, plan, arch) is True
    helper = bg.helper
    bg.close()
    assert helper.poll() is not None                                              # killed, reaped
    for off in (dict(background_compile=False), dict(compile=False)):
        assert _controller(tmp_path, monkeypatch, **off).eager(job, plan, arch) is False
    cpu = background.BackgroundCompile(PoolConfig(devices="cpu:1", compile=True, cache_dir=str(tmp_path)), ["cpu"], tmp_path,
                                       str(tmp_path), sys.executable, {}, logging.getLogger("test"))
    assert not cpu.enabled and cpu.eager(job, plan, arch) is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiling needs a GPU")
def test_a_cold_gpu_pool_runs_eager_until_the_helper_filled_the_cache(tmp_path, monkeypatch):
    """A real pool: the first job eager while the helper compiles, a later job compiled from the cache (its
    latent close to the eager one's), and a new pool on the same cache compiles at its first job."""
    from comfyui_xdit_hunyuan.worker import PoolClient
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)     # the workers compile real GPU kernels (conftest)
    config = PoolConfig(devices="cuda:0", dtype="fp32", compile=True, cache_dir=str(tmp_path / "cache"))
    job = make_job(h=32, w=32, steps=3)
    job.weights = WeightsRef("tiny", "random:0:" + PRESET)
    with PoolClient(config, startup_timeout=600) as client:
        first = client.run(job, ParallelConfig())
        assert client.last_stats["eager"] is True
        _wait(client._background.helper, timeout=600)
        later = client.run(job, ParallelConfig())
        assert client.last_stats["eager"] is False and client.last_stats["ranks"][0]["runtime"]["compiled"]
        assert ((later - first).norm() / first.norm()).item() < 1e-3
    with PoolClient(config, startup_timeout=600) as client:
        again = client.run(job, ParallelConfig())
        assert client.last_stats["eager"] is False and client.last_stats["ranks"][0]["runtime"]["compiled"]
        assert client._background.helper is None
        assert torch.equal(again, later)
