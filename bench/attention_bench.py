"""Attention kernels at HunyuanDiT's shapes on one GPU: the measurement behind model.attention.FA4_MIN_TOKENS.

    python bench/attention_bench.py [--tokens 4096,8192,16384] [--batches 1,2] [--heads 16,8]
                                    [--layouts tm,sf] [--out attention.json]

Per (tokens, batch, heads, layout), the device time of each kernel (10 launches recorded in a CUDA graph,
replayed; CUDA events when a kernel cannot be recorded), plain and with the log-sum-exp (what ring
attention needs), bf16, head dim 88:
  cudnn96   cuDNN on the head dim zero-padded to 96, q pre-scaled (what "padded" runs in the compiled blocks)
  cudnn88   cuDNN on 88
  flash88   SDPA's flash kernel on 88
  fa4_88    flash-attn-4 (flash_attn.cute.flash_attn_func) on 88, return_lse False / True
  fa4_96    flash-attn-4 on the padded head dim
  pack_96   flash-attn-4 through the pack (model.attention.flash_attn4: its custom op), padded
Layouts of q, k, v: tm = token-major storage [B, L, H, D] viewed head-first (what the fused kernels write,
also after the Ulysses exchange), hf = contiguous head-first (the unfused path), sf = sequence-first
storage [L, B, H, D]. Heads 8 = one Ulysses-2 rank's share.

Each row also gives the error against a float32 reference of the first head (relative L2 of the output,
max |LSE difference|). At the end: what "auto" resolves to on this GPU, a check that the custom op runs
inside torch.compile and a CUDA graph, and the suggested threshold: the smallest token count from which the
best flash-attn-4 variant beats cudnn96 at every batch, head count and layout measured, plain and with LSE.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from comfyui_xdit_hunyuan.model import attention as A

D, DP = 88, 96


def timed_ms(fn, launches: int = 10, replays: int = 10) -> tuple[float, str]:
    """(ms per launch, how): launches recorded into a CUDA graph and replayed, else CUDA events."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(launches):
                fn()
        g.replay()
        torch.cuda.synchronize()
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / (launches * replays), "graph"
    except Exception:  # noqa: BLE001 - not capturable: time the launches
        torch.cuda.synchronize()
        for _ in range(3):
            fn()
        a.record()
        for _ in range(launches * 2):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / (launches * 2), "events"


def inputs(b: int, h: int, n: int, layout: str, dim: int, seed: int = 0):
    """q, k, v head-first [b, h, n, dim] in `layout`; dim 96: zeros after 88, q scaled by sqrt(96/88)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    order = {"tm": (b, n, h), "hf": (b, h, n), "sf": (n, b, h)}[layout]
    out = []
    for i in range(3):
        x = torch.randn(*order, D, device="cuda", dtype=torch.bfloat16, generator=g)
        if dim > D:
            x = F.pad(x * (math.sqrt(dim / D) if i == 0 else 1.0), (0, dim - D))
        view = {"tm": lambda t: t.transpose(1, 2), "hf": lambda t: t, "sf": lambda t: t.permute(1, 2, 0, 3)}[layout]
        out.append(view(x))
    return out


def reference(q, k, v, dim):
    """Float32 attention of batch 0, head 0 (out [n, 88], lse [n]); with dim 96 q carries sqrt(96/88), so
    the scale 1/sqrt(dim) is the softmax scale of 88 either way."""
    q0, k0, v0 = (t[0, 0, :, :D].float() for t in (q, k, v))
    s = (q0 @ k0.T) / math.sqrt(dim)
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse[:, None]) @ v0, lse


def kernels(dim: int, fa4):
    """name -> (plain fn, lse fn) on head-first q, k, v of head dim `dim` (None where not available)."""
    scale = 1.0 / math.sqrt(dim)

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    def cudnn_lse(q, k, v):
        o, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                     scale=scale)[:2]
        return o, lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :q.shape[2]]

    def flash_lse(q, k, v):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]

    out = {f"cudnn{dim}": (sdpa(SDPBackend.CUDNN_ATTENTION), cudnn_lse)}
    if dim == D:
        out[f"flash{dim}"] = (sdpa(SDPBackend.FLASH_ATTENTION), flash_lse)
    if fa4 is not None:
        def fa4_run(lse):
            def run(q, k, v):
                o, l_ = fa4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                            return_lse=lse)
                return (o.transpose(1, 2), l_) if lse else o.transpose(1, 2)
            return run
        out[f"fa4_{dim}"] = (fa4_run(False), fa4_run(True))
        if dim == DP:
            out[f"pack_{dim}"] = (lambda q, k, v: A.attention(q, k, v, "flash_attn4"),
                                  lambda q, k, v: A.attention_lse(q, k, v, "flash_attn4"))
    return out


def measure(b, h, n, layout, fa4) -> list[dict]:
    rows = []
    for dim in (DP, D):
        q, k, v = inputs(b, h, n, layout, dim)
        ref, ref_lse = reference(q, k, v, dim)
        for name, (plain, with_lse) in kernels(dim, fa4).items():
            for lse in (False, True):
                fn = with_lse if lse else plain
                row = {"tokens": n, "batch": b, "heads": h, "layout": layout, "kernel": name, "lse": lse}
                try:
                    res = fn(q, k, v)
                    o, l_ = res if lse else (res, None)
                    o0 = o[0, 0, :, :D].float()
                    row["rel_err"] = float((o0 - ref).norm() / ref.norm())
                    if l_ is not None:
                        row["lse_err"] = float((l_[0, 0].float() - ref_lse).abs().max())
                    row["ms"], row["timing"] = timed_ms(lambda: fn(q, k, v))
                    row["tflops"] = 4 * b * h * n * n * D / (row["ms"] * 1e9)
                except Exception as e:  # noqa: BLE001 - report and go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                err = row.get("error") or (f"{row['ms']:7.3f} ms {row['tflops']:5.0f} TFLOP/s ({row['timing']}) "
                                           f"rel err {row['rel_err']:.1e}"
                                           + (f" lse err {row['lse_err']:.1e}" if "lse_err" in row else ""))
                print(f"  L={n:5d} B={b} H={h:2d} {layout} {name:<8} {'lse ' if lse else 'plain'} {err}", flush=True)
        del q, k, v
    return rows


def suggest(rows: list[dict]) -> dict:
    """Per token count: does the best flash-attn-4 variant beat cudnn96 everywhere (plain and with LSE)?"""
    wins: dict = {}
    groups: dict = {}
    for r in rows:
        if "ms" in r:
            groups.setdefault((r["tokens"], r["batch"], r["heads"], r["layout"], r["lse"]), {})[r["kernel"]] = r["ms"]
    for (n, *_), ks in groups.items():
        fa = [ms for k, ms in ks.items() if k.startswith(("fa4", "pack"))]
        base = ks.get(f"cudnn{DP}")
        if fa and base:
            wins.setdefault(n, []).append(min(fa) < base)
    tokens = sorted(wins)
    ok = [n for i, n in enumerate(tokens) if all(all(wins[m]) for m in tokens[i:])]
    return {"wins_by_tokens": {n: all(w) for n, w in sorted(wins.items())},
            "suggested_min_tokens": ok[0] if ok else None, "current_min_tokens": A.FA4_MIN_TOKENS}


def compiled_check(fa4) -> str:
    """The custom op inside torch.compile (inductor) and a CUDA graph, against the eager call."""
    if fa4 is None:
        return "skipped (flash-attn-4 not installed)"
    q, k, v = inputs(2, 16, 16384, "tm", D)

    def block(q, k, v):
        return A.attention(q * 1.0, k, v, "flash_attn4+padded").transpose(1, 2).reshape(2, 16384, -1) + 1

    try:
        eager = block(q, k, v)
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(q, k, v)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static = compiled(q, k, v)
        g.replay()
        torch.cuda.synchronize()
        d1 = float((out.float() - eager.float()).abs().max())
        d2 = float((static.float() - eager.float()).abs().max())
        return f"ok: compiled max diff {d1:.1e}, CUDA graph replay max diff {d2:.1e}"
    except Exception as e:  # noqa: BLE001
        return f"FAILED: {type(e).__name__}: {str(e)[:300]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,8192,16384")
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--heads", default="16,8")
    ap.add_argument("--layouts", default="tm")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    fa4 = A.fa4_func()
    try:
        from importlib.metadata import version as _version
        version = _version("flash-attn-4")
    except Exception:  # noqa: BLE001 - not installed as a distribution (or carried as files)
        version = None
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}, capability "
          f"{torch.cuda.get_device_capability(dev)}, flash-attn-4 {version or ('importable' if fa4 else 'absent')} "
          f"(import {time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"auto here: in the block graphs {A.resolve_backend('auto', dev, torch.bfloat16, in_graph=True)!r}, "
          f"outside {A.resolve_backend('auto', dev, torch.bfloat16)!r}, cross-attention "
          f"{A.resolve_backend('auto', dev, torch.bfloat16, in_graph=True, keys=333)!r}", flush=True)
    rows = []
    with torch.no_grad():
        for n in (int(x) for x in a.tokens.split(",")):
            for b in (int(x) for x in a.batches.split(",")):
                for h in (int(x) for x in a.heads.split(",")):
                    for layout in a.layouts.split(","):
                        rows.extend(measure(b, h, n, layout, fa4))
                        torch.cuda.empty_cache()
        check = compiled_check(fa4)
    print(f"flash-attn-4 through the custom op, torch.compile + CUDA graph: {check}")
    s = suggest(rows)
    print(f"flash-attn-4 beats cudnn96 everywhere at: {s['wins_by_tokens']}; suggested FA4_MIN_TOKENS "
          f"{s['suggested_min_tokens']} (now {s['current_min_tokens']}); {time.perf_counter() - t0:.0f} s in all")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "flash_attn_4": version,
                       "rows": rows, "suggestion": s, "compiled_check": check}, f, indent=1)


if __name__ == "__main__":
    main()
