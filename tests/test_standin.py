"""One rank of a parallel plan, alone (parallel.mesh.standin_mesh, the collectives of
parallel/collectives.py's LocalStandIn): what bench/floors.py measures on one GPU.

- every plan the bench knows runs alone, on every rank it measures (tiny model, CPU);
- a stand-in rank does a real rank's work: the same collective calls with the same shapes (token counts,
  heads, split sizes, peers), the same attention kernel calls and block ranges on the same tensor shapes as
  that rank of a real gloo run of the plan;
- its result equals a real rank's only where a stand-in is exact by construction: the serial plan (no
  collectives) and CFG parallel with cfg 1 (no exchange: each rank computes the whole guidance alone).
  Elsewhere the other ranks' data are stood in by this rank's own, and nothing is claimed about values.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import floors
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.model import hunyuandit
from comfyui_xdit_hunyuan.model.hunyuandit import HunyuanDiT
from comfyui_xdit_hunyuan.parallel import collectives, sequence
from comfyui_xdit_hunyuan.parallel.collectives import LocalGroup, LocalStandIn
from comfyui_xdit_hunyuan.parallel.mesh import coords_of, standin_mesh
from comfyui_xdit_hunyuan.parallel.runtime import RankRuntime
from comfyui_xdit_hunyuan.plan import ParallelConfig
from parallel_harness import _free_port, make_job


def _sig(t: torch.Tensor) -> tuple:
    return tuple(t.shape), str(t.dtype)


class Recording:
    """Collectives that write down the work of every call (op, group, shapes, dtypes, split sizes, peer) and
    hand it to the real ones. The cancel agreement on the control group is left out: a stand-in has none."""

    def __init__(self, inner, mesh, log: list):
        self.inner, self.log = inner, log
        self.names = {id(g): a for a, g in mesh.groups.items() if g is not None}
        if mesh.sp_group is not None:
            self.names[id(mesh.sp_group)] = "sp"
        self.names.update({id(g): flow for flow, g in mesh.p2p.items()})
        if mesh.ctrl is not None:
            self.names[id(mesh.ctrl)] = "ctrl"

    def _name(self, group):
        return self.names.get(id(group), repr(group))

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None,  # noqa: A002
                          group=None, async_op=False):
        self.log.append(("all_to_all_single", self._name(group), _sig(output), _sig(input),
                         tuple(output_split_sizes), tuple(input_split_sizes)))
        return self.inner.all_to_all_single(output, input, output_split_sizes=output_split_sizes,
                                            input_split_sizes=input_split_sizes, group=group, async_op=async_op)

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        self.log.append(("all_gather", self._name(group), len(tensor_list), _sig(tensor)))
        return self.inner.all_gather(tensor_list, tensor, group=group, async_op=async_op)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        if self._name(group) != "ctrl":
            self.log.append(("all_reduce", self._name(group), _sig(tensor)))
        return self.inner.all_reduce(tensor, op=op, group=group, async_op=async_op)

    def isend(self, tensor, dst, group=None, tag=0):
        self.log.append(("isend", self._name(group), _sig(tensor), dst))
        return self.inner.isend(tensor, dst, group=group)

    def irecv(self, tensor, src=None, group=None, tag=0):
        self.log.append(("irecv", self._name(group), _sig(tensor), src))
        return self.inner.irecv(tensor, src, group=group)

    def send(self, tensor, dst, group=None, tag=0):
        self.log.append(("send", self._name(group), _sig(tensor), dst))
        return self.inner.send(tensor, dst, group=group)

    def recv(self, tensor, src=None, group=None, tag=0):
        self.log.append(("recv", self._name(group), _sig(tensor), src))
        return self.inner.recv(tensor, src, group=group)


def _record_work(setattr_, log: list) -> None:
    """Also write down the attention kernels' inputs and the block ranges run, with their shapes."""
    def kernel(name, fn):
        def call(q, k, v, backend="auto"):
            log.append((name, _sig(q), _sig(k), _sig(v)))
            return fn(q, k, v, backend)
        return call
    run_blocks = HunyuanDiT.run_blocks

    def blocks(self, x, cond, rope, blks, skips, attention):
        blks = list(blks)
        log.append(("run_blocks", _sig(x), tuple(blks), tuple(sorted(skips))))
        return run_blocks(self, x, cond, rope, blks, skips, attention)
    setattr_(sequence, "attention", kernel("attention", sequence.attention))
    setattr_(sequence, "attention_lse", kernel("attention_lse", sequence.attention_lse))
    setattr_(hunyuandit, "attention_kernel", kernel("attention", hunyuandit.attention_kernel))
    setattr_(HunyuanDiT, "run_blocks", blocks)


def _run_rank(rt: RankRuntime, plan: ParallelConfig, jobs, log: list) -> list:
    mesh = rt.mesh_for(plan)
    mesh.comm = Recording(mesh.comm, mesh, log)
    return [rt.run(j, plan, report=lambda m: None, cancel_requested=lambda: False) for j in jobs]


def _recording_rank(rank, world, port, plan, jobs, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    log: list = []
    _record_work(setattr, log)
    rt = RankRuntime(PoolConfig(devices="cpu"), rank, world, "cpu")
    results = _run_rank(rt, plan, jobs, log)
    torch.save((log, results), os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _standin_rank(rank, plan, jobs, monkeypatch):
    log: list = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # as the real ranks: the same GEMM blocking, the same rounding
    try:
        with monkeypatch.context() as m:
            _record_work(m.setattr, log)
            rt = RankRuntime(PoolConfig(devices="cpu"), rank, plan.world_size, "cpu", mesh_builder=standin_mesh)
            results = _run_rank(rt, plan, jobs, log)
    finally:
        torch.set_num_threads(threads)
    return log, results


RECORDED = {"cfg2": dict(cfg_degree=2), "ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2),
            "pp2": dict(pipefusion_degree=2), "cfg2xulysses2": dict(cfg_degree=2, ulysses_degree=2)}


@pytest.mark.parametrize("name", list(RECORDED))
def test_a_standin_rank_does_the_work_of_a_real_rank(name, tmp_path, monkeypatch):
    plan = ParallelConfig(**RECORDED[name])
    jobs = [make_job(18, 14, steps=2), make_job(16, 16, steps=2, guidance=1.0)]  # 9 x 7 tokens; cfg 1
    mp.spawn(_recording_rank, args=(plan.world_size, _free_port(), plan, jobs, str(tmp_path)),
             nprocs=plan.world_size)
    for rank in range(plan.world_size):
        real_log, real = torch.load(tmp_path / f"{rank}.pt")
        log, alone = _standin_rank(rank, plan, jobs, monkeypatch)
        assert any(e[0] in ("all_to_all_single", "all_gather", "irecv") for e in real_log), name
        assert log == real_log, (name, rank, next((a, b) for a, b in zip(log, real_log) if a != b))
        if rank == 0:
            assert alone[0].shape == real[0].shape
            if name == "cfg2":        # cfg 1: no exchange, the stand-in is exact by construction
                assert torch.equal(alone[1], real[1])


def test_the_serial_plan_alone_is_the_serial_run():
    """No collectives: the stand-in mesh of the serial plan changes nothing."""
    job = make_job(16, 16, steps=2)
    real = RankRuntime(PoolConfig(devices="cpu"), 0, 1, "cpu")
    alone = RankRuntime(PoolConfig(devices="cpu"), 0, 1, "cpu", mesh_builder=standin_mesh)
    out = [rt.run(job, ParallelConfig(), report=lambda m: None, cancel_requested=lambda: False) for rt in (real, alone)]
    assert torch.equal(*out)


def test_standin_mesh_is_a_real_ranks_mesh_alone():
    mesh = standin_mesh({"cfg": 2, "ulysses": 2}, 3)
    assert mesh.world == 4 and mesh.coords == coords_of(3, mesh.degrees) == {"cfg": 1, "pp": 0, "ring": 0, "ulysses": 1}
    assert mesh.groups == {"cfg": LocalGroup("cfg", 2, 1), "pp": None, "ring": None, "ulysses": LocalGroup("ulysses", 2, 1)}
    assert mesh.sp_group == LocalGroup("sp", 2, 1) and mesh.ctrl is None and not mesh.p2p
    assert isinstance(mesh.comm, LocalStandIn)
    pp = standin_mesh({"pp": 2}, 1)
    assert set(pp.p2p) == {"hidden", "skip", "latent"} and pp.rank_at(pp=0) == 0
    assert standin_mesh({}, 0).world == 1 and standin_mesh({}, 0).groups == {}


def test_the_standin_collectives_write_every_output():
    comm, g = LocalStandIn(), LocalGroup("ulysses", 2, 0)
    x = torch.arange(6.0)
    out = torch.full((6,), float("nan"))
    comm.all_to_all_single(out, x, output_split_sizes=[3, 3], input_split_sizes=[3, 3], group=g)
    assert torch.equal(out, x)
    out = torch.full((5,), float("nan"))                     # uneven: segment i from input segment i
    comm.all_to_all_single(out, x, output_split_sizes=[3, 2], input_split_sizes=[2, 4], group=g)
    assert torch.equal(out, torch.tensor([0.0, 1.0, 0.0, 2.0, 3.0]))
    parts = [torch.empty(3) for _ in range(2)]
    assert comm.all_gather(parts, x[:3], group=g, async_op=True).wait()
    assert all(torch.equal(p, x[:3]) for p in parts)
    buf = torch.full((2,), 7.0)
    comm.irecv(buf, 1, group=LocalGroup("hidden", 2, 0)).wait()
    assert torch.equal(buf, torch.zeros(2)) and comm.isend(x, 1, group=g).wait()
    with pytest.raises(ValueError):
        comm.all_gather([torch.empty(3)], x[:3], group=g)
    with pytest.raises(TypeError):
        comm.all_gather(parts, x[:3], group=None)
    assert collectives.TORCH.all_gather is dist.all_gather        # the real path: torch.distributed itself


def test_every_plan_of_the_floors_bench_runs_alone(tmp_path):
    out = tmp_path / "floors.json"
    assert floors.main(["--device", "cpu", "--preset", "tiny", "--sizes", "128", "--steps", "1", "--warm-steps", "1",
                        "--compile", "off", "--plans", "all", "--ranks", "stages", "--cache-dir", "",
                        "--out", str(out)]) == 0
    import json
    rows = json.loads(out.read_text())["results"]
    expected = {(n, r) for n in floors.PLANS for r in floors.ranks_of(ParallelConfig(**floors.PLANS[n]), "stages")}
    assert {(r["plan"], r["rank"]) for r in rows} == expected
    for r in rows:
        assert r["ms_per_step"] > 0
        if r["rank"] == 0:
            assert r["latent_shape"] == [1, 4, 16, 16]
    assert "| 128² | pp2 | 2 | 0,1 |" in floors.table(rows)
