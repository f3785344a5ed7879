"""The worker pool with real worker processes (CPU, gloo), each hosting tests/fake_runtime.py:
results, weight reuse, cancel, faults (SIGKILL, SIGSTOP, runtime errors, a dead parent), the
authenticated control channel, the workers' environment, clean shutdown and the pool registry."""
from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from multiprocessing.connection import AuthenticationError, Client
from pathlib import Path

import pytest
import torch

from comfyui_xdit_hunyuan.job import Job, JobCancelled, JobError, PoolError, WeightsRef
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig
from tests.fake_runtime import expected_latent
from comfyui_xdit_hunyuan.worker import PoolClient, get_pool, shutdown_all
from comfyui_xdit_hunyuan.worker.processes import sweep_stale_dirs
from comfyui_xdit_hunyuan.worker.protocol import HEARTBEAT_S, strip_cuda_malloc_async, worker_env
from comfyui_xdit_hunyuan.worker.weights import Versioned

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the fault tests send POSIX signals")

ROOT = Path(__file__).resolve().parent.parent
FAKE = "tests.fake_runtime:FakeRuntime"
POOL2, POOL1 = PoolConfig(devices="cpu:2"), PoolConfig(devices="cpu:1")
CFG2, SERIAL = ParallelConfig(cfg_degree=2), ParallelConfig()
HANG_S = 3.0


def make_job(identity: str = "w", source="random:3", steps: int = 4, preview_every: int = 0, **options) -> Job:
    g = torch.Generator().manual_seed(len(identity) + steps)
    return Job(WeightsRef(identity, source), [], [], latent=torch.randn(1, 4, 8, 8, generator=g),
               noise=torch.randn(1, 4, 8, 8, generator=g), sigmas=torch.linspace(1.0, 0.0, steps + 1),
               guidance=4.0, sampler_options=options, preview_every=preview_every)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def check_fresh_pool_works(pool: PoolClient, old_pids: list[int]) -> None:
    job = make_job("after-fault")
    torch.testing.assert_close(pool.run(job, CFG2), expected_latent(job, 2, 3.0), rtol=0, atol=0)
    assert pool.alive and not set(pool.pids) & set(old_pids)


@pytest.fixture(scope="module")
def pool():
    """One pool for the module, started in an environment like ComfyUI's (cudaMallocAsync selected).
    Fault tests leave it broken; the next run() must restart it transparently."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync,expandable_segments:True")
        mp.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync")
        client = PoolClient(POOL2, runtime=FAKE, hang_timeout=HANG_S, startup_timeout=120)
        yield client
        client.close()


# ---------------------------------------------------------------------- jobs
def test_job_returns_the_latent_and_streams_progress(pool):
    pool.start()
    assert pool.devices == ["cpu", "cpu"] and len(pool.pids) == 2
    seen = []
    job = make_job("basic", steps=4, preview_every=2)
    out = pool.run(job, CFG2, on_progress=lambda step, total, preview: seen.append((step, total, preview)))
    torch.testing.assert_close(out, expected_latent(job, 2, 3.0), rtol=0, atol=0)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert [(s, t) for s, t, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [p is None for _, _, p in seen] == [True, False, True, False]
    assert seen[1][2].shape == (1, 4, 4, 4)
    stats = pool.last_stats
    assert stats["loads"] == 1 and len(stats["step_seconds"]) == 4
    assert [r["pid"] for r in stats["ranks"]] == pool.pids and all(r["rss_bytes"] > 0 for r in stats["ranks"])


def test_worker_environment_and_process_groups(pool):
    pool.start()
    for pid in pool.pids:
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"   # cudaMallocAsync dropped
        assert "PYTORCH_ALLOC_CONF" not in env
        assert (env["NCCL_NVLS_ENABLE"], env["TORCH_SYMM_MEM_DISABLE_MULTICAST"], env["NVSHMEM_DISABLE_NVLS"]) == \
            ("0", "1", "1")
        assert env["PYTHONUNBUFFERED"] == "1"
        fair_share = str(max(1, len(os.sched_getaffinity(0)) // 2))
        assert env["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", fair_share)
        assert os.getpgid(pid) == pid                 # its own process group, killed as a whole
        assert "CUDA_VISIBLE_DEVICES" not in env or env["CUDA_VISIBLE_DEVICES"] == os.environ["CUDA_VISIBLE_DEVICES"]


def test_worker_env_rules():
    assert strip_cuda_malloc_async("backend:cudaMallocAsync") == ""
    assert strip_cuda_malloc_async("expandable_segments:True, backend : cudaMallocAsync") == "expandable_segments:True"
    assert strip_cuda_malloc_async("backend:native,max_split_size_mb:128") == "backend:native,max_split_size_mb:128"
    base = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync", "NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}
    env = worker_env(base, "cpu", 2)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["NCCL_NVLS_ENABLE"] == "0" and env["PATH"] == "/bin"
    assert int(env["OMP_NUM_THREADS"]) >= 1
    assert worker_env({"OMP_NUM_THREADS": "7"}, "cpu", 2)["OMP_NUM_THREADS"] == "7"
    assert "OMP_NUM_THREADS" not in worker_env({}, "cuda:0", 2)


def test_weights_are_reused_until_the_identity_changes(pool):
    first = make_job("model-a", source="random:3")
    pool.run(first, CFG2)
    again = make_job("model-a", source="random:3", steps=3)
    torch.testing.assert_close(pool.run(again, CFG2), expected_latent(again, 2, 3.0), rtol=0, atol=0)
    for rank in pool.last_stats["ranks"]:
        assert rank["runtime"]["loads_by_identity"]["model-a"] == 1       # loaded once, reused
        assert rank["runtime"]["last_source"] is None                       # only the identity travelled
    loads = pool.last_stats["loads"]
    other = make_job("model-b", source="random:5")
    torch.testing.assert_close(pool.run(other, CFG2), expected_latent(other, 2, 5.0), rtol=0, atol=0)
    assert pool.last_stats["loads"] == loads + 1
    assert all(r["runtime"]["loads_by_identity"]["model-b"] == 1 for r in pool.last_stats["ranks"])


def test_state_dict_weights_travel_as_one_private_temp_file(pool):
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(3, 3, generator=g)
    state_dict = {"w": weights, "b": torch.randn(3, generator=g), "w_row": weights[0]}   # w_row shares memory
    job = make_job("in-memory", source=state_dict)
    weight = float(sum(t.double().sum() for t in state_dict.values()))
    torch.testing.assert_close(pool.run(job, CFG2), expected_latent(job, 2, weight), rtol=0, atol=1e-6)
    paths = {r["runtime"]["last_source"] for r in pool.last_stats["ranks"]}
    assert len(paths) == 1                             # one file for every rank
    path = Path(paths.pop())
    assert path.suffix == ".safetensors" and str(path.parent) == pool.stage_dir
    if os.path.isdir("/dev/shm"):
        assert pool.stage_dir.startswith("/dev/shm/")  # memory-backed: staging never writes a disk
    assert not path.exists()                           # deleted once every rank had loaded it
    assert stat.S_IMODE(os.stat(pool.stage_dir).st_mode) == 0o700


# ---------------------------------------------------------------------- cancel and rejected jobs
def test_cancel_stops_within_one_step_and_the_pool_stays_warm(pool):
    pool.start()
    pids, steps, asked = pool.pids, [], []

    def cancel():
        if len(steps) >= 2 and not asked:
            asked.append(time.monotonic())
        return bool(asked)

    with pytest.raises(JobCancelled):
        pool.run(make_job("model-a", steps=20, sleep=0.3), CFG2, on_progress=lambda s, n, p: steps.append(s),
                 cancel=cancel)
    assert max(steps) <= 3                             # the step in flight finishes, no more
    assert time.monotonic() - asked[0] < 2.0
    assert pool.pids == pids
    job = make_job("model-a", steps=2)
    torch.testing.assert_close(pool.run(job, CFG2), expected_latent(job, 2, 3.0), rtol=0, atol=0)


def test_an_exception_in_on_progress_cancels_and_propagates(pool):
    """ComfyUI's interrupt arrives as an exception from the progress hook."""
    pool.start()
    pids = pool.pids

    class Interrupted(Exception):
        pass

    def on_progress(step, total, preview):
        if step == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        pool.run(make_job("model-a", steps=20, sleep=0.1), CFG2, on_progress=on_progress)
    assert pool.pids == pids and pool.alive


def test_job_error_keeps_the_pool(pool):
    pool.start()
    pids = pool.pids
    with pytest.raises(JobError, match="job_error"):
        pool.run(make_job("model-a", job_error=True), CFG2)
    assert pool.pids == pids
    job = make_job("model-a")
    torch.testing.assert_close(pool.run(job, CFG2), expected_latent(job, 2, 3.0), rtol=0, atol=0)
    assert pool.pids == pids


# ---------------------------------------------------------------------- faults
def test_ranks_stuck_in_a_collective_are_detected(pool):
    """Heartbeats go on (side thread) while a rank is stuck; the progress watchdog still stops the job."""
    pool.start()
    pids = pool.pids
    t0 = time.monotonic()
    with pytest.raises(PoolError, match="made no progress"):
        pool.run(make_job("model-a", steps=6, stall_step=2, stall_rank=1), CFG2)
    assert time.monotonic() - t0 < HANG_S + 5.0
    check_fresh_pool_works(pool, pids)


def test_a_job_error_on_one_rank_only_is_a_pool_error(pool):
    """A runtime bug: one rank rejects the job while the others wait in a collective."""
    pool.start()
    pids = pool.pids
    t0 = time.monotonic()
    with pytest.raises(PoolError, match="rank 0 .* went on after rank 1 rejected the job") as e:
        pool.run(make_job("model-a", job_error=True, job_error_rank=1), CFG2)
    assert time.monotonic() - t0 < HANG_S + 3.0 and e.value.rank == 0
    check_fresh_pool_works(pool, pids)


def test_runtime_exception_restarts_the_pool(pool):
    pool.start()
    pids = pool.pids
    with pytest.raises(PoolError, match="fake engine failure on rank 1") as e:
        pool.run(make_job("model-a", steps=6, fail_step=1, fail_rank=1), CFG2)
    assert e.value.rank == 1 and "Traceback" in str(e.value) and "next job starts a fresh pool" in str(e.value)
    assert wait_gone(pids, 1.0) == []
    check_fresh_pool_works(pool, pids)


def test_sigkill_mid_job_fails_fast_and_the_next_job_runs_on_a_fresh_pool(pool):
    pool.start()
    pids, killed = pool.pids, []

    def on_progress(step, total, preview):
        if step == 2 and not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed.append(time.monotonic())

    with pytest.raises(PoolError) as e:
        pool.run(make_job("model-a", steps=30, sleep=0.2), CFG2, on_progress=on_progress)
    assert time.monotonic() - killed[0] < 10.0
    assert e.value.rank == 1 and "rank 1" in str(e.value) and "SIGKILL" in str(e.value)
    assert wait_gone(pids, 1.0) == []                  # the survivor, stuck in a collective, was killed too
    check_fresh_pool_works(pool, pids)


def test_a_stopped_worker_is_reported_after_the_hang_timeout(pool):
    pool.start()
    pids, stopped = pool.pids, []

    def on_progress(step, total, preview):
        if step == 2 and not stopped:
            os.kill(pids[1], signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        with pytest.raises(PoolError, match="hang_timeout") as e:
            pool.run(make_job("model-a", steps=40, sleep=0.2), CFG2, on_progress=on_progress)
        waited = time.monotonic() - stopped[0]
        assert HANG_S - HEARTBEAT_S - 0.2 <= waited < HANG_S + 5.0   # silent since its last heartbeat
        assert e.value.rank == 1 and "rank 1" in str(e.value) and "heartbeat" in str(e.value)
        assert wait_gone(pids, 1.0) == []
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
    check_fresh_pool_works(pool, pids)


def test_worker_exits_when_its_control_connection_ends(pool):
    """The watchdog every OS has (Linux also has PR_SET_PDEATHSIG)."""
    pool.start()
    pids = pool.pids
    worker = pool._workers[1]
    worker.conn.close()
    deadline = time.monotonic() + 10.0
    while worker.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.proc.returncode == 3 and not pool.alive
    check_fresh_pool_works(pool, pids)


def test_startup_failure_is_a_clear_error():
    client = PoolClient(POOL1, runtime="tests.fake_runtime:NoSuchRuntime",
                        startup_timeout=60)
    t0 = time.monotonic()
    with pytest.raises(PoolError, match="failed to start: AttributeError.*NoSuchRuntime") as e:
        client.start()
    assert time.monotonic() - t0 < 30 and e.value.rank == 0 and "start the pool again" in str(e.value)
    assert not client.alive and client.pids == []


def test_a_worker_that_dies_before_connecting_or_cannot_be_started_is_reported():
    with pytest.raises(PoolError, match="during start-up: rank 0 .* exited with code 1"):
        PoolClient(POOL1, python="/bin/false").start()
    with pytest.raises(PoolError, match="interpreter '/nonexistent/python'"):
        PoolClient(POOL1, python="/nonexistent/python").start()


def test_startup_timeout_is_never_a_silent_hang(monkeypatch):
    monkeypatch.setenv("FAKE_RUNTIME_INIT_SLEEP", "60")
    client = PoolClient(POOL1, runtime=FAKE, startup_timeout=3)
    t0 = time.monotonic()
    with pytest.raises(PoolError, match=r"startup_timeout \(3 s\)"):
        client.start()
    assert time.monotonic() - t0 < 8
    assert client.pids == []


# ---------------------------------------------------------------------- control channel, shutdown
def test_control_channel_rejects_a_peer_without_the_key(pool):
    pool.close()
    starter = threading.Thread(target=pool.start)
    starter.start()
    try:
        deadline = time.monotonic() + 10.0
        while pool.control_address is None and time.monotonic() < deadline:
            time.sleep(0.01)
        address = pool.control_address
        assert isinstance(address, str), "expected a Unix socket"              # not a network port
        assert os.path.dirname(address) == pool.temp_dir
        assert stat.S_IMODE(os.stat(pool.temp_dir).st_mode) == 0o700         # nobody else can reach it
        with pytest.raises(AuthenticationError):
            Client(address, "AF_UNIX", authkey=os.urandom(32))
    finally:
        starter.join()
    pids = pool.pids
    time.sleep(0.5)
    assert pool.alive and pool.pids == pids             # the real workers got in, and outlive the thread
    assert pool.control_address is None and not os.path.exists(address)   # closed after start-up


def test_close_leaves_no_worker_and_no_file(pool):
    pool.start()
    pids, tmp = pool.pids, pool.temp_dir
    pool.close()
    assert [p for p in pids if alive(p)] == []
    assert not os.path.exists(tmp) and pool.pids == [] and not pool.alive
    pool.close()                                        # idempotent


PARENT = """
import json, sys, time
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.worker import PoolClient
from comfyui_xdit_hunyuan.worker.client import close_pools_on_sigterm
assert not {on_sigterm} or close_pools_on_sigterm()
pool = PoolClient(PoolConfig(devices="cpu:2"), runtime={fake!r}).start()
print(json.dumps([pool.pids, pool.temp_dir]), flush=True)
time.sleep(120)
"""


def start_parent(on_sigterm: bool = False) -> tuple[subprocess.Popen, list[int], str]:
    """A process that starts a pool (like ComfyUI does), with its pids and private folder."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(fake=FAKE, on_sigterm=on_sigterm)],
                              stdout=subprocess.PIPE, cwd=ROOT)
    ready, _, _ = select.select([parent.stdout], [], [], 120)
    if not ready:
        parent.kill()
        pytest.fail("the parent script did not start its pool")
    pids, folder = json.loads(parent.stdout.readline())
    assert len(pids) == 2 and all(alive(p) for p in pids) and os.path.isdir(folder)
    return parent, pids, folder


def test_killing_the_parent_leaves_no_worker():
    parent, pids, folder = start_parent()
    parent.kill()
    parent.wait()
    assert wait_gone(pids, 10.0) == []
    # the dead client could not delete its folder: the next pool start sweeps it
    assert os.path.isdir(folder) and folder in sweep_stale_dirs() and not os.path.exists(folder)


def test_sigterm_of_the_parent_closes_the_pool_and_removes_its_folder():
    parent, pids, folder = start_parent(on_sigterm=True)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == -signal.SIGTERM        # it still ends the way SIGTERM ends it
    assert wait_gone(pids, 10.0) == []
    assert not os.path.exists(folder)


def test_get_pool_reuses_per_key_and_restarts_on_a_new_one():
    try:
        a = get_pool(POOL2, runtime=FAKE)
        assert get_pool(PoolConfig(devices="cpu:2", auto_table="other.json")) is a   # same key
        job = make_job("registry")
        torch.testing.assert_close(a.run(job, CFG2), expected_latent(job, 2, 3.0), rtol=0, atol=0)
        pids = a.pids
        b = get_pool(POOL1, runtime=FAKE)
        assert b is not a and not a.alive and wait_gone(pids, 1.0) == []
        torch.testing.assert_close(b.run(job, SERIAL), expected_latent(job, 1, 3.0), rtol=0, atol=0)
        assert get_pool(POOL1) is b and b.alive
        pids = b.pids
    finally:
        shutdown_all()
    assert wait_gone(pids, 1.0) == [] and not b.alive


def test_another_package_named_worker_does_not_shadow_the_pool(monkeypatch, tmp_path):
    """ComfyUI loads many packs into one process, and any of them (or a library) may bring a top-level
    `worker` module: the pool is comfyui_xdit_hunyuan.worker in the client and in the worker processes,
    so neither a `worker` already imported nor one first on the workers' path is ever used."""
    import types

    foreign = tmp_path / "worker"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise ImportError('the foreign worker package was imported')\n")
    (foreign / "main.py").write_text("raise SystemExit('the foreign worker program ran')\n")
    monkeypatch.setitem(sys.modules, "worker", types.ModuleType("worker"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]))
    job = make_job("foreign-worker")
    with PoolClient(POOL1, runtime=FAKE, startup_timeout=120) as client:
        torch.testing.assert_close(client.run(job, SERIAL), expected_latent(job, 1, 3.0),
                                   rtol=0, atol=0)
    assert PoolClient.__module__ == "comfyui_xdit_hunyuan.worker.client"


def test_only_changed_tensors_travel_and_recent_ones_come_back_without_a_transfer(pool):
    """A versioned state dict (as the ComfyUI adapter's): a LoRA-like change sends the changed keys only,
    going back restores the tensors the workers kept, the same weights again send nothing; every result is
    the one the weights give."""
    g = torch.Generator().manual_seed(11)
    base = {f"k{i}": torch.randn(4, generator=g) for i in range(6)}
    lora = {k: base[k] + 1.0 for k in ("k1", "k4")}

    def source(strength: float | None):
        tensors = dict(base)
        versions = {k: ("base", k) for k in base}
        if strength is not None:
            for k in lora:
                tensors[k], versions[k] = base[k] + strength * (lora[k] - base[k]), ("lora", k, strength)
        return Versioned(tensors, versions)

    expected_counts = [  # (strength, whole, sent, restored, unchanged)
        (None, True, 6, 0, 0), (0.5, False, 2, 0, 4), (0.8, False, 2, 0, 4), (None, False, 0, 2, 4),
        (0.5, False, 0, 2, 4), (0.5, False, 0, 0, 6)]
    for i, (strength, whole, sent, restored, unchanged) in enumerate(expected_counts):
        src = source(strength)
        job = make_job("versioned", source=src, steps=2)
        weight = float(sum(t.double().sum() for t in src.values()))
        torch.testing.assert_close(pool.run(job, CFG2), expected_latent(job, 2, weight), rtol=0, atol=1e-5)
        counts = pool.last_stats["weights"]
        assert (counts["whole"], counts["sent"], counts["restored"], counts["unchanged"]) == \
            (whole, sent, restored, unchanged), (i, counts)
    assert all(r["runtime"]["kept"] == 6 for r in pool.last_stats["ranks"])   # base, 0.5 and 0.8 of k1, k4


def test_kept_tensors_stay_within_their_budget():
    g = torch.Generator().manual_seed(3)
    tensors = {f"k{i}": torch.randn(1024, generator=g) for i in range(4)}        # 4 KiB each in float32
    budget = PoolConfig(devices="cpu:1", keep_weights_gib=6 * 1024 / (1 << 30))  # room for one kept tensor
    with PoolClient(budget, runtime=FAKE, startup_timeout=120) as client:
        for version in range(4):
            changed = dict(tensors, k0=tensors["k0"] + version)
            job = make_job("budget", source=Versioned(changed, {**{k: 0 for k in tensors}, "k0": version}))
            client.run(job, SERIAL)
            assert client.last_stats["ranks"][0]["runtime"]["kept"] <= 1
        client.run(make_job("budget", source=Versioned(tensors, {k: 0 for k in tensors})), SERIAL)
        assert client.last_stats["weights"]["sent"] == 1        # version 0 of k0 was dropped: sent again
