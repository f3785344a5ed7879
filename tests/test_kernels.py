"""The Triton kernels of model/kernels.py, run by Triton's interpreter on the CPU (conftest sets
TRITON_INTERPRET=1), against the unfused code: each kernel alone, the model with them, and the engine
(serial, and Ulysses / Ring / PipeFusion gloo ranks, where the kernels run after the exchange) with them. GPU speed and the same checks on a GPU: bench/gpu_checks.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from comfyui_xdit_hunyuan.model import ComputeOptions, LocalAttention, TokenGrid, kernels, rope_table
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig
from comfyui_xdit_hunyuan.tiny import preset, random_cond, random_model
from tests.parallel_harness import (PRESET, make_job, pipefusion_reference, rel_err, run_on_mesh,
                                    serial_reference)

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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_norm_rope_pad_reads_a_sequence_first_source(dtype, tol):
    """What the Ulysses exchange delivers, [N, B, width] (tokens outer): the same q as from [B, N, width],
    written token-major."""
    torch.manual_seed(1)
    b, n, h, d = 2, 24, 4, 88
    src = torch.randn(n, b, 3 * h * d).to(dtype)
    cos, sin = rope_table(TokenGrid(8, 12), d)
    norm = _norm(d, dtype)
    with torch.no_grad():
        for col0, nm, rope, pad_to, scale in ((0, norm, (cos, sin), 96, (96 / 88) ** 0.5), (2 * h * d, None, None, 96, 1.0),
                                              (h * d, norm, (cos, sin), 88, 1.0)):
            out = kernels.norm_rope_pad(src, col0, h, d, nm, rope, pad_to, scale, seq_first=True)
            batch_major = kernels.norm_rope_pad(src.transpose(0, 1).contiguous(), col0, h, d, nm, rope, pad_to, scale)
            ref = kernels.norm_rope_pad_reference(src, col0, h, d, nm, rope, pad_to, scale, seq_first=True)
            assert out.shape == (b, h, n, pad_to) and out.transpose(1, 2).is_contiguous()
            assert torch.equal(out, batch_major)                 # the same kernel arithmetic, rows read elsewhere
            assert _max_rel(out, ref) < tol and ref.transpose(1, 2).is_contiguous()


def _batch2_job(steps=2):
    """9 x 7 tokens, the negative and positive prompts of one shape: one model call of batch 2."""
    return make_job(18, 14, steps=steps, negative=[random_cond(preset(PRESET), 2, hw=(144, 112))])


@pytest.fixture(scope="module")
def seq_job():
    job = _batch2_job()
    return job, serial_reference(job)


SEQUENCE_PARALLEL = {"ulysses2": dict(ulysses_degree=2), "ring2": dict(ring_degree=2),
                     "ulysses2xring2": dict(ulysses_degree=2, ring_degree=2)}


@pytest.mark.parametrize("name", list(SEQUENCE_PARALLEL))
@pytest.mark.parametrize("attention", ["padded", "sdpa"])
def test_sequence_parallel_with_the_fused_kernels_equals_the_serial_run(name, attention, seq_job):
    """The kernels after the Ulysses exchange, on each rank's heads (and on Ring's own tokens), with and
    without the padded head dim: equal to the unfused serial run in float32."""
    job, ref = seq_job
    pool = PoolConfig(devices="cpu", attention=attention, fused_kernels="on")
    out = run_on_mesh(ParallelConfig(**SEQUENCE_PARALLEL[name]), [job], pool=pool)[0]
    assert rel_err(out, ref) < 1e-5, name


def test_pipefusion_x_ulysses_with_the_fused_kernels():
    """The K/V buffer of kernel-prepared (padded) k, v after the exchange: exact with every step a warm-up
    step, and PipeFusion's stale-K/V semantics after one."""
    job = make_job(16, 16, steps=3)
    pool = PoolConfig(devices="cpu", attention="padded", fused_kernels="on")
    synced = run_on_mesh(ParallelConfig(pipefusion_degree=2, ulysses_degree=2, warmup_steps=3), [job], pool=pool)[0]
    assert rel_err(synced, serial_reference(job)) < 1e-5
    plan = ParallelConfig(pipefusion_degree=2, ulysses_degree=2, warmup_steps=1)
    piped = run_on_mesh(plan, [job], pool=pool)[0]
    assert rel_err(piped, pipefusion_reference(job, plan.patches, 1)) < 1e-5


def test_ulysses_with_the_fused_kernels_through_cuda_graphs():
    """Recorded and replayed (the CPU stand-in of a CUDA graph): the same latents as the plain calls."""
    jobs = [make_job(18, 14, steps=3, seed=1), make_job(18, 14, steps=3, seed=2)]
    pool = PoolConfig(devices="cpu", attention="padded", fused_kernels="on")
    plan = ParallelConfig(ulysses_degree=2)
    plain = run_on_mesh(plan, jobs, pool=pool)
    *graphed, counts = run_on_mesh(plan, jobs, graphs=True, pool=pool)
    assert counts["captures"] == 1 and counts["replays"] > 0
    for a, b in zip(plain, graphed):
        assert torch.equal(a, b)


def test_ulysses_ranks_run_the_kernels_after_the_exchange_on_their_heads(monkeypatch):
    """One Ulysses-2 rank alone (the stand-in mesh): every block's q, k, v come from the kernels on 8 of the
    16 heads over all tokens of the chunk, padded; the attention output goes back unpadded, token-major."""
    from comfyui_xdit_hunyuan.model.hunyuandit import SelfAttentionLayer
    from comfyui_xdit_hunyuan.parallel import sequence
    from comfyui_xdit_hunyuan.parallel.mesh import standin_mesh
    from comfyui_xdit_hunyuan.parallel.runtime import RankRuntime
    calls, outs = [], []
    qkv_from, to_tokens = SelfAttentionLayer.qkv_from, sequence.ulysses_to_tokens

    def spy(self, y, rope, pad_to, heads=None, seq_first=False):
        q, k, v = qkv_from(self, y, rope, pad_to, heads, seq_first)
        calls.append((tuple(y.shape), tuple(rope[0].shape), heads, seq_first, tuple(q.shape)))
        return q, k, v

    def back(y, *a, **kw):
        o = to_tokens(y, *a, **kw)
        outs.append((tuple(o.shape), o.transpose(1, 2).is_contiguous()))
        return o
    monkeypatch.setattr(SelfAttentionLayer, "qkv_from", spy)
    monkeypatch.setattr(sequence, "ulysses_to_tokens", back)
    rt = RankRuntime(PoolConfig(devices="cpu", attention="padded", fused_kernels="on"), 0, 2, "cpu",
                     mesh_builder=standin_mesh)
    rt.run(_batch2_job(steps=1), ParallelConfig(ulysses_degree=2), report=lambda m: None,
           cancel_requested=lambda: False)
    depth, heads, d = rt.model.cfg.depth, rt.model.cfg.num_heads, rt.model.cfg.head_dim
    # 9 x 7 = 63 tokens: rank 0 holds 32, its chunk after the exchange is all 63; batch 2 (both prompts)
    assert calls == [((63, 2, 3 * heads // 2 * d), (63, d), heads // 2, True, (2, heads // 2, 63, 32))] * depth
    assert outs == [((2, heads, 32, d), True)] * depth
