"""Spare workers (worker/spares.py) with real processes on the CPU (gloo, the real engine): a pool starts from
them and gives the same latent as a pool of fresh workers; after its first job it has new spares started, which
the next pool takes; a spare whose environment does not fit, or that died, is replaced by a fresh worker; nothing
is left running or on disk after shutdown_all. And the warm-up (worker/warmup.py) a GPU spare runs."""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig, PlanError
from comfyui_xdit_hunyuan.worker.client import PoolClient, start_spares, uses_spares
from comfyui_xdit_hunyuan.worker.registry import shutdown_all
from comfyui_xdit_hunyuan.worker.spares import assign, spares
from parallel_harness import make_job
from test_pool import alive, wait_gone

pytestmark = pytest.mark.skipif(os.name != "posix", reason="spares wait on a POSIX pipe")

CFG2 = ParallelConfig(strategy="manual", cfg_degree=2)


def _wait_spares(n: int, timeout: float = 60.0) -> dict[str, int]:
    """The spares, once `n` are alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = spares.running()
        if len(running) >= n:
            return running
        time.sleep(0.1)
    raise AssertionError(f"{n} spares expected, running: {spares.running()}")


@pytest.fixture
def clean():
    shutdown_all()
    yield
    shutdown_all()


def test_a_pool_starts_from_spares_and_leaves_spares_for_the_next(clean, tmp_path):
    config = PoolConfig(devices="cpu:2", spare_workers="on", cache_dir=str(tmp_path / "cache"))
    job = make_job(steps=2)
    with PoolClient(replace(config, spare_workers="off")) as fresh:
        reference = fresh.run(job, CFG2)
        assert fresh.last_stats["spares_taken"] == 0

    assert start_spares(config) == ["cpu#0", "cpu#1"]
    first = _wait_spares(2)
    folder = Path(spares._dir)
    client = PoolClient(config)
    out = client.run(job, CFG2)
    assert client.last_stats["spares_taken"] == 2
    assert sorted(client.pids) == sorted(first.values())
    assert torch.equal(out, reference)
    assert "spare" in client.last_stats["ranks"][0]["start_phases"]
    second = _wait_spares(2)                         # started after the first job, for the next pool
    assert set(second.values()).isdisjoint(first.values())
    client.close()
    assert wait_gone(list(first.values()), 10) == []
    assert all(alive(p) for p in second.values())   # a pool's close leaves the spares

    again = PoolClient(config)
    assert torch.equal(again.run(job, CFG2), reference)
    assert again.last_stats["spares_taken"] == 2 and sorted(again.pids) == sorted(second.values())
    third = _wait_spares(2)
    shutdown_all()                                   # pools and spares: nothing left
    assert wait_gone([*again.pids, *third.values()], 10) == []
    assert spares.running() == {} and not folder.exists()


def test_a_spare_that_does_not_fit_or_died_is_replaced_by_a_fresh_worker(clean, tmp_path, caplog):
    config = PoolConfig(devices="cpu:1", spare_workers="on", cache_dir=str(tmp_path / "a"))
    start_spares(config)
    (stale,) = _wait_spares(1).values()
    other = replace(config, cache_dir=str(tmp_path / "b"))    # another compile cache: another environment
    job = make_job(steps=2)
    with PoolClient(other) as client:
        out = client.run(job, ParallelConfig())
        assert client.last_stats["spares_taken"] == 0 and stale not in client.pids
    assert wait_gone([stale], 10) == []                        # dismissed

    _wait_spares(1)                                            # the pool above left one for its own config
    (spare,) = spares.running().values()
    os.kill(spare, signal.SIGKILL)
    assert wait_gone([spare], 10) == []
    with caplog.at_level(logging.WARNING, logger="comfyui_xdit_hunyuan.pool"):
        with PoolClient(other) as client:
            assert torch.equal(client.run(job, ParallelConfig()), out)
            assert client.last_stats["spares_taken"] == 0
    assert "spare worker for cpu#0 exited" in caplog.text


def test_a_spare_given_another_device_exits(clean, tmp_path):
    config = PoolConfig(devices="cpu:1", spare_workers="on")
    start_spares(config)
    (pid,) = _wait_spares(1).values()
    proc = spares._spares["cpu#0"].proc
    assign(proc, ["--rank", "0", "--world-size", "1", "--device", "cuda:7", "--family", "AF_UNIX",
                                "--address", "x", "--init-method", "file:///x", "--config", "{}",
                                "--parent-pid", str(os.getpid())], b"k" * 32)
    assert proc.wait(timeout=30) == 3


def test_spare_settings():
    assert not uses_spares(PoolConfig(devices="cpu:2"), ["cpu", "cpu"])           # auto: GPU pools only
    assert uses_spares(PoolConfig(), ["cuda:0"])
    assert not uses_spares(PoolConfig(spare_workers="off"), ["cuda:0"])
    assert start_spares(PoolConfig(devices="cpu:1")) == []
    with pytest.raises(PlanError, match="spare_workers 'maybe' is unknown"):
        PoolConfig(spare_workers="maybe").validate()


def test_the_warm_up_runs_each_case_and_stops_when_asked():
    from comfyui_xdit_hunyuan.tiny import preset
    from comfyui_xdit_hunyuan.worker.warmup import warm_up
    pool = PoolConfig(devices="cpu")
    assert list(warm_up(pool, "cpu", dtypes=("fp32", "bf16"), arch=preset("tiny"))) == ["fp32", "bf16"]
    asked = []
    stopped = warm_up(pool, "cpu", dtypes=("fp32", "bf16"), arch=preset("tiny"),
                      stop=lambda: asked.append(1) or len(asked) > 1)      # False before the first case only
    assert list(stopped) == ["fp32"]


def test_comfyuis_start_asks_for_spares_of_the_default_pool():
    from comfyui_xdit_hunyuan.adapter import start_spare_workers

    class Backend:
        asked = None

        def cache_root(self):
            return "/comfy/user/xdit_hunyuan/compile_cache"

        def start_spares(self, config):
            Backend.asked = config
            return ["cuda:0#0"]

    assert start_spare_workers(Backend()) == ["cuda:0#0"]
    assert Backend.asked.devices == "all" and Backend.asked.cache_dir == "/comfy/user/xdit_hunyuan/compile_cache"
