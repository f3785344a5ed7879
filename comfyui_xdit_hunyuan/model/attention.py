"""Attention kernels.

Tensors are head-first, [batch, heads, tokens, head_dim] (the layout of torch SDPA). Two entry points:

- `attention(q, k, v, backend)`: the output only.
- `attention_lse(q, k, v, backend)`: the output and the log-sum-exp of each query row (float32
  [batch, heads, tokens]); ring attention merges partial results with it.

Backends: "auto" (the fastest available), "sdpa" (torch's dispatcher), "padded" (the dispatcher on the
head dim zero-padded to a multiple of 32, scale unchanged: 88 -> 96 takes a faster cuDNN kernel; inside a
compiled graph the padding fuses into the RoPE kernel, so it costs nothing), "flash", "cudnn", "efficient"
(torch's fused CUDA kernels), "flash_attn" (the flash-attn package), "math" (plain matmul + softmax in
float32; any device, the slow reference).

Measured on an H100 (bf16, 16 heads x 88, bench/gpu_checks.py): at 4096 tokens torch's dispatcher (0.49 ms)
beats cuDNN with the head dim zero-padded to 96 (0.53 ms) and flash (0.69 ms); with log-sum-exp, cuDNN
(0.54 ms) beats flash (0.68 ms). So "auto" is the dispatcher for plain attention and cuDNN for LSE.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "padded", "flash", "cudnn", "efficient", "flash_attn", "math")

try:  # optional extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not installed"
    _flash_attn_func = None

_CUDNN_WORKS: dict = {}


def _cudnn_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's cuDNN attention runs here (it needs a recent cuDNN and a supported GPU)."""
    key = (device.index, dtype)
    if key not in _CUDNN_WORKS:
        try:
            q = torch.zeros(1, 1, 64, 88, device=device, dtype=dtype)
            torch.ops.aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, False, False, scale=0.1)
            _CUDNN_WORKS[key] = True
        except Exception:  # noqa: BLE001 - any failure: use another kernel
            _CUDNN_WORKS[key] = False
    return _CUDNN_WORKS[key]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, *, in_graph: bool = False) -> str:
    """'auto' -> flash-attn when installed on a GPU; else, for attention inside a compiled graph on a GPU,
    the padded head dim (free there, and the faster cuDNN kernel); else torch's SDPA dispatcher."""
    if name != "auto":
        return name
    half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if half and _flash_attn_func is not None:
        return "flash_attn"
    return "padded" if half and in_graph else "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention without mask, [B,H,Lq,d] in q's dtype."""
    backend = resolve_backend(backend, q.device, q.dtype)
    if backend == "padded":
        d = q.shape[-1]
        pad = (-d) % 32
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)[..., :d]
        backend = "sdpa"
    if backend == "sdpa" or (q.device.type == "cpu" and backend != "math"):
        return F.scaled_dot_product_attention(q, k, v)
    return attention_lse(q, k, v, backend)[0]


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention without mask; returns (out [B,H,Lq,d] in q's dtype, lse float32 [B,H,Lq])."""
    backend = resolve_backend(backend, q.device, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1])
    lq = q.shape[2]
    if backend == "math":
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float())
        return out.to(q.dtype), lse
    if backend == "flash_attn":
        out, lse, _ = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       softmax_scale=scale, return_attn_probs=True)
        return out.transpose(1, 2), lse[..., :lq].float()
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
        return out, lse.float()
    if backend in ("sdpa", "cudnn", "padded") and q.dtype in (torch.float16, torch.bfloat16) \
            and _cudnn_works(q.device, q.dtype):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
        return out, lse.reshape(lse.shape[0], lse.shape[1], -1)[..., :lq].float()
    if backend in ("sdpa", "flash", "cudnn", "padded") and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
        return out, lse.float()
    if backend in ("sdpa", "efficient", "flash", "cudnn", "padded"):
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        return out, lse[..., :lq].float()
    raise ValueError(f"unknown attention backend '{backend}'; choose one of: {', '.join(BACKENDS)}")


def merge_partial(out: torch.Tensor | None, lse: torch.Tensor | None,
                  blk_out: torch.Tensor, blk_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two softmax-attention partial results over disjoint key sets, in float32.

    out: float32 [B,H,L,d] accumulator (or None), lse: float32 [B,H,L]. Returns the new pair.
    """
    blk_out = blk_out.float()
    if out is None:
        return blk_out, blk_lse
    new_lse = torch.logaddexp(lse, blk_lse)
    w_old = torch.exp(lse - new_lse).unsqueeze(-1)
    w_blk = torch.exp(blk_lse - new_lse).unsqueeze(-1)
    return out * w_old + blk_out * w_blk, new_lse
