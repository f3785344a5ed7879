"""The 4- and 8-device layouts of the seed (and issue 7), on 4 and 8 CPU processes with the tiny model:
exact modes equal the serial run; PipeFusion equals the serial run when every step is a warm-up step and
equals the one-process reference of its semantics after one warm-up step."""
from __future__ import annotations

import pytest

from comfyui_xdit_hunyuan.plan import ParallelConfig
from parallel_harness import make_job, pipefusion_reference, rel_err, run_on_mesh, serial_reference

EXACT_TOL = 1e-5

LAYOUTS = {
    "cfg2xulysses2": dict(cfg_degree=2, ulysses_degree=2),
    "ulysses4": dict(ulysses_degree=4),
    "ring4": dict(ring_degree=4),
    "cfg2xpp2": dict(cfg_degree=2, pipefusion_degree=2),
    "cfg2xpp4": dict(cfg_degree=2, pipefusion_degree=4),
    "cfg2xpp2xring2": dict(cfg_degree=2, pipefusion_degree=2, ring_degree=2),
    "cfg2xulysses2xring2": dict(cfg_degree=2, ulysses_degree=2, ring_degree=2),
}


@pytest.fixture(scope="module")
def job():
    j = make_job(18, 14, steps=3)                                    # 9 x 7 tokens: no degree divides it
    return j, serial_reference(j)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout(name, job):
    j, ref = job
    kw = LAYOUTS[name]
    if kw.get("pipefusion_degree", 1) == 1:
        assert rel_err(run_on_mesh(ParallelConfig(**kw), [j])[0], ref) < EXACT_TOL
        return
    synced, piped = run_on_mesh(ParallelConfig(**kw, warmup_steps=j.steps), [j])[0], None
    assert rel_err(synced, ref) < EXACT_TOL
    plan = ParallelConfig(**kw, warmup_steps=1)
    piped = run_on_mesh(plan, [j])[0]
    assert rel_err(piped, pipefusion_reference(j, plan.patches, 1)) < EXACT_TOL
