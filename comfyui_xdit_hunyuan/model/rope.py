"""2D rotary position embedding of HunyuanDiT, with the positions ComfyUI and the original code use.

The token grid (th x tw) is mapped into a base grid of 512 // 8 // patch_size cells by "fill, resize
and centre-crop"; position k along an axis is start + k * (stop - start) / n. The first half of the
head dimension rotates with the width coordinate, the second half with the height coordinate; pairs
(0, 1), (2, 3), ... are rotated together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGrid:
    """How a latent of (height, width) maps onto the transformer's token grid."""
    height: int          # latent rows
    width: int           # latent columns
    patch_size: int = 2

    @property
    def rows(self) -> int:
        return (self.height + self.patch_size // 2) // self.patch_size

    @property
    def cols(self) -> int:
        return (self.width + self.patch_size // 2) // self.patch_size

    @property
    def tokens(self) -> int:
        return self.rows * self.cols


def fill_resize_and_crop(rows: int, cols: int, base: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(start, stop) of the token grid inside the square base grid (ComfyUI's get_fill_resize_and_crop)."""
    if rows / cols > 1.0:
        resize_h, resize_w = base, int(round(base / rows * cols))
    else:
        resize_w, resize_h = base, int(round(base / cols * rows))
    top = int(round((base - resize_h) / 2.0))
    left = int(round((base - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def axis_positions(start: float, stop: float, n: int) -> torch.Tensor:
    """n positions start + k (stop - start) / n, computed in float64 and rounded to float32."""
    return (torch.arange(n, dtype=torch.float64) * ((stop - start) / n) + start).to(torch.float32)


def _rope_1d(dim: int, pos: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(pos, freqs).float()
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rope_table(grid: TokenGrid, head_dim: int, base_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each float32 [tokens, head_dim], tokens in row-major order."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    base = base_size // 8 // grid.patch_size
    (top, left), (bottom, right) = fill_resize_and_crop(grid.rows, grid.cols, base)
    ys = axis_positions(top, bottom, grid.rows)
    xs = axis_positions(left, right, grid.cols)
    pos_w = xs.repeat(grid.rows)                  # row-major: width varies fastest
    pos_h = ys.repeat_interleave(grid.cols)
    cos_w, sin_w = _rope_1d(head_dim // 2, pos_w)
    cos_h, sin_h = _rope_1d(head_dim // 2, pos_h)
    return torch.cat([cos_w, cos_h], dim=1), torch.cat([sin_w, sin_h], dim=1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last dim."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., L, head_dim]; cos/sin [L, head_dim] (float32). Computed in float32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_pairs(xf) * sin).to(x.dtype)
