"""dtype "fp8": the blocks' GEMMs in float8 e4m3 with per-token / per-channel scales (torch._scaled_mm runs
on the CPU too, so the same code path is checked here; speed is measured on GPUs by bench/profile_step.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from comfyui_xdit_hunyuan import comfy_glue as glue
from comfyui_xdit_hunyuan.model import fp8 as fp8_mod
from comfyui_xdit_hunyuan.model.fp8 import FP8_MAX, Fp8Linear, quantize_rows
from comfyui_xdit_hunyuan.plan import ParallelConfig, PlanError, check_dtype_devices
from comfyui_xdit_hunyuan.tiny import random_cond, random_model
from tests.parallel_harness import PRESET, make_job, rel_err, run_on_mesh


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_rows_quantise_to_the_fp8_range_with_one_scale_each():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 500.0])[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    amax = q.float().abs().amax(dim=1)
    assert torch.allclose(amax[[0, 1, 2, 4]], torch.full((4,), FP8_MAX))    # each row spans the range
    assert amax[3] == 0 and torch.isfinite(s).all()                          # a zero row stays zero
    assert _rel(q.float() * s, x) < 0.04                                     # 3 mantissa bits


def test_fp8_linear_is_the_scaled_product_of_the_quantised_operands():
    torch.manual_seed(0)
    lin = nn.Linear(96, 48).to(torch.bfloat16)
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    f = Fp8Linear(lin)
    with torch.no_grad():
        y, exact = f(x), lin(x).float()
    assert y.shape == (3, 7, 48) and y.dtype == torch.bfloat16
    xq, xs = quantize_rows(x.reshape(-1, 96))
    ref = (xq.float() * xs) @ (f.weight_fp8.float() * f.weight_scale.t()).t() + lin.bias.detach().float()
    assert _rel(y.reshape(-1, 48), ref) < 4e-3                   # bf16 output rounding only
    assert 1e-3 < _rel(y, exact) < 0.06                          # FP8: a few percent off bf16, not equal
    # a token's output does not depend on the other tokens (what keeps the parallel modes exact)
    with torch.no_grad():
        assert torch.equal(f(x[1:2, 2:5]), y[1:2, 2:5])


def test_fp8_linear_rejects_shapes_the_fp8_gemm_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear(nn.Linear(88, 32))


def test_the_blocks_per_step_gemms_become_fp8_and_the_model_stays_close():
    torch.manual_seed(0)
    model = random_model(PRESET, seed=0, dtype=torch.bfloat16)
    cfg = model.cfg
    c = random_cond(cfg, 1, hw=(128, 128))
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([700.0])
    with torch.no_grad():
        ref = model(x, t, **c.model_kwargs())
        n = model.use_fp8_matmuls()
        out = model(x, t, **c.model_kwargs())
    skips = sum(b.skip_linear is not None for b in model.blocks)
    assert n == 6 * cfg.depth + skips
    assert isinstance(model.blocks[-1].mlp.fc1, Fp8Linear) and isinstance(model.blocks[-1].skip_linear, Fp8Linear)
    assert isinstance(model.blocks[0].attn2.kv_proj, nn.Linear)            # per-job text K/V stays bf16
    assert not any(isinstance(m, nn.Linear) and m.weight.dtype == torch.float8_e4m3fn for m in model.modules())
    err = _rel(out, ref)
    assert 1e-3 < err < 0.15, err


def test_fp8_ranks_equal_the_serial_fp8_run():
    """Per-token and per-channel scales: CFG parallel and Ulysses with fp8 give one fp8 rank's latent bit for
    bit. (Ring merges partial attention in float32: equal up to rounding, which FP8 then amplifies.)"""
    jobs = [make_job(steps=2, seed=1)]
    serial = run_on_mesh(ParallelConfig(devices="cpu:1", dtype="fp8"), jobs)[0]
    bf16 = run_on_mesh(ParallelConfig(devices="cpu:1", dtype="bf16"), jobs)[0]
    assert 1e-3 < rel_err(serial, bf16) < 0.3                  # fp8 is really on (tiny random model)
    for degrees in (dict(cfg_degree=2), dict(ulysses_degree=2)):
        out = run_on_mesh(ParallelConfig(devices="cpu:2", dtype="fp8", **degrees), jobs)[0]
        assert torch.equal(out, serial), (degrees, rel_err(out, serial))


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_refused_before_any_worker(monkeypatch):
    check_dtype_devices("fp8", ["cpu", "cpu"])                      # the CPU runs _scaled_mm
    check_dtype_devices("bf16", ["cuda:0"])                          # other dtypes: nothing to check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(PlanError, match=r"cuda:1: .*A100 is 8\.0\. Choose dtype bf16"):
        check_dtype_devices("fp8", ["cuda:1"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_dtype_devices("fp8", ["cuda:0"])
    assert fp8_mod.fp8_supported(torch.device("cuda:0")) is None


def test_the_config_node_offers_fp8():
    assert "fp8" in [o for s in glue.CONFIG_INPUTS if s.name == "dtype" for o in glue.resolve_options(s)]
    assert glue.build_parallel_config(devices="cpu", dtype="fp8").dtype == "fp8"
