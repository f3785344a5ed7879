"""Hand-fused Triton kernels for the GPU path (HunyuanDiT.use_fused_kernels), each with its plain-torch
reference (the unfused code, used on the CPU and where Triton is missing).

- `norm_rope_pad`: the attention inputs from a projection's output in one pass: per-head LayerNorm (q / k
  norms), 2-D RoPE, the head dim zero-padded (88 -> 96 for the faster cuDNN kernel) with the softmax scale
  folded into q, written token-major [B, N, H, Dp] (returned as the head-first view [B, H, N, Dp]). cuDNN
  then writes the attention output token-major too, and the output projection reads it without a copy
  (its weight zero-padded to match). Unfused, torch.compile spends ≈ 3 passes and 2 copies on this. The
  source may also be sequence-first [N, B, width] (`seq_first`: what the Ulysses exchange of the projection
  delivers, parallel/sequence.py); the output is token-major all the same.
- `cat_layer_norm`: the skip merge's LayerNorm over [x, skip] without materialising the concatenation
  first (one pass instead of a statistics pass and a concatenating pass);
- `add_layer_norm`: a residual add and the LayerNorm after it in one pass (before the cross-attention and
  before the MLP).

Arithmetic follows the unfused code: statistics and RoPE in float32, the normed value rounded to the
tensor dtype before RoPE, one rounding at the end. On the CPU the kernels run under TRITON_INTERPRET=1 (the
tests compare them with the references there).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU builds may lack it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure: the references run
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the Triton kernels run on `device` (a GPU, or the CPU under Triton's interpreter)."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


def wanted(device: torch.device, setting: str = "auto") -> bool:
    """Whether a worker on `device` uses the kernels (config.PoolConfig.fused_kernels): "auto" on GPUs, "on"
    wherever they run (the CPU under TRITON_INTERPRET=1: tests), "off" never (results then differ only by
    rounding)."""
    if setting == "off":
        return False
    return available(device) and (device.type == "cuda" or setting == "on")


# launch configurations (rows per program, warps) on GPUs, from bench/kernel_bench.py on an H100
NORM_ROPE_CONFIG = (4, 4)
CAT_NORM_CONFIG = (1, 4)       # also the residual add + LayerNorm


def padded_head_dim(d: int, multiple: int = 32) -> int:
    return d + (-d) % multiple


# Row and token counts are not specialised on (Triton specialises integers by divisibility by 16 and by
# being 1): one compiled kernel then serves every image size, batch (CFG split or not) and text length,
# which leaves a first job (or a spare's warm-up, worker/warmup.py) fewer kernels to compile. The widths and
# strides, fixed by the model, stay specialised.
ROW_COUNTS = {"norm_rope_pad": ["M", "n_tok", "batch"], "layer_norm": ["R"]}

if triton is not None:
    @triton.jit(do_not_specialize=ROW_COUNTS["norm_rope_pad"])
    def _norm_rope_pad_kernel(src, dst, w, b, cos, sin, M, n_tok, batch, src_stride, eps, q_scale,
                              H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_T: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                              SEQ_FIRST: tl.constexpr):
        # one program: BLOCK_T source rows (tokens), every head in turn (each token's row is read and written
        # in one sweep, its RoPE angles loaded once)
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        rmask = rows < M
        dmask = d < D
        m2 = rmask[:, None] & dmask[None, :]
        src_rows = src + rows[:, None].to(tl.int64) * src_stride + d[None, :]
        if SEQ_FIRST:        # source rows (token, batch), batch inner; written token-major (batch, token)
            tok = rows // batch
            dst_rows = dst + ((rows % batch) * n_tok + tok)[:, None].to(tl.int64) * (H * DP) + d[None, :]
        else:                # source rows (batch, token)
            tok = rows % n_tok
            dst_rows = dst + rows[:, None].to(tl.int64) * (H * DP) + d[None, :]
        smask = rmask[:, None] & (d < DP)[None, :]
        if NORM:
            wv = tl.load(w + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
            bv = tl.load(b + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        if ROPE:                                          # pairs (0, 1), (2, 3), ... rotate together
            t = tok[:, None] * D + d[None, :]
            ce, co = tl.split(tl.reshape(tl.load(cos + t, mask=m2, other=0.0), (BLOCK_T, BLOCK_D // 2, 2)))
            se, so = tl.split(tl.reshape(tl.load(sin + t, mask=m2, other=0.0), (BLOCK_T, BLOCK_D // 2, 2)))
        for h in range(H):
            y = tl.load(src_rows + h * D, mask=m2, other=0.0).to(tl.float32)
            if NORM:
                mean = tl.sum(y, axis=1) / D
                yc = tl.where(m2, y - mean[:, None], 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / D + eps)
                y = yc * rstd[:, None] * wv + bv
            if ROPE:
                y = y.to(dst.dtype.element_ty).to(tl.float32)     # the normed tensor, as unfused
                ye, yo = tl.split(tl.reshape(y, (BLOCK_T, BLOCK_D // 2, 2)))
                y = tl.reshape(tl.interleave(ye * ce - yo * se, yo * co + ye * so), (BLOCK_T, BLOCK_D))
            y = tl.where(m2, y * q_scale, 0.0)
            tl.store(dst_rows + h * DP, y.to(dst.dtype.element_ty), mask=smask)

    @triton.jit(do_not_specialize=ROW_COUNTS["layer_norm"])
    def _cat_layer_norm_kernel(a, c, w, b, out, R, K, eps, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.arange(0, BLOCK)
        km = k < K
        m = (rows < R)[:, None] & km[None, :]
        off = rows[:, None].to(tl.int64) * K + k[None, :]
        xa = tl.load(a + off, mask=m, other=0.0).to(tl.float32)
        xc = tl.load(c + off, mask=m, other=0.0).to(tl.float32)
        mean = (tl.sum(xa, axis=1) + tl.sum(xc, axis=1)) / (2 * K)
        da = tl.where(m, xa - mean[:, None], 0.0)
        dc = tl.where(m, xc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(da * da, axis=1) + tl.sum(dc * dc, axis=1)) / (2 * K) + eps)
        wa = tl.load(w + k, mask=km, other=0.0).to(tl.float32)[None, :]
        wc = tl.load(w + K + k, mask=km, other=0.0).to(tl.float32)[None, :]
        ba = tl.load(b + k, mask=km, other=0.0).to(tl.float32)[None, :]
        bc = tl.load(b + K + k, mask=km, other=0.0).to(tl.float32)[None, :]
        ty = out.dtype.element_ty
        o = out + rows[:, None].to(tl.int64) * (2 * K) + k[None, :]
        tl.store(o, (da * rstd[:, None] * wa + ba).to(ty), mask=m)
        tl.store(o + K, (dc * rstd[:, None] * wc + bc).to(ty), mask=m)


    @triton.jit(do_not_specialize=ROW_COUNTS["layer_norm"])
    def _add_layer_norm_kernel(x, delta, w, b, x_out, out, R, K, eps, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.arange(0, BLOCK)
        km = k < K
        m = (rows < R)[:, None] & km[None, :]
        off = rows[:, None].to(tl.int64) * K + k[None, :]
        ty = out.dtype.element_ty
        s = (tl.load(x + off, mask=m, other=0.0).to(tl.float32)
             + tl.load(delta + off, mask=m, other=0.0).to(tl.float32)).to(ty)     # the residual, rounded
        tl.store(x_out + off, s, mask=m)
        v = s.to(tl.float32)
        mean = tl.sum(v, axis=1) / K
        dv = tl.where(m, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(dv * dv, axis=1) / K + eps)
        wv = tl.load(w + k, mask=km, other=0.0).to(tl.float32)[None, :]
        bv = tl.load(b + k, mask=km, other=0.0).to(tl.float32)[None, :]
        tl.store(out + off, (dv * rstd[:, None] * wv + bv).to(ty), mask=m)


def _layer_norm(x, norm):
    w = norm.weight.to(x.dtype) if norm.weight is not None else None
    b = norm.bias.to(x.dtype) if norm.bias is not None else None
    return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)


def norm_rope_pad_reference(src, col0, heads, head_dim, norm, rope, pad_to, q_scale=1.0, *, seq_first=False):
    """The unfused computation, same result layout: [B, H, N, pad_to] viewing [B, N, H, pad_to] storage."""
    from .rope import rotate_pairs
    if seq_first:
        src = src.transpose(0, 1)
    b, n, _ = src.shape
    x = src[..., col0: col0 + heads * head_dim].reshape(b, n, heads, head_dim)
    if norm is not None:
        x = _layer_norm(x, norm)
    xf = x.float()
    if rope is not None:                       # apply_rope's arithmetic, on token-major tensors
        cos, sin = (t[:, None, :] for t in rope)
        xf = xf * cos + rotate_pairs(xf) * sin
    x = (xf * q_scale).to(x.dtype)
    if pad_to > head_dim:
        x = F.pad(x, (0, pad_to - head_dim))
    return x.contiguous().transpose(1, 2)


def norm_rope_pad(src: torch.Tensor, col0: int, heads: int, head_dim: int, norm, rope, pad_to: int,
                  q_scale: float = 1.0, *, seq_first: bool = False, block_t: int | None = None,
                  num_warps: int | None = None) -> torch.Tensor:
    """Attention input from a projection output src [B, N, width] (contiguous): columns col0 ..
    col0 + heads*head_dim, per-head LayerNorm `norm` (or None), RoPE `rope` = (cos, sin) float32
    [N, head_dim] (or None), times q_scale, zero-padded to pad_to. Returns [B, H, N, pad_to] (token-major
    storage). seq_first: src is [N, B, width] instead (tokens outer, batch inner); the result is the same.
    block_t / num_warps: launch configuration (bench/kernel_bench.py sweeps them).

    Example: the Ulysses exchange gives rank u the projection of every token of its ring chunk for its 8
    heads as [N, B, 3 * 8 * 88]; norm_rope_pad(src, 8 * 88, 8, 88, k_norm, rope_of_the_chunk, 96,
    seq_first=True) is k for those heads, [B, 8, N, 96] over [B, N, 8, 96] storage, as on one GPU."""
    if not available(src.device):
        return norm_rope_pad_reference(src, col0, heads, head_dim, norm, rope, pad_to, q_scale, seq_first=seq_first)
    n, b, width = src.shape if seq_first else (src.shape[1], src.shape[0], src.shape[2])
    if rope is not None and tuple(rope[0].shape) != (n, head_dim):
        raise ValueError(f"RoPE tables of shape {tuple(rope[0].shape)} for {n} tokens of head dim {head_dim}")
    src = src.contiguous()
    if rope is not None:
        rope = tuple(t.contiguous() for t in rope)
    m = b * n
    out = torch.empty(b, n, heads, pad_to, device=src.device, dtype=src.dtype)
    w = norm.weight if norm is not None else src
    bias = norm.bias if norm is not None else src
    cos, sin = rope if rope is not None else (src, src)
    block_t = block_t or (128 if INTERPRET else NORM_ROPE_CONFIG[0])    # (the interpreter's cost is per program)
    _norm_rope_pad_kernel[(triton.cdiv(m, block_t),)](
        src[..., col0:], out, w, bias, cos, sin, m, n, b, width, norm.eps if norm is not None else 0.0,
        q_scale, H=heads, D=head_dim, DP=pad_to, BLOCK_D=triton.next_power_of_2(pad_to), BLOCK_T=block_t,
        NORM=norm is not None, ROPE=rope is not None, SEQ_FIRST=seq_first,
        num_warps=num_warps or NORM_ROPE_CONFIG[1])
    return out.transpose(1, 2)


def cat_layer_norm_reference(x, skip, norm):
    return _layer_norm(torch.cat([x, skip], dim=-1), norm)


def cat_layer_norm(x: torch.Tensor, skip: torch.Tensor, norm, *, block_r: int | None = None,
                   num_warps: int | None = None) -> torch.Tensor:
    """LayerNorm `norm` (affine) of cat([x, skip], -1), x and skip [..., K]."""
    if not available(x.device) or norm.weight is None or norm.bias is None:
        return cat_layer_norm_reference(x, skip, norm)
    k = x.shape[-1]
    x, skip = x.contiguous(), skip.contiguous()
    out = torch.empty(*x.shape[:-1], 2 * k, device=x.device, dtype=x.dtype)
    rows = x.numel() // k
    block_r = block_r or (64 if INTERPRET else CAT_NORM_CONFIG[0])
    _cat_layer_norm_kernel[(triton.cdiv(rows, block_r),)](x, skip, norm.weight, norm.bias, out, rows, k, norm.eps,
                                                          BLOCK_R=block_r, BLOCK=triton.next_power_of_2(k),
                                                          num_warps=num_warps or CAT_NORM_CONFIG[1])
    return out


def add_layer_norm_reference(x, delta, norm):
    x = x + delta
    return x, _layer_norm(x, norm)


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, norm, *, block_r: int | None = None,
                   num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, LayerNorm `norm` (affine) of x + delta): a residual add and the next norm in one pass."""
    if not available(x.device) or norm.weight is None or norm.bias is None or delta.dtype != x.dtype:
        return add_layer_norm_reference(x, delta, norm)
    k = x.shape[-1]
    x, delta = x.contiguous(), delta.contiguous()
    x_out, out = torch.empty_like(x), torch.empty_like(x)
    rows = x.numel() // k
    block_r = block_r or (64 if INTERPRET else CAT_NORM_CONFIG[0])
    _add_layer_norm_kernel[(triton.cdiv(rows, block_r),)](x, delta, norm.weight, norm.bias, x_out, out, rows, k,
                                                          norm.eps, BLOCK_R=block_r, BLOCK=triton.next_power_of_2(k),
                                                          num_warps=num_warps or CAT_NORM_CONFIG[1])
    return x_out, out


def pad_head_dim(t: torch.Tensor, pad_to: int) -> torch.Tensor:
    """[..., d] -> [..., pad_to], zeros appended (the text K/V of the cross-attention, once per job)."""
    return F.pad(t, (0, pad_to - t.shape[-1])) if pad_to > t.shape[-1] else t


def softmax_rescale(head_dim: int, pad_to: int) -> float:
    """Factor on q that makes attention's default scale 1/sqrt(pad_to) act as 1/sqrt(head_dim)."""
    return math.sqrt(pad_to / head_dim)
