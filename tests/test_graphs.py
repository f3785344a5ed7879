"""CUDA graphs of the local model call (one GPU, CFG parallel), with the recording replaced by a CPU stand-in
that behaves like a graph: a replay re-runs the recorded function on the graph's own buffers and writes into
the same output tensor. So a per-job input that is not copied into those buffers, a stale output, or a key
that mixes two shapes gives a wrong latent here, as it would on a GPU. (Real graphs are checked on GPUs by
bench/gpu_checks.py: graphed vs not, same latent.)"""
from __future__ import annotations

import pytest
import torch

from comfyui_xdit_hunyuan.parallel.graphs import GraphCache, graphs_mode
from comfyui_xdit_hunyuan.parallel.runtime import RankRuntime
from comfyui_xdit_hunyuan.config import PoolConfig, env_overrides
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.tiny import preset, random_cond
from tests.parallel_harness import PRESET, ReplayOnBuffers, make_job, run_on_mesh


def _runtime(graphs):
    rt = RankRuntime(PoolConfig(devices="cpu"), 0, 1, "cpu")
    rt.graphs = graphs
    return rt


def _run(rt, job):
    return rt.run(job, ParallelConfig(), report=lambda m: None, cancel_requested=lambda: False)


def test_graphed_runs_equal_plain_runs_across_jobs_and_shapes():
    other_prompt = [random_cond(preset(PRESET), 11, hw=(128, 128))]
    jobs = [make_job(steps=4, seed=1),
            make_job(steps=4, seed=2, guidance=3.0, positive=other_prompt),         # same shape, new prompt
            make_job(h=16, w=24, steps=3, seed=3),                                  # another shape
            make_job(steps=3, seed=4, guidance=1.0),                                # no uncond: batch 1
            make_job(steps=4, seed=5)]                                              # the first shape again
    plain = [_run(_runtime(None), j) for j in jobs]
    rec = ReplayOnBuffers()
    rt = _runtime(GraphCache(rec, max_entries=2))
    graphed = [_run(rt, j) for j in jobs]
    for i, (a, b) in enumerate(zip(plain, graphed)):
        assert torch.equal(a, b), f"job {i}: graphed latent differs by {(a - b).abs().max().item()}"
    assert not torch.equal(plain[0], plain[1])
    g = rt.graphs
    assert rec.records == g.captures == 4           # shapes (16,16)x2, (16,24)x2, (16,16)x1, again (16,16)x2
    assert len(g.entries) == 2 and g.failures == 0   # evicted beyond max_entries
    assert sum(e.replays for e in g.entries.values()) > 0


def test_a_failed_recording_falls_back_to_the_plain_call():
    job = make_job(steps=3, seed=1)
    ref = _run(_runtime(None), job)
    rt = _runtime(GraphCache(ReplayOnBuffers(fail=True)))
    assert torch.equal(_run(rt, job), ref)
    assert torch.equal(_run(rt, job), ref)
    assert rt.graphs.failures == 1 and rt.graphs.captures == 0    # not retried for that shape


def test_new_weights_drop_the_graphs():
    job = make_job(steps=3)
    rt = _runtime(GraphCache(ReplayOnBuffers()))
    _run(rt, job)
    assert rt.graphs.entries
    rt.ensure_weights(type(job.weights)("random:5:tiny", "random:5:tiny"))
    assert not rt.graphs.entries
    other = make_job(steps=3)
    other.weights = type(job.weights)("random:5:tiny", "random:5:tiny")
    assert torch.equal(_run(rt, other), _run(_runtime(None), other))


def test_cache_keys_by_signature_and_copies_job_inputs_once():
    def fn(a, b):
        return a * 2 + b

    rec = ReplayOnBuffers()
    g = GraphCache(rec)
    x, y = torch.ones(3), torch.full((3,), 5.0)
    job1, job2 = object(), object()
    assert torch.equal(g("k", fn, [x], [y], job=job1), torch.full((3,), 7.0))     # plain first call
    assert torch.equal(g("k", fn, [x * 2], [y], job=job1), torch.full((3,), 9.0))  # recorded + replayed
    assert torch.equal(g("k", fn, [x], [y * 0], job=job2), torch.full((3,), 2.0))  # new job: b copied
    assert torch.equal(g("k", fn, [x], [y], job=job2), torch.full((3,), 2.0))      # same job: b not re-read
    assert g("k", fn, [torch.ones(2, 3)], [y], job=job2).shape == (2, 3)           # new signature: new entry
    assert len(g.entries) == 2 and rec.records == 1


@pytest.mark.parametrize("value,expected", [(None, "all"), ("1", "all"), ("local", "local"), ("0", None),
                                            ("off", None)])
def test_graphs_mode_on_cuda_only_and_by_the_variable(value, expected):
    env = {} if value is None else {"XDIT_HUNYUAN_CUDA_GRAPHS": value}
    pool = PoolConfig().with_overrides(env_overrides(env))
    assert graphs_mode(torch.device("cuda"), pool.cuda_graphs, pool.compile_mode) == expected
    assert graphs_mode(torch.device("cpu"), pool.cuda_graphs, pool.compile_mode) is None
    assert graphs_mode(torch.device("cuda"), pool.cuda_graphs, "reduce-overhead") is None


@pytest.mark.parametrize("degrees", [dict(cfg_degree=2), dict(ulysses_degree=2), dict(ring_degree=2)])
def test_graphed_ranks_equal_plain_ranks(degrees):
    """Two gloo ranks: the graphed whole-model call (for Ulysses / Ring with its collectives inside) gives
    the same latents as the plain call, over two jobs of one shape and one of another."""
    plan = ParallelConfig(**degrees)
    other_prompt = [random_cond(preset(PRESET), 11, hw=(128, 128))]
    jobs = [make_job(steps=3, seed=1), make_job(steps=3, seed=2, positive=other_prompt),
            make_job(h=16, w=24, steps=3, seed=3)]
    plain = run_on_mesh(plan, jobs)
    *graphed, counts = run_on_mesh(plan, jobs, graphs=True)
    assert counts["captures"] == 2 and counts["replays"] >= 2, counts
    for i, (a, b) in enumerate(zip(plain, graphed)):
        assert torch.equal(a, b), f"job {i}: {(a - b).abs().max().item()}"


def test_graphed_usp_on_four_ranks():
    plan = ParallelConfig(ulysses_degree=2, ring_degree=2)
    other_prompt = [random_cond(preset(PRESET), 11, hw=(128, 128))]
    jobs = [make_job(steps=3, seed=1), make_job(steps=3, seed=2, positive=other_prompt)]
    plain = run_on_mesh(plan, jobs)
    *graphed, counts = run_on_mesh(plan, jobs, graphs=True)
    assert counts["captures"] == 1 and counts["replays"] == 5, counts      # every call after the first
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b)


def test_out_of_memory_drops_the_other_shapes_once_unless_the_call_communicates():
    state = {"oom": 0}

    def fn(a, b):
        if state["oom"]:
            state["oom"] -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return a + b

    g = GraphCache(ReplayOnBuffers())
    y = torch.zeros(3)
    g("k", fn, [torch.ones(2)], [y[:2]], job=1)
    g("k", fn, [torch.ones(2)], [y[:2]], job=1)                 # recorded
    state["oom"] = 1                                             # a new shape does not fit ...
    assert torch.equal(g("k", fn, [torch.ones(3)], [y], job=1), torch.ones(3))
    assert len(g.entries) == 1                                   # ... so the other shape's graph went
    g("k", fn, [torch.ones(2)], [y[:2]], job=1)
    state["oom"] = 1
    with pytest.raises(torch.cuda.OutOfMemoryError):             # partners are inside the collectives
        g("k", fn, [torch.ones(4)], [torch.zeros(4)], job=1, communicates=True)
    state["oom"] = 2                                             # still out of memory after dropping
    with pytest.raises(torch.cuda.OutOfMemoryError):
        g("k", fn, [torch.ones(5)], [torch.zeros(5)], job=1)


def test_one_runner_reused_for_two_jobs_copies_the_second_jobs_text():
    from comfyui_xdit_hunyuan.parallel.mesh import build_mesh
    from comfyui_xdit_hunyuan.parallel.runner import Runner
    from comfyui_xdit_hunyuan.tiny import random_model

    model, plan = random_model(PRESET, seed=0), ParallelConfig()
    jobs = [make_job(steps=3, seed=1), make_job(steps=3, seed=1, positive=[random_cond(preset(PRESET), 11,
                                                                                         hw=(128, 128))])]
    plain = [Runner(model, build_mesh({}, 0), plan).run(j) for j in jobs]
    runner = Runner(model, build_mesh({}, 0), plan, graphs=GraphCache(ReplayOnBuffers()))
    graphed = [runner.run(j) for j in jobs]
    assert not torch.equal(plain[0], plain[1])
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b)
