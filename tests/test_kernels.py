"""The Triton kernels of model/kernels.py, run by Triton's interpreter on the CPU (conftest sets
TRITON_INTERPRET=1), against the unfused code: each kernel alone, the model with them, and the engine
(serial and two gloo ranks) with them. GPU speed and the same checks on a GPU: bench/gpu_checks.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from comfyui_xdit_hunyuan.model import ComputeOptions, LocalAttention, TokenGrid, kernels, rope_table
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.tiny import random_model
from tests.parallel_harness import PRESET, make_job, rel_err, run_on_mesh

pytestmark = pytest.mark.skipif(not kernels.available(torch.device("cpu")),
                                reason="needs triton (pip install -r requirements-test.txt)")


def _max_rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _norm(d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = nn.LayerNorm(d, eps=1e-6).to(dtype)
    with torch.no_grad():
        n.weight.copy_(1 + 0.1 * torch.randn(d, generator=g))
        n.bias.copy_(0.1 * torch.randn(d, generator=g))
    return n


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])   # bf16: ≈ 2 ulp
def test_norm_rope_pad_equals_the_unfused_code(dtype, tol):
    torch.manual_seed(0)
    b, n, h, d = 2, 24, 4, 88                       # 24 tokens: the last token block is partly masked
    src = torch.randn(b, n, 3 * h * d).to(dtype)
    cos, sin = rope_table(TokenGrid(8, 12), d)
    norm = _norm(d, dtype)
    cases = [(0, norm, (cos, sin), 96, (96 / 88) ** 0.5),   # q: norm, RoPE, padded, softmax scale folded in
             (h * d, norm, (cos, sin), 96, 1.0),            # k
             (2 * h * d, None, None, 96, 1.0),              # v: padded copy
             (0, norm, (cos, sin), 88, 1.0),                # unpadded
             (h * d, None, (cos, sin), 88, 1.0)]            # RoPE without norm
    with torch.no_grad():
        for col0, nm, rope, pad_to, scale in cases:
            out = kernels.norm_rope_pad(src, col0, h, d, nm, rope, pad_to, scale)
            ref = kernels.norm_rope_pad_reference(src, col0, h, d, nm, rope, pad_to, scale)
            assert out.shape == (b, h, n, pad_to) and out.dtype == dtype
            assert out.transpose(1, 2).is_contiguous()          # token-major storage
            assert torch.all(out[..., d:] == 0)
            assert _max_rel(out, ref) < tol, (col0, pad_to, _max_rel(out, ref))
    # the softmax scale folded into q: attention with the default 1/sqrt(96) equals 1/sqrt(88) unpadded
    q = kernels.norm_rope_pad(src, 0, h, d, norm, (cos, sin), 96, kernels.softmax_rescale(d, 96)).float()
    k = kernels.norm_rope_pad(src, h * d, h, d, norm, (cos, sin), 96).float()
    v = kernels.norm_rope_pad(src, 2 * h * d, h, d, None, None, 96).float()
    q0, k0, v0 = (t[..., :d] for t in (kernels.norm_rope_pad(src, c, h, d, nm, r, 88)
                                       for c, nm, r in ((0, norm, (cos, sin)), (h * d, norm, (cos, sin)),
                                                        (2 * h * d, None, None))))
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    o0 = torch.nn.functional.scaled_dot_product_attention(q0.float(), k0.float(), v0.float())
    assert _max_rel(o[..., :d], o0) < (1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_cat_layer_norm_equals_norm_of_the_concatenation(dtype, tol):
    torch.manual_seed(0)
    x, skip = torch.randn(3, 5, 176).to(dtype), 3 + 2 * torch.randn(3, 5, 176).to(dtype)
    norm = _norm(352, dtype)
    with torch.no_grad():
        out = kernels.cat_layer_norm(x, skip, norm)
        ref = kernels.cat_layer_norm_reference(x, skip, norm)
    assert out.shape == (3, 5, 352) and _max_rel(out, ref) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_add_layer_norm_equals_the_add_then_the_norm(dtype, tol):
    """(Triton's interpreter rounds float32 -> bf16 toward zero where GPUs round to nearest: bf16 agrees to
    about an ulp here.)"""
    torch.manual_seed(0)
    x, delta = torch.randn(3, 5, 176).to(dtype), 2 * torch.randn(3, 5, 176).to(dtype)
    norm = _norm(176, dtype)
    with torch.no_grad():
        (s, out), (s_ref, ref) = kernels.add_layer_norm(x, delta, norm), kernels.add_layer_norm_reference(x, delta, norm)
    assert _max_rel(s, s_ref) < tol and _max_rel(out, ref) < tol


def test_the_model_with_fused_kernels_equals_the_unfused_model(model_inputs):
    """Whole blocks with traced padded attention, and the split halves around an attention that
    communicates, in float32."""
    model = random_model(PRESET, seed=0)
    inp = model_inputs(model.cfg, batch=2)
    x, t = inp.pop("x"), inp.pop("t")
    with torch.no_grad():
        ref = model(x, t, **inp, attention=LocalAttention("padded"))
        # text K/V padded too (as on a GPU in a compiled graph)
        assert model.configure(ComputeOptions(fused_kernels=True, cross_attention="padded")).fused_kernels
        out = model(x, t, **inp, attention=LocalAttention("padded"))
        assert _max_rel(out, ref) < 1e-5
        text = model.encode_text(**inp, batch=2)
        model.fill_text_kv(text)
        assert text.text_kv[0][0].shape[-1] == kernels.padded_head_dim(model.cfg.head_dim)

        class Communicating:                             # not traceable: the block runs as two halves
            def __call__(self, q, k, v, block):
                assert q.shape[-1] == model.cfg.head_dim  # self-attention unpadded there
                return LocalAttention("sdpa")(q, k, v, block)
        out = model(x, t, **inp, attention=Communicating())
        assert _max_rel(out, ref) < 1e-5


def test_the_engine_turns_them_on_by_the_switch():
    """PoolConfig.fused_kernels "on" turns them on in a CPU worker: the latent equals the unfused run's."""
    jobs = [make_job(h=8, w=12, steps=1, seed=1)]
    plain = run_on_mesh(ParallelConfig(), jobs, pool=PoolConfig(devices="cpu", attention="padded"))[0]
    fused = run_on_mesh(ParallelConfig(), jobs, pool=PoolConfig(devices="cpu", attention="padded",
                                                                fused_kernels="on"))[0]
    assert not torch.equal(fused, plain) and rel_err(fused, plain) < 1e-5    # really on, same result


def test_the_switch():
    cpu = torch.device("cpu")
    assert not kernels.wanted(cpu)                       # CPU workers: only when asked
    assert kernels.wanted(cpu, "on")
    assert not kernels.wanted(torch.device("cuda"), "off")
    assert kernels.wanted(torch.device("cuda")) == (kernels.triton is not None)
