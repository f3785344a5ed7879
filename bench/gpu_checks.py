"""GPU checks that print figures (run on a CUDA machine from the repo root):

    python bench/gpu_checks.py [--skip-compile]

1. attention kernels for HunyuanDiT's shapes (head dim 88): time and error of every backend, with and
   without log-sum-exp (ring attention needs it);
2. bf16 model vs float32 model on the same random full-size weights (one forward);
3. host synchronisations inside the sampling loop (torch.cuda sync debug mode) -- must be none;
4. one CFG step of the full model at 1024^2, eager and compiled (regional), ms;
5. CUDA graphs of the model call (compiled): the same latent as without, and the step time, at batch 2
   (cfg 5) and batch 1 (cfg 1, as each rank of CFG parallel);
6. the fused Triton kernels (model/kernels.py; compiled, graphs): ms per step with and without, and the
   final latents' difference, at batch 2 and 1;
7. (--only seqfirst) the q/k/v kernel on a sequence-first source (what the Ulysses exchange delivers) against
   the same rows batch-major and the unfused code, bf16, Ulysses-2 shapes at 1024^2 and 2048^2.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import time
import warnings

import torch


from bench.profile_step import cuda_ms  # noqa: E402
from comfyui_xdit_hunyuan.model import ComputeOptions  # noqa: E402
from comfyui_xdit_hunyuan.bench import bench_job  # noqa: E402
from comfyui_xdit_hunyuan.job import Job, WeightsRef  # noqa: E402
from comfyui_xdit_hunyuan.model.attention import attention, attention_lse, resolve_backend  # noqa: E402
from comfyui_xdit_hunyuan.parallel.graphs import GraphCache  # noqa: E402
from comfyui_xdit_hunyuan.parallel.mesh import build_mesh  # noqa: E402
from comfyui_xdit_hunyuan.parallel.runner import Runner  # noqa: E402
from comfyui_xdit_hunyuan.plan import ParallelConfig  # noqa: E402
from comfyui_xdit_hunyuan.tiny import preset, random_cond, random_model  # noqa: E402


def check_attention():
    print("== attention, bf16, B=2, 16 heads x 88 ==")
    for L in (4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2 if L == 4096 else 1, 16, L, 88, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        ref, ref_lse = attention_lse(q, k, v, "math") if L == 4096 else (None, None)
        for backend in ("sdpa", "flash", "cudnn", "efficient"):
            try:
                ms = cuda_ms(lambda: attention(q, k, v, backend), iters=20, warmup=3)
                ms_lse = cuda_ms(lambda: attention_lse(q, k, v, backend), iters=20, warmup=3)
                err = ""
                if ref is not None:
                    out, lse = attention_lse(q, k, v, backend)
                    o2 = attention(q, k, v, backend)
                    err = (f"  rel err {((out.float() - ref.float()).norm() / ref.float().norm()).item():.1e}"
                           f" (no-lse {((o2.float() - ref.float()).norm() / ref.float().norm()).item():.1e})"
                           f"  lse err {(lse - ref_lse).abs().max().item():.1e}")
                print(f"  L={L:5d} {backend:<9} {ms:7.3f} ms   with LSE {ms_lse:7.3f} ms{err}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  L={L:5d} {backend:<9} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


def check_precision():
    print("== bf16 vs float32, full-size random v1.2 weights, 512^2, one forward ==")
    cfg = preset("full")
    m32 = random_model(cfg, seed=0, device="cuda")
    cond = random_cond(cfg, 1)
    x = torch.randn(1, 4, 64, 64, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    with torch.no_grad():
        ref = m32(x, t, **cond.model_kwargs())
        m16 = m32.to(torch.bfloat16)
        out = m16(x, t, **cond.model_kwargs())
    print(f"  relative L2 error bf16 vs fp32: {((out - ref).norm() / ref.norm()).item():.2e}")
    del m32, m16
    torch.cuda.empty_cache()


def one_rank_job(pixels: int, steps: int) -> Job:
    return bench_job(preset("full"), pixels, steps, 0, WeightsRef("r", "random:0:full"))


def check_syncs_and_speed(skip_compile: bool):
    print("== serial runner at 1024^2: host syncs, step time ==")
    model = random_model("full", seed=0, dtype=torch.bfloat16, device="cuda")
    model.configure(ComputeOptions(cross_attention="cudnn"))
    plan = ParallelConfig()
    runner = Runner(model, build_mesh({}, 0), plan, backend="auto")
    runner.run(one_rank_job(1024, 2))                    # warm-up (kernels, cuDNN plans)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        runner.run(one_rank_job(1024, 4))
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"  host synchronisations in a 4-step job: {len(syncs)} (the final latent's copy to the host is one)")
    for s in syncs[:8]:
        print("   ", s)
    for compiled in ([False] if skip_compile else [False, True]):
        if compiled:
            t0 = time.perf_counter()
            model.compile_blocks()
            runner.run(one_rank_job(1024, 2))
            print(f"  compile + first 2-step job: {time.perf_counter() - t0:.1f} s")
        job = one_rank_job(1024, 20)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.run(job)
        dt = time.perf_counter() - t0
        print(f"  {'compiled' if compiled else 'eager   '}: {1000 * dt / 20:.1f} ms per CFG step "
              f"(20 steps {dt:.2f} s -> 50 steps {2.5 * dt:.2f} s)", flush=True)


def compiled_full_model():
    """Full-size random bf16 model as a GPU worker sets it up (fused GELU, padded attention, compiled)."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    model = random_model("full", seed=0, dtype=dt, device=dev)
    backend = resolve_backend("auto", dev, dt, in_graph=True)
    model.configure(ComputeOptions(fused_gelu=True, cross_attention=backend))
    model.compile_blocks()
    return model, backend


def timed_job(runner: Runner, pixels: int, steps: int, scale: float):
    """A 3-step warm-up job (compiles; with graphs: plain call, record, replay), then the timed job:
    (latent, ms per step, warm-up seconds)."""
    warm = one_rank_job(pixels, 3)
    warm.guidance = scale
    t0 = time.perf_counter()
    runner.run(warm)
    first = time.perf_counter() - t0
    job = one_rank_job(pixels, steps)
    job.guidance = scale
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = runner.run(job)
    return out, 1000 * (time.perf_counter() - t0) / steps, first


def check_graphs(steps: int, pixels: int = 1024):
    print(f"== CUDA graphs of the model call, compiled, {pixels}^2, {steps} steps ==")
    model, backend = compiled_full_model()
    plan, cache = ParallelConfig(), GraphCache()
    for scale in (5.0, 1.0):
        outs, ms = {}, {}
        for name, graphs in (("plain", None), ("graphs", cache)):
            runner = Runner(model, build_mesh({}, 0), plan, backend=backend, graphs=graphs)
            outs[name], ms[name], _ = timed_job(runner, pixels, steps, scale)
        a, b = outs["plain"], outs["graphs"]
        rel = ((a - b).norm() / a.norm()).item()
        print(f"  batch {2 if scale != 1.0 else 1}: plain {ms['plain']:.1f} ms/step, graphs {ms['graphs']:.1f} ms/step; "
              f"latents {'identical' if torch.equal(a, b) else f'rel diff {rel:.1e}'}", flush=True)
    print(f"  graphs recorded {cache.captures}, failed {cache.failures}")


def check_fused(steps: int, pixels: int = 1024):
    print(f"== fused Triton kernels vs none, compiled, CUDA graphs, {pixels}^2, {steps} steps ==")
    model, backend = compiled_full_model()
    plan = ParallelConfig()
    outs, ms = {}, {}
    for name in ("unfused", "fused"):
        on = model.configure(replace(model.options, fused_kernels=name == "fused")).fused_kernels
        print(f"  {name}: kernels {'on' if on else 'off'}", flush=True)
        cache = GraphCache()
        for scale in (5.0, 1.0):
            runner = Runner(model, build_mesh({}, 0), plan, backend=backend, graphs=cache)
            outs[name, scale], ms[name, scale], first = timed_job(runner, pixels, steps, scale)
            print(f"  {name} batch {2 if scale != 1.0 else 1}: {ms[name, scale]:.1f} ms/step "
                  f"({steps} steps {ms[name, scale] * steps / 1000:.2f} s; first 3-step job {first:.1f} s); "
                  f"graphs recorded {cache.captures}, failed {cache.failures}", flush=True)
    for scale in (5.0, 1.0):
        a, b = outs["unfused", scale], outs["fused", scale]
        print(f"  batch {2 if scale != 1.0 else 1}: fused / unfused step time {ms['fused', scale] / ms['unfused', scale]:.3f}; "
              f"final latent rel L2 diff {((b - a).norm() / a.norm()).item():.2e}, "
              f"max {((b - a).abs().max() / a.abs().max()).item():.2e}")


def check_seq_first():
    print("== q/k/v kernel on a sequence-first source (Ulysses 2: 8 heads, the chunk's tokens), bf16 ==")
    import torch.nn as nn
    from comfyui_xdit_hunyuan.model import TokenGrid, kernels, rope_table
    dev, dt, h, d, dp = torch.device("cuda"), torch.bfloat16, 8, 88, 96
    for side, b in ((128, 2), (256, 2), (128, 1)):
        n = side * side
        src = torch.randn(n, b, 3 * h * d, device=dev, dtype=dt)
        cos, sin = (t.to(dev) for t in rope_table(TokenGrid(2 * side, 2 * side), d))
        norm = nn.LayerNorm(d, eps=1e-6).to(dev, dt)
        with torch.no_grad():
            out = kernels.norm_rope_pad(src, 0, h, d, norm, (cos, sin), dp, kernels.softmax_rescale(d, dp), seq_first=True)
            bm = kernels.norm_rope_pad(src.transpose(0, 1).contiguous(), 0, h, d, norm, (cos, sin), dp,
                                       kernels.softmax_rescale(d, dp))
            ref = kernels.norm_rope_pad_reference(src, 0, h, d, norm, (cos, sin), dp, kernels.softmax_rescale(d, dp),
                                                  seq_first=True)
        rel = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
        print(f"  {n} tokens, batch {b}: equal to the batch-major source: {torch.equal(out, bm)}; "
              f"max rel diff to the unfused code {rel:.1e}; token-major {out.transpose(1, 2).is_contiguous()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--only", default="attention,precision,runner,graphs")
    ap.add_argument("--graph-steps", type=int, default=20)
    a = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(0))
    if "attention" in a.only:
        check_attention()
    if "precision" in a.only:
        check_precision()
    if "runner" in a.only:
        check_syncs_and_speed(a.skip_compile)
    if "graphs" in a.only:
        check_graphs(a.graph_steps)
    if "fused" in a.only:
        check_fused(a.graph_steps)
    if "seqfirst" in a.only:
        check_seq_first()
