"""Where one CFG step of the full model goes on a GPU, and what each speed-up buys:

    python bench/profile_step.py [--pixels 1024] [--variants eager,compiled,graph,autotune] [--profile]

A variant is a base (eager, compiled, autotune, graph) plus flags: +pad (head dim padded to 96), +gelu (fc1's
GELU in the GEMM epilogue), +fused (the Triton kernels of model/kernels.py).

One step = conditions + patch embedding + 40 blocks + final layer, batch 2 (negative and positive), bf16,
random full-size v1.2 weights, serial (one GPU). Each variant prints ms per step (CUDA events, mean of 10
after warm-up), its first-call time (compilation) and its relative L2 difference to eager; --profile
prints the kernels that take the time (eager and compiled).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo


from comfyui_xdit_hunyuan.model import ComputeOptions  # noqa: E402
from comfyui_xdit_hunyuan.model import LocalAttention, TokenGrid  # noqa: E402
from comfyui_xdit_hunyuan.tiny import random_cond, random_model  # noqa: E402


def cuda_ms(fn, iters=10, warmup=2):
    if not torch.cuda.is_available():                  # CPU smoke test
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1000 * (time.perf_counter() - t0) / iters
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def kernel_table(fn, title, rows=22):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in evs)
    print(f"== kernels, {title}: {total / 1000:.1f} ms of GPU time in {sum(e.count for e in evs)} launches ==")
    for e in sorted(evs, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"  {e.self_device_time_total / 1000:8.2f} ms {100 * e.self_device_time_total / total:5.1f}% "
              f"x{e.count:<5d} {e.key[:110]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pixels", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2, help="2 = CFG on one GPU, 1 = one CFG-parallel rank")
    ap.add_argument("--variants", default="eager,compiled,graph")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rows", type=int, default=22, help="kernels listed per profile")
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (eager only)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    print(torch.__version__, torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", flush=True)
    torch.manual_seed(0)
    model = random_model(a.preset, seed=0, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                         device=dev)
    cfg = model.cfg
    conds = [random_cond(cfg, s) for s in (2, 1)][: a.batch]
    kw = {k: torch.cat([getattr(c, k) for c in conds]) for k in
          ("context", "text_embedding_mask", "encoder_hidden_states_t5", "text_embedding_mask_t5")}
    text = model.encode_text(**kw, batch=a.batch)
    h = a.pixels // 8
    grid = TokenGrid(h, h, cfg.patch_size)
    rope = model.rope(grid)
    attn = LocalAttention(a.backend)
    x = torch.randn(a.batch, 4, h, h, device=dev, dtype=model.dtype)
    t = torch.tensor([500.0], device=dev)

    def step(xin=x, tt=t):
        cond = model.conditions(text, tt)
        tok = model.run_blocks(model.embed_image(xin), cond, rope, range(cfg.depth), {}, attn)
        return model.final_tokens(tok, cond)

    with torch.no_grad():
        if dev.type == "cuda":     # the fused GEMM's GELU must be the tanh GELU of the plain path
            xs = torch.randn(256, cfg.hidden_size, device=dev)
            mlp = model.blocks[0].mlp.float()
            mlp.options = ComputeOptions()
            plain = mlp(xs)
            mlp.options = ComputeOptions(fused_gelu=True)
            print(f"fused GELU GEMM vs plain, float32: rel diff {((mlp(xs) - plain).norm() / plain.norm()).item():.1e}")
            mlp.to(model.dtype)
        ref = step().float()
        results = {}
        for variant in a.variants.split(","):
            t0 = time.perf_counter()
            try:
                base, *flags = variant.split("+")        # e.g. compiled+pad+gelu
                attn.backend = "padded" if "pad" in flags else a.backend
                model.configure(ComputeOptions(fused_kernels="fused" in flags, fused_gelu="gelu" in flags,
                                               cross_attention=attn.backend))
                text.text_kv = []                   # per-block text K/V again (padded with the kernels)
                if base == "eager":
                    torch._dynamo.reset()
                    for blk in model.blocks:
                        blk._compiled_call_impl = None    # undo Module.compile
                    fn = step
                elif base in ("compiled", "autotune"):
                    torch._dynamo.reset()
                    mode = "max-autotune-no-cudagraphs" if base == "autotune" else None
                    for blk in model.blocks:
                        blk.compile(dynamic=False, mode=mode)
                    fn = step
                elif base == "graph":            # one CUDA graph for the whole step (blocks as they are now)
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):
                        for _ in range(2):
                            step()
                    torch.cuda.current_stream().wait_stream(s)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_out = step()

                    def fn():
                        graph.replay()
                        return static_out
                else:
                    print(f"unknown variant {variant}")
                    continue
                out = fn().float()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = cuda_ms(fn)
                err = ((out - ref).norm() / ref.norm()).item()
                results[variant] = ms
                print(f"{variant:<20} {a.pixels}^2 batch {a.batch}: {ms:7.2f} ms/step  (x50 = {ms * 0.05:.2f} s)  "
                      f"first call {first:6.1f} s  rel diff to eager {err:.1e}", flush=True)
                if a.profile and base in ("eager", "compiled", "autotune"):
                    kernel_table(fn, variant, rows=a.rows)
            except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                print(f"{variant} failed after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {str(e)[:300]}",
                      flush=True)
    if dev.type == "cuda":
        print("peak GPU memory", round(torch.cuda.max_memory_allocated() / 2**30, 2), "GiB")


if __name__ == "__main__":
    main()
