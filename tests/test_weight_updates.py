"""Weight changes on a warm pool with the real engine (CPU workers): only the tensors that change travel
(LoRA-like changes of a few keys, a strength changed, the change removed, the model swapped and back), they
are applied in place, and every result equals the same job run with a fresh runtime on the same weights."""
from __future__ import annotations

import torch

from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.job import WeightsRef
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.tiny import random_model
from comfyui_xdit_hunyuan.worker import PoolClient
from comfyui_xdit_hunyuan.worker.weights import Versioned
from parallel_harness import PRESET, SEED, make_job, run_on_mesh

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
