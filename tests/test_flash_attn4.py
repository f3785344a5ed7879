"""flash-attn-4 as an attention backend (model/attention.py), without a GPU: which kernel "auto" picks
with flash-attn-4 absent, present on a GPU that is not SM90, and present on SM90 (mocked); the custom op that
lets compiled graphs call it (its fake implementation traces, its wrapper computes attention); and the pack
without flash-attn-4. Its speed and numbers on a GPU: bench/attention_bench.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_xdit_hunyuan.model import attention as A

ROOT = Path(__file__).resolve().parent.parent
CUDA, CPU, BF16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16


def _math_fa4(q, k, v, softmax_scale=None, causal=False, return_lse=False, **_):
    """flash_attn.cute.flash_attn_func's contract on token-major tensors, in plain torch (float32)."""
    s = torch.einsum("blhd,bmhd->bhlm", q.float(), k.float()) * softmax_scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhlm,bmhd->blhd", torch.exp(s - lse[..., None]), v.float()).to(q.dtype).contiguous()
    return out, lse


@pytest.fixture
def fa4(monkeypatch):
    """flash-attn-4 'installed' (its function replaced by _math_fa4) on a GPU of a chosen capability."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(A, "_FA4_FUNC", [_math_fa4])
    monkeypatch.setattr(A, "_capability", lambda device: cap["value"])
    monkeypatch.setattr(A, "_flash_attn_func", None)          # flash-attn 2 absent
    return cap


def test_auto_without_flash_attn4_is_the_previous_choice(monkeypatch):
    monkeypatch.setattr(A, "_FA4_FUNC", [None])
    monkeypatch.setattr(A, "_flash_attn_func", None)
    monkeypatch.setattr(A, "_capability", lambda device: (9, 0))
    assert A.resolve_backend("auto", CUDA, BF16, in_graph=True) == "padded"
    assert A.resolve_backend("auto", CUDA, BF16) == "sdpa"
    assert A.resolve_backend("auto", CPU, torch.float32, in_graph=True) == "sdpa"
    assert not A.fa4_usable(CUDA, BF16)


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_auto_ignores_flash_attn4_on_other_gpus(fa4, capability):
    fa4["value"] = capability
    assert A.resolve_backend("auto", CUDA, BF16, in_graph=True) == "padded"
    assert A.resolve_backend("auto", CUDA, BF16) == "sdpa"


def test_auto_takes_flash_attn4_on_sm90_for_long_sequences(fa4):
    assert A.resolve_backend("auto", CUDA, BF16, in_graph=True) == "flash_attn4+padded"
    assert A.resolve_backend("auto", CUDA, torch.float16) == "flash_attn4+sdpa"
    assert A.resolve_backend("auto", CUDA, torch.float32) == "sdpa"           # fp32: not for flash-attn-4
    assert A.resolve_backend("auto", CPU, BF16) == "sdpa"
    assert A.resolve_backend("auto", CUDA, BF16, in_graph=True, keys=333) == "padded"    # the text's keys
    assert A.resolve_backend("auto", CUDA, BF16, keys=A.FA4_MIN_TOKENS) == "flash_attn4+sdpa"
    assert A.resolve_backend("cudnn", CUDA, BF16) == "cudnn" and A.resolve_backend("flash_attn4", CPU, BF16) == "flash_attn4"
    n = A.FA4_MIN_TOKENS
    for backend, other in (("flash_attn4+padded", "padded"), ("flash_attn4+sdpa", "sdpa")):
        assert A.kernel_for(backend, n, n, 96, BF16) == "flash_attn4"
        assert A.kernel_for(backend, 2 * n, 2 * n, 88, BF16) == "flash_attn4"
        assert A.kernel_for(backend, n - 1, n, 96, BF16) == other        # either count below: the other
        assert A.kernel_for(backend, 4 * n, 333, 96, BF16) == other      # (cross-attention's text keys)
        assert A.kernel_for(backend, n, n, 100, BF16) == other           # head dim not a multiple of 8
        assert A.kernel_for(backend, n, n, 96, torch.float32) == other
    assert A.kernel_for("padded", 2 * n, 2 * n, 96, BF16) == "padded"
    assert A.pads_head_dim("padded") and A.pads_head_dim("flash_attn4+padded")
    assert not A.pads_head_dim("flash_attn4+sdpa") and not A.pads_head_dim("flash_attn4") and not A.pads_head_dim("sdpa")
    assert A.FA4_MIN_TOKENS == 8192


def test_the_chosen_kernel_is_called_with_the_padded_head_dim(monkeypatch):
    """Dispatch on meta tensors (shapes only; the custom op's fake implementation answers): long sequences
    reach flash-attn-4, padded to 96 with the softmax scale of 88 and cut back to 88; short ones SDPA."""
    calls = []
    real = A.flash_attn4

    def spy(q, k, v, scale):
        calls.append((tuple(q.shape), scale))
        return real(q, k, v, scale)
    monkeypatch.setattr(A, "flash_attn4", spy)
    n = A.FA4_MIN_TOKENS
    q = torch.empty(1, 2, n, 88, device="meta", dtype=BF16)
    assert A.attention(q, q, q, "flash_attn4+padded").shape == (1, 2, n, 88)
    assert calls == [((1, 2, n, 96), 88 ** -0.5)]
    out, lse = A.attention_lse(q, q, q, "flash_attn4+sdpa")
    assert out.shape == (1, 2, n, 88) and lse.shape == (1, 2, n) and lse.dtype == torch.float32
    assert calls[-1] == ((1, 2, n, 88), pytest.approx(88 ** -0.5))
    assert A.attention(q, q, q, "flash_attn4+sdpa").shape == (1, 2, n, 88)
    assert calls[-1] == ((1, 2, n, 88), pytest.approx(88 ** -0.5))
    short = torch.empty(1, 2, 64, 88, device="meta", dtype=BF16)
    assert A.attention(short, short, short, "flash_attn4+padded").shape == (1, 2, 64, 88)
    assert len(calls) == 3


def test_the_flash_attn4_wrapper_computes_attention(fa4):
    """Head-first in and out through the custom op (the transposes are views), with and without a padded
    head dim, equal to the math reference; the output is token-major storage (the output projection reads
    it without a copy)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 88, generator=g) for _ in range(3))
    ref, ref_lse = A.attention_lse(q, k, v, "math")
    out, lse = A.flash_attn4(q, k, v, 88 ** -0.5)
    assert out.shape == ref.shape and out.transpose(1, 2).is_contiguous()
    assert (out - ref).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5
    pad = [torch.nn.functional.pad(t, (0, 8)) for t in (q, k, v)]
    out96, _ = A.flash_attn4(*pad, 88 ** -0.5)
    assert (out96[..., :88] - ref).abs().max() < 1e-5 and torch.all(out96[..., 88:] == 0)


def test_the_custom_op_traces_into_compiled_graphs(fa4):
    """flash-attn-4 cannot be traced: a compiled graph keeps the custom op as one call (its fake
    implementation gives the shapes), with no graph break (fullgraph) around it."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))

    def block(q, k, v):
        out, lse = A.flash_attn4(q * 2, k, v, 0.25)
        return out.transpose(1, 2).reshape(1, 24, -1) + 1, lse

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    (a, la), (b, lb) = block(q, k, v), compiled(q, k, v)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(la, lb, atol=1e-6)
    torch._dynamo.reset()
    tm = [t.transpose(1, 2) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.xdit_hunyuan.flash_attn4.default, (*tm, 0.25),
                          test_utils=("test_schema", "test_faketensor"))


def test_flash_attn4_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(A, "_FA4_FUNC", [None])
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="pip install flash-attn-4"):
        torch.ops.xdit_hunyuan.flash_attn4(q, q, q, 1.0)


def test_the_pack_imports_and_samples_without_flash_attn4():
    """With flash_attn (2 and 4) unimportable, the pack imports, auto never picks them, and a job runs."""
    code = """
import sys
sys.modules["flash_attn"] = None                      # any `import flash_attn...` fails
from comfyui_xdit_hunyuan.model import attention as A
from comfyui_xdit_hunyuan.parallel.runtime import RankRuntime
from comfyui_xdit_hunyuan.config import PoolConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig
sys.path.insert(0, "tests")
from parallel_harness import make_job
import torch
assert A.fa4_func() is None and A._flash_attn_func is None
assert A.resolve_backend("auto", torch.device("cuda"), torch.bfloat16, in_graph=True) == "padded"
rt = RankRuntime(PoolConfig(devices="cpu"), 0, 1, "cpu")
out = rt.run(make_job(steps=1), ParallelConfig(), report=lambda m: None, cancel_requested=lambda: False)
assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-2000:]
