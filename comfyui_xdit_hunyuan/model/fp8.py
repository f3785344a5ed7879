"""FP8 matmuls for the transformer blocks (opt-in: the pool's dtype "fp8").

The model stays bf16; only the big per-step GEMMs of every block (fused QKV, self- and cross-attention
output projections, cross-attention query, MLP fc1 / fc2, skip merge) run on FP8 tensor cores through
`torch._scaled_mm`:

- weights: float8 e4m3, one float32 scale per output channel (row), quantised once when the weights load;
- activations: float8 e4m3, one float32 scale per token (row), quantised at every call (inside the compiled
  block graph the amax and the cast fuse with the norm or GELU before them);
- bias added and the output written in bf16 by the GEMM; float32 accumulation.

Every scale belongs to one token or one output channel, so a token's output does not depend on the other
tokens in the batch: the parallel modes that are exact in bf16 (CFG, Ulysses, Ring) stay exact with FP8.
The image is not the bf16 image (each GEMM differs from bf16 by a few percent, relative), which is why
this is never the default. The per-step text K/V projection, the modulation and the embedders stay bf16.
"""
from __future__ import annotations

import torch
import torch.nn as nn

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                        # torch.finfo(float8_e4m3fn).max
_TINY = 1e-12                          # scale of an all-zero row (its values quantise to 0 either way)


def fp8_supported(device: torch.device) -> str | None:
    """None when FP8 matmuls run on `device`, else why not (a sentence for the user)."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no FP8 matmul; update torch or choose dtype bf16"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return (f"dtype fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, "
                    f"Blackwell); {name} is {major}.{minor}. Choose dtype bf16")
    return None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (float8 e4m3 [..., K], float32 scale [..., 1]) with x ≈ q * scale, row by row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_TINY)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    """y = x W^T + b with W and x in float8 e4m3 (row-wise scales) and y in x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        k = linear.in_features
        if k % 16 or linear.out_features % 16:
            raise ValueError(f"FP8 matmuls need in/out features divisible by 16, got {k}/{linear.out_features}")
        self.in_features, self.out_features = k, linear.out_features
        with torch.no_grad():
            q, s = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", q)                       # [N, K]
        self.register_buffer("weight_scale", s.reshape(1, -1))      # [1, N]
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, s = quantize_rows(x.reshape(-1, self.in_features))
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=s, scale_b=self.weight_scale, bias=bias,
                             out_dtype=x.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise"


# the per-step GEMMs of a block, by attribute path
BLOCK_LINEARS = ("attn1.Wqkv", "attn1.out_proj", "attn2.q_proj", "attn2.out_proj", "mlp.fc1", "mlp.fc2",
                 "skip_linear")


def use_fp8_matmuls(blocks) -> int:
    """Replace the per-step linears of every block with Fp8Linear (in place; the bf16 weights of those
    linears are freed). Returns how many were replaced."""
    n = 0
    for blk in blocks:
        for path in BLOCK_LINEARS:
            *parents, name = path.split(".")
            owner = blk
            for p in parents:
                owner = getattr(owner, p)
            lin = getattr(owner, name, None)
            if isinstance(lin, nn.Linear):
                setattr(owner, name, Fp8Linear(lin))
                n += 1
    return n
