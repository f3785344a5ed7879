"""Attention kernels.

Tensors are head-first, [batch, heads, tokens, head_dim] (the layout of torch SDPA). Two entry points:

- `attention(q, k, v, backend)`: the output only.
- `attention_lse(q, k, v, backend)`: the output and the log-sum-exp of each query row (float32
  [batch, heads, tokens]); ring attention merges partial results with it.

Backends: "auto" (the fastest available), "sdpa" (torch's dispatcher), "padded" (the dispatcher on the
head dim zero-padded to a multiple of 32, scale unchanged: 88 -> 96 takes a faster cuDNN kernel; inside a
compiled graph the padding fuses into the RoPE kernel, so it costs nothing), "flash", "cudnn", "efficient"
(torch's fused CUDA kernels), "flash_attn" (the flash-attn package), "flash_attn4" (flash-attn-4, the CuTe-DSL
FlashAttention: `pip install flash-attn-4`, the pack's `flash4` extra; forward on Hopper), "math" (plain
matmul + softmax in float32; any device, the slow reference). On the CPU every backend but "math" runs
torch's CPU kernels.

Measured on an H100 (bf16, 16 heads x 88, bench/gpu_checks.py): at 4096 tokens torch's dispatcher (0.49 ms)
beats cuDNN with the head dim zero-padded to 96 (0.53 ms) and flash (0.69 ms); with log-sum-exp, cuDNN
(0.54 ms) beats flash (0.68 ms). So "auto" is the dispatcher for plain attention and cuDNN for LSE.
On an H200 (batch 2, 16 heads, bf16): flash-attn-4 on the padded head dim takes 5.29-5.38 ms at 16384
tokens against cuDNN's 6.23 (padded), the LSE at no extra cost, but 0.46 against 0.425 ms at 4096 tokens.
So where flash-attn-4 is installed and the GPU is SM90, "auto" resolves to "flash_attn4+<its other
choice>": flash-attn-4 for sequences of at least FA4_MIN_TOKENS queries and keys, the other choice below
that (`kernel_for`); bench/attention_bench.py measures the threshold.

flash-attn-4 cannot be traced by torch.compile: it is called through a custom op with a fake (meta)
implementation (`xdit_hunyuan::flash_attn4`), so compiled block graphs keep it as one opaque call and the
rest of the block still fuses around it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "padded", "flash", "cudnn", "efficient", "flash_attn", "flash_attn4", "math")

# "auto" takes flash-attn-4 where both the query and the key count are at least this (measured on one H200,
# perf notes: no gain at 4096 tokens, 15% at 16384; re-measure with bench/attention_bench.py)
FA4_MIN_TOKENS = 8192
# GPUs (compute capability) on which "auto" considers flash-attn-4: its forward measured on SM90
FA4_CAPABILITIES = ((9, 0),)
FA4 = "flash_attn4"

try:  # optional extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not installed"
    _flash_attn_func = None

_CUDNN_WORKS: dict = {}
_FA4_FUNC: list = []          # [flash_attn.cute.flash_attn_func or None], filled at first need


def fa4_func():
    """flash-attn-4's `flash_attn_func`, or None when it is not installed. Imported at first need (it loads
    the CuTe DSL, which takes a while), never on import of this module."""
    if not _FA4_FUNC:
        try:
            from flash_attn.cute import flash_attn_func  # type: ignore
        except Exception:  # noqa: BLE001 - any import failure means "not installed"
            flash_attn_func = None
        _FA4_FUNC.append(flash_attn_func)
    return _FA4_FUNC[0]


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))


def fa4_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether "auto" may pick flash-attn-4 here: installed, a half dtype, a GPU of FA4_CAPABILITIES."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and fa4_func() is not None
            and _capability(device) in FA4_CAPABILITIES)


def fa4_fits(head_dim: int, dtype: torch.dtype) -> bool:
    """Shapes flash-attn-4's SM90 forward takes: a half dtype, head dim a multiple of 8 in 8..256."""
    return dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and 8 <= head_dim <= 256


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


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, *, in_graph: bool = False,
                    keys: int | None = None) -> str:
    """'auto' -> flash-attn when installed on a GPU; else, for attention inside a compiled graph on a GPU,
    the padded head dim (free there, and the faster cuDNN kernel); else torch's SDPA dispatcher. Where
    flash-attn-4 is usable (`fa4_usable`): "flash_attn4+" that choice, i.e. flash-attn-4 for long sequences
    (`kernel_for`). `keys`: the key count when it is known now (the cross-attention's text tokens): below
    FA4_MIN_TOKENS the plain choice is returned.

    Example: on an H200 with flash-attn-4 installed, bf16: resolve_backend("auto", cuda, bf16, in_graph=True)
    is "flash_attn4+padded"; with keys=333, "padded"; on an A100 or without flash-attn-4, "padded"."""
    if name != "auto":
        return name
    half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if half and _flash_attn_func is not None:
        base = "flash_attn"
    else:
        base = "padded" if half and in_graph else "sdpa"
    if half and (keys is None or keys >= FA4_MIN_TOKENS) and fa4_usable(device, dtype):
        return f"{FA4}+{base}"
    return base


def split_backend(backend: str) -> tuple[str | None, str]:
    """("flash_attn4", other) for the resolved "flash_attn4+other"; (None, backend) for any other name."""
    if backend.startswith(FA4 + "+"):
        return FA4, backend[len(FA4) + 1:]
    return None, backend


def kernel_for(backend: str, q_tokens: int, k_tokens: int, head_dim: int, dtype: torch.dtype) -> str:
    """The kernel a resolved backend runs at these sizes: for "flash_attn4+other", flash-attn-4 when both
    token counts are at least FA4_MIN_TOKENS and it takes the shapes, else `other`; any other backend as is.

    Example: kernel_for("flash_attn4+padded", 16384, 16384, 96, bf16) == "flash_attn4";
    kernel_for("flash_attn4+padded", 4096, 4096, 96, bf16) == "padded"."""
    long, other = split_backend(backend)
    if long is not None and min(q_tokens, k_tokens) >= FA4_MIN_TOKENS and fa4_fits(head_dim, dtype):
        return long
    return other


def pads_head_dim(backend: str) -> bool:
    """Whether a resolved backend wants the head dim zero-padded to a multiple of 32 ("padded", and the
    "+padded" auto choices: flash-attn-4 is faster on 96 than on 88 too). The fused kernels then write q/k/v
    padded (free there); `attention` pads what arrives unpadded."""
    return split_backend(backend)[1] == "padded"


@torch.library.custom_op("xdit_hunyuan::flash_attn4", mutates_args=())
def _fa4_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn-4's forward on token-major q, k, v [B, L, H, d] (any strides, last dim contiguous):
    (out [B, Lq, H, d] token-major, lse float32 [B, H, Lq])."""
    fn = fa4_func()
    if fn is None:
        raise RuntimeError("the attention backend flash_attn4 needs flash-attn-4: pip install flash-attn-4 "
                           "(or the pack's extra: pip install 'comfyui-xdit-hunyuan[flash4]')")
    out, lse = fn(q, k, v, softmax_scale=scale, return_lse=True)
    return out, lse


@_fa4_op.register_fake
def _(q, k, v, scale):
    b, lq, h, _ = q.shape
    return q.new_empty(b, lq, h, v.shape[-1]), q.new_empty(b, h, lq, dtype=torch.float32)


def flash_attn4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-first in, head-first out: the transposes are views, so token-major storage (the fused kernels')
    reaches flash-attn-4 without a copy, and its output is token-major storage viewed head-first (what the
    output projection reads without a copy)."""
    out, lse = torch.ops.xdit_hunyuan.flash_attn4(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    return out.transpose(1, 2), lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention without mask, [B,H,Lq,d] in q's dtype."""
    backend = resolve_backend(backend, q.device, q.dtype)
    d, scale = q.shape[-1], None
    if pads_head_dim(backend) and d % 32:        # zeros appended; the softmax scale stays 1/sqrt(d)
        q, k, v = (F.pad(t, (0, (-d) % 32)) for t in (q, k, v))
        scale = d ** -0.5
    kernel = kernel_for(backend, q.shape[2], k.shape[2], q.shape[-1], q.dtype)
    if kernel in ("sdpa", "padded") or (q.device.type == "cpu" and kernel != "math"):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    elif kernel == FA4:
        out = flash_attn4(q, k, v, scale or 1.0 / math.sqrt(q.shape[-1]))[0]
    else:
        out = attention_lse(q, k, v, kernel)[0]
    return out[..., :d] if out.shape[-1] != d else out


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention without mask; returns (out [B,H,Lq,d] in q's dtype, lse float32 [B,H,Lq])."""
    backend = kernel_for(resolve_backend(backend, q.device, q.dtype), q.shape[2], k.shape[2], q.shape[-1], q.dtype)
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
    if backend == FA4:
        return flash_attn4(q, k, v, scale)
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
