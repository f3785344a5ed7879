"""The fused Triton kernels (comfyui_xdit_hunyuan/model/kernels.py) at HunyuanDiT's 1024^2 shapes on a GPU:
each launch configuration's time and bandwidth, and torch.compile of the unfused code for comparison.

    python bench/kernel_bench.py
"""
from __future__ import annotations


import torch
import torch.nn as nn


from bench.profile_step import cuda_ms  # noqa: E402
from comfyui_xdit_hunyuan.model import TokenGrid, kernels, rope_table  # noqa: E402


def graph_ms(fn, launches=20):
    """Device time per launch: `launches` calls recorded in one CUDA graph, replayed (no Python launch cost)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    return cuda_ms(g.replay, 10) / launches


def report(name, ms, nbytes):
    print(f"  {name:<44} {1000 * ms:7.1f} us  {nbytes / ms / 1e9:6.2f} TB/s", flush=True)


def main():
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.__version__, torch.cuda.get_device_name(0))
    b, n, h, d, dp = 2, 4096, 16, 88, 96
    src = torch.randn(b, n, 3 * h * d, device=dev, dtype=dt)
    cos, sin = (t.to(dev) for t in rope_table(TokenGrid(128, 128), d))
    norm = nn.LayerNorm(d, eps=1e-6).to(dev, dt)
    scale = kernels.softmax_rescale(d, dp)
    io = b * n * h * (d + dp) * 2                       # bytes read + written per tensor
    with torch.no_grad():
        print("== q: norm + RoPE + pad + scale (one of q / k) ==")
        ref = torch.compile(kernels.norm_rope_pad_reference)
        report("torch.compile of the unfused code", graph_ms(lambda: ref(src, 0, h, d, norm, (cos, sin), dp, scale)), io)
        base = kernels.norm_rope_pad(src, 0, h, d, norm, (cos, sin), dp, scale)
        for bt in (4, 8):
            for nw in (4, 8):
                try:
                    out = kernels.norm_rope_pad(src, 0, h, d, norm, (cos, sin), dp, scale, block_t=bt, num_warps=nw)
                    assert ((out.float() - base.float()).abs().max() / base.float().abs().max()) < 2e-2
                    report(f"kernel rows {bt}, warps {nw}", graph_ms(lambda: kernels.norm_rope_pad(
                        src, 0, h, d, norm, (cos, sin), dp, scale, block_t=bt, num_warps=nw)), io)
                except Exception as e:  # noqa: BLE001
                    print(f"  rows {bt}, warps {nw}: {type(e).__name__}: {str(e)[:120]}")
        print("== v: pad only ==")
        for bt, nw in ((8, 4), (16, 4), (32, 4)):
            report(f"kernel rows {bt}, warps {nw}", graph_ms(lambda: kernels.norm_rope_pad(
                src, 2 * h * d, h, d, None, None, dp, block_t=bt, num_warps=nw)), io)
        print("== skip merge: LayerNorm of cat([x, skip]) ==")
        x, skip = (torch.randn(b, n, 1408, device=dev, dtype=dt) for _ in range(2))
        ln = nn.LayerNorm(2816, eps=1e-6).to(dev, dt)
        io = b * n * 2816 * 2 * 2
        refc = torch.compile(kernels.cat_layer_norm_reference)
        report("torch.compile of the unfused code", graph_ms(lambda: refc(x, skip, ln)), io)
        for br in (1, 2):
            for nw in (2, 4):
                report(f"kernel rows {br}, warps {nw}", graph_ms(lambda: kernels.cat_layer_norm(
                    x, skip, ln, block_r=br, num_warps=nw)), io)
        print("== residual add + LayerNorm ==")
        ln = nn.LayerNorm(1408, eps=1e-6).to(dev, dt)
        refa = torch.compile(kernels.add_layer_norm_reference)
        report("torch.compile of the unfused code", graph_ms(lambda: refa(x, skip, ln)), io)
        for br, nw in ((1, 4), (1, 8), (2, 4)):
            report(f"kernel rows {br}, warps {nw}", graph_ms(lambda: kernels.add_layer_norm(
                x, skip, ln, block_r=br, num_warps=nw)), io)


if __name__ == "__main__":
    main()
