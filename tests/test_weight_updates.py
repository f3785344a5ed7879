"""Weight changes on a warm pool with the real engine (CPU workers): only the tensors that change travel
(LoRA-like changes of a few keys, a strength changed, the change removed, the model swapped and back), they
are applied in place, and every result equals the same job run with a fresh runtime on the same weights."""
from __future__ import annotations

import os

import pytest
import torch

from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.job import PoolError, WeightsRef
from comfyui_xdit_hunyuan.plan import ParallelConfig, PlanError
from comfyui_xdit_hunyuan.tiny import random_model
from comfyui_xdit_hunyuan.worker import PoolClient
from comfyui_xdit_hunyuan.worker.weights import Versioned
from parallel_harness import PRESET, SEED, make_job, run_on_mesh
from tests.test_pool import wait_gone

LORA_KEYS = ("blocks.1.attn1.Wqkv.weight", "blocks.2.attn1.out_proj.weight", "blocks.5.mlp.fc1.weight")


def model_weights(seed: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in random_model(PRESET, seed=seed).state_dict().items()}


def versioned(base: dict, name: str, strength: float | None = None) -> Versioned:
    """`base` with a rank-2 "LoRA" of `strength` on LORA_KEYS, versioned like the adapter's weights."""
    tensors, versions = dict(base), {k: (name, k) for k in base}
    if strength is not None:
        g = torch.Generator().manual_seed(5)
        for k in LORA_KEYS:
            w = base[k]
            up, down = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
            tensors[k], versions[k] = w + strength * 0.05 * (up @ down), (name, k, "lora", strength)
    return Versioned(tensors, versions)


def test_changes_travel_as_deltas_and_every_result_equals_a_fresh_run(monkeypatch):
    a, b = model_weights(SEED), model_weights(SEED + 1)
    steps = [("a", None), ("a", 1.0), ("a", 0.6), ("a", None), ("b", None), ("a", None), ("a", 0.6)]
    plan = ParallelConfig()
    jobs, sent = [], []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")        # the worker rounds as the one-thread fresh runs do
    with PoolClient(PoolConfig(devices="cpu:1"), startup_timeout=300) as client:
        for name, strength in steps:
            src = versioned(a if name == "a" else b, name, strength)
            job = make_job(h=8, w=12, steps=2)
            job.weights = WeightsRef(f"{name}:{strength}", src)
            out = client.run(job, plan)
            sent.append((client.last_stats["weights"]["whole"], client.last_stats["weights"]["sent"],
                         client.last_stats["weights"]["restored"]))
            jobs.append((job, src, out))
    n = len(a)
    assert sent == [(True, n, 0), (False, 3, 0), (False, 3, 0), (False, 0, 3), (False, n, 0), (False, 0, n),
                    (False, 0, 3)], sent
    for job, src, out in jobs:                       # each against a fresh runtime loading the whole dict
        job.weights = WeightsRef("fresh", dict(src))
        assert torch.equal(out, run_on_mesh(plan, [job])[0])


def _our_pool_dirs() -> list[str]:
    """Private folders (temporary folder and /dev/shm) that this process's pools own."""
    import glob
    import tempfile
    mine = []
    for root in (tempfile.gettempdir(), "/dev/shm"):
        for folder in glob.glob(os.path.join(root, "xdit-pool-*")):
            try:
                if open(os.path.join(folder, "owner")).read().strip() == str(os.getpid()):
                    mine.append(folder)
            except OSError:
                pass
    return mine


def test_thirty_changes_stay_within_their_bounds_and_leave_nothing(monkeypatch):
    """30 LoRA-like changes in a row (a new strength every time): what the workers keep aside stays within
    keep_weights_gib, their resident memory within 64 MiB of where it was after the first changes, and no
    staged file or private folder (temporary folder or /dev/shm) outlives the pool, also when a worker was
    killed (SIGKILL)."""
    import signal

    base = model_weights(SEED)
    one_change = sum(base[k].numel() for k in LORA_KEYS) * 4               # float32 workers
    pool = PoolConfig(devices="cpu:1", keep_weights_gib=3.5 * one_change / (1 << 30))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rss, kept = [], []
    with PoolClient(pool, startup_timeout=300) as client:
        for i in range(30):
            job = make_job(h=8, w=8, steps=1)
            job.weights = WeightsRef(f"a:{i}", versioned(base, "a", 0.1 + 0.03 * i))
            client.run(job, ParallelConfig())
            r = client.last_stats["ranks"][0]
            rss.append(r["rss_bytes"])
            kept.append(r["runtime"]["kept_bytes"])
            assert not os.listdir(client.stage_dir) or os.listdir(client.stage_dir) == ["owner"]
        assert max(kept) <= pool.keep_weights_gib * (1 << 30)
        assert max(rss[5:]) - rss[5] < 64 << 20, [r >> 20 for r in rss]
        folders = _our_pool_dirs()
        assert len(folders) == 2                                           # its private folder and its staging one
        os.kill(client.pids[0], signal.SIGKILL)
        assert wait_gone(client.pids, 10.0) == []
        job = make_job(h=8, w=8, steps=1)
        job.weights = WeightsRef("after-kill", versioned(base, "a", 0.9))
        try:
            client.run(job, ParallelConfig())                               # a fresh pool takes over ...
        except PoolError:                                                   # ... or this job meets the dead
            client.run(job, ParallelConfig())                               # worker first, and the next does
        assert not any(os.path.exists(f) for f in folders)                 # the killed pool's folders are gone
    assert _our_pool_dirs() == []


def test_a_cpu_pool_or_weights_transfer_file_stages_a_whole_model_in_a_file(monkeypatch):
    """The whole model goes through a staged file when no worker's GPU is reachable (CPU workers), whatever
    weights_transfer says; an unknown transfer is refused before any worker starts."""
    with pytest.raises(PlanError, match="weights_transfer 'ipc' is unknown; choose one of auto, file"):
        PoolConfig(devices="cpu:1", weights_transfer="ipc").validate()
    assert PoolConfig(weights_transfer="file").key() == PoolConfig().key()      # the workers do not depend on it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with PoolClient(PoolConfig(devices="cpu:1"), startup_timeout=300) as client:
        job = make_job(h=8, w=8, steps=1)
        job.weights = WeightsRef("whole", versioned(model_weights(SEED), "a"))
        client.run(job, ParallelConfig())
        w = client.last_stats["weights"]
        assert w["whole"] and w.get("shared", 0) == 0 and w["sent"] == len(job.weights.source)


def _gpu_pool_results(transfer: str, sources: list) -> tuple[list, list]:
    outs, stats = [], []
    with PoolClient(PoolConfig(devices="cuda:0", dtype="fp32", compile=False, weights_transfer=transfer),
                    startup_timeout=300) as client:
        for name, src in sources:
            job = make_job(h=16, w=16, steps=2)
            job.weights = WeightsRef(name, src)
            outs.append(client.run(job, ParallelConfig()))
            stats.append(dict(client.last_stats["weights"]))
    return outs, stats


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_a_whole_model_over_cuda_ipc_equals_the_staged_file_bit_for_bit():
    """weights_transfer auto on a GPU pool: a whole model (CPU tensors) is handed over in one GPU buffer, a
    change of every tensor (already on the worker's GPU) tensor by tensor, and every result equals the file
    transfer's exactly;
    the client's GPU copy is released after the job."""
    base = model_weights(SEED)
    sources = [("cpu", versioned(base, "a")), ("lora", versioned(base, "a", 0.5)),
               ("resident", versioned({k: v.cuda() for k, v in model_weights(SEED + 1).items()}, "b"))]
    by_file, _ = _gpu_pool_results("file", sources)
    before = torch.cuda.memory_allocated()
    by_ipc, stats = _gpu_pool_results("auto", sources)
    assert stats[0]["whole"] and stats[0]["shared"] == len(base), stats[0]
    assert not stats[2]["whole"] and stats[2]["shared"] == len(base), stats[2]   # every key new: each shared
    diffs = [(a - b).abs().max().item() for a, b in zip(by_file, by_ipc)]
    assert all(torch.equal(a, b) for a, b in zip(by_file, by_ipc)), diffs
    assert torch.cuda.memory_allocated() <= before
