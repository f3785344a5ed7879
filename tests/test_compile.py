"""The compiled model (regional torch.compile) equals the eager one, fp32 on the CPU, for both ways the
engine calls blocks: whole blocks with attention traced in (one GPU, CFG parallel) and the two compiled
halves around an attention that communicates (Ulysses, Ring, PipeFusion). A second call compiles nothing
new, and the number of graphs does not grow with the depth. Also the kernel choices that only apply on
GPUs: the padded-head-dim attention and the fused GELU GEMM keep the math."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from comfyui_xdit_hunyuan.model import ComputeOptions, LocalAttention, TokenGrid
from comfyui_xdit_hunyuan.model.attention import attention, resolve_backend
from comfyui_xdit_hunyuan.tiny import random_cond, random_model


class Communicating:
    """Stands for a sequence-parallel attention: not traceable (the compiled halves go around it)."""

    def __init__(self):
        self.calls = 0

    @torch.compiler.disable
    def __call__(self, q, k, v, block):
        self.calls += 1
        return F.scaled_dot_product_attention(q, k, v)


def _blocks_out(model, attn, x, text, t=500.0):
    cond = model.conditions(text, torch.tensor([t]))
    grid = TokenGrid(x.shape[-2], x.shape[-1], model.cfg.patch_size)
    return model.run_blocks(model.embed_image(x), cond, model.rope(grid), range(model.cfg.depth), {}, attn)


def test_compiled_blocks_equal_eager_and_do_not_recompile():
    torch._dynamo.reset()
    g0 = counters["stats"]["unique_graphs"]
    model = random_model("tiny", seed=3)
    c = random_cond(model.cfg, 1)
    text = model.encode_text(c.context, c.text_embedding_mask, c.encoder_hidden_states_t5, c.text_embedding_mask_t5)
    x = torch.randn(1, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _blocks_out(model, LocalAttention(), x, text)
        model.compile_blocks()
        whole = _blocks_out(model, LocalAttention(), x, text)
        whole_graphs = counters["stats"]["unique_graphs"] - g0
        comm = Communicating()
        halves = _blocks_out(model, comm, x, text)
        assert comm.calls == model.cfg.depth
        graphs = counters["stats"]["unique_graphs"] - g0
        again = [_blocks_out(model, LocalAttention(), x, text, 300.0), _blocks_out(model, Communicating(), x, text, 300.0)]
        assert counters["stats"]["unique_graphs"] - g0 == graphs, "a second call (new step, new attention object) recompiled"
    # compiled at all (a failed compilation would fall back to eager silently) ...
    assert whole_graphs >= 1 and graphs > whole_graphs, (whole_graphs, graphs)
    # ... and per kind of block (with / without a skip input, the first block's input layout), not per index
    assert whole_graphs <= 4 and graphs - whole_graphs <= 6, (whole_graphs, graphs)
    for out in (whole, halves):
        assert (out - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    assert (again[0] - again[1]).abs().max().item() < 1e-5 * max(1.0, again[0].abs().max().item())
    torch._dynamo.reset()


def test_a_new_image_size_runs_the_compiled_blocks_without_compiling_again():
    """compile_blocks(any_size=True): the token count is symbolic, so after a first size has been compiled (for
    whole blocks and for the halves) other sizes, odd ones too, reuse the same code; results equal eager."""
    torch._dynamo.reset()
    model = random_model("tiny", seed=3)
    c = random_cond(model.cfg, 1)
    text = model.encode_text(c.context, c.text_embedding_mask, c.encoder_hidden_states_t5, c.text_embedding_mask_t5)
    g = torch.Generator().manual_seed(0)
    sizes = [(16, 12), (20, 16), (10, 14), (9, 7)]
    latents = [torch.randn(1, 4, h, w, generator=g) for h, w in sizes]
    with torch.no_grad():
        refs = [(_blocks_out(model, LocalAttention(), x, text), _blocks_out(model, Communicating(), x, text))
                for x in latents]
        model.compile_blocks(any_size=True)
        first = (_blocks_out(model, LocalAttention(), latents[0], text), _blocks_out(model, Communicating(), latents[0], text))
        first_graphs = counters["stats"]["unique_graphs"]
        outs = [first] + [(_blocks_out(model, LocalAttention(), x, text), _blocks_out(model, Communicating(), x, text))
                          for x in latents[1:]]
        later_graphs = counters["stats"]["unique_graphs"] - first_graphs
    assert later_graphs == 0, f"new sizes compiled {later_graphs} more graphs"
    for (ref_whole, ref_halves), (whole, halves) in zip(refs, outs):
        for out, ref in ((whole, ref_whole), (halves, ref_halves)):
            assert (out - ref).abs().max().item() < 1e-5 * max(1.0, ref.abs().max().item())
    torch._dynamo.reset()


def test_padded_attention_keeps_the_math():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 88, generator=g) for _ in range(3))
    ref = attention(q, k, v, "math")
    out = attention(q, k, v, "padded")
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-5


def test_auto_backend_pads_only_inside_gpu_graphs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    expected_gpu = "flash_attn" if resolve_backend("auto", cuda, torch.bfloat16) == "flash_attn" else "padded"
    assert resolve_backend("auto", cuda, torch.bfloat16, in_graph=True) == expected_gpu
    assert resolve_backend("auto", cuda, torch.bfloat16, in_graph=False) in ("sdpa", "flash_attn")
    assert resolve_backend("auto", cpu, torch.float32, in_graph=True) == "sdpa"
    assert resolve_backend("cudnn", cuda, torch.bfloat16, in_graph=True) == "cudnn"


def test_fused_gelu_is_left_off_where_it_would_change_the_math():
    """The CPU GEMM's GELU epilogue is the erf GELU, not HunyuanDiT's tanh GELU: configure() keeps the plain
    MLP on the CPU even when asked (the runtime asks on GPUs only)."""
    model = random_model("tiny", seed=4)
    assert model.configure(ComputeOptions(fused_gelu=True)).fused_gelu is False
    assert model.blocks[0].mlp.options.fused_gelu is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused GELU GEMM runs on CUDA only")
def test_fused_gelu_gemm_is_the_tanh_gelu_mlp_on_a_gpu():
    model = random_model("tiny", seed=4).cuda()
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, model.cfg.hidden_size, device="cuda")
    with torch.no_grad():
        ref = mlp(x)
        assert model.configure(ComputeOptions(fused_gelu=True)).fused_gelu
        out = mlp(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()          # float32: same function, other kernel
