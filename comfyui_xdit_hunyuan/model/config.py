"""HunyuanDiT hyper-parameters, read off the weights.

Every released checkpoint is DiT-g/2 (depth 40, hidden 1408, 16 heads of 88). Tests build tiny
random models; all sizes below are therefore detected from tensor shapes, never assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Mapping


class NotHunyuanDiTError(ValueError):
    """The weights given are not a HunyuanDiT diffusion model (or are damaged)."""


@dataclass(frozen=True)
class HunyuanDiTConfig:
    depth: int = 40
    hidden_size: int = 1408
    num_heads: int = 16
    mlp_hidden: int = 6144
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8          # learn_sigma: the first in_channels are the v-prediction
    text_dim: int = 1024           # BERT states, and the width of the merged text tokens
    text_dim_t5: int = 2048        # mT5 states
    text_len: int = 77
    text_len_t5: int = 256
    pooler_heads: int = 8
    pooler_out: int = 1024
    size_cond: bool = False        # v1.0 / v1.1: image_meta_size embedding
    style_cond: bool = False       # v1.0 / v1.1: style embedding
    qk_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def version(self) -> str:
        """'v1.2' or 'v1.0/v1.1' -- what decides the beta schedule and the meta-size input."""
        return "v1.0/v1.1" if self.size_cond else "v1.2"

    @property
    def beta_end(self) -> float:
        """linear_end of the beta schedule ComfyUI uses for this version."""
        return 0.03 if self.size_cond else 0.018

    @property
    def extra_in_dim(self) -> int:
        dim = self.pooler_out
        if self.size_cond:
            dim += 6 * 256
        if self.style_cond:
            dim += self.hidden_size
        return dim

    def skip_source(self, block: int) -> int | None:
        """Index of the block whose output feeds block `block`'s skip input, or None."""
        return self.depth - 1 - block if block > self.depth // 2 else None

    def is_skip_source(self, block: int) -> bool:
        return block < self.depth // 2 - 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def full(cls, *, size_cond: bool = False) -> "HunyuanDiTConfig":
        """The released DiT-g/2 (v1.2 by default; size_cond=True gives v1.0/v1.1)."""
        return cls(size_cond=size_cond, style_cond=size_cond)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, object]) -> "HunyuanDiTConfig":
        """Detect the config from canonical (ComfyUI/original) parameter names and shapes.

        `sd` maps names to anything with a `.shape` (tensors, safetensors slices, meta tensors).
        """
        def shape(name):
            if name not in sd:
                raise NotHunyuanDiTError(
                    f"expected HunyuanDiT weight '{name}' but it is missing "
                    f"(found {len(sd)} tensors, e.g. {', '.join(sorted(sd)[:3])})")
            return tuple(sd[name].shape)

        hidden, in_ch, p, _ = shape("x_embedder.proj.weight")
        depth = 0
        while f"blocks.{depth}.norm1.weight" in sd:
            depth += 1
        if depth < 2:
            raise NotHunyuanDiTError(f"expected HunyuanDiT blocks 'blocks.N.*' but found {depth}")
        qk_norm = "blocks.0.attn1.q_norm.weight" in sd
        if qk_norm:
            head_dim = shape("blocks.0.attn1.q_norm.weight")[0]
            if hidden % head_dim:
                raise NotHunyuanDiTError(f"q_norm width {head_dim} does not divide hidden size {hidden}")
            heads = hidden // head_dim
        else:
            heads = 16
        mlp_hidden = shape("blocks.0.mlp.fc1.weight")[0]
        out_ch = shape("final_layer.linear.weight")[0] // (p * p)
        t5_hidden, t5_dim = shape("mlp_t5.0.weight")
        text_dim = shape("mlp_t5.2.weight")[0]
        pad_rows = shape("text_embedding_padding")[0]
        text_len_t5 = shape("pooler.positional_embedding")[0] - 1
        text_len = pad_rows - text_len_t5
        pooler_out = shape("pooler.c_proj.weight")[0]
        extra_in = shape("extra_embedder.0.weight")[1]
        style = "style_embedder.weight" in sd
        size = extra_in == pooler_out + 6 * 256 + (hidden if style else 0)
        cfg = cls(depth=depth, hidden_size=hidden, num_heads=heads, mlp_hidden=mlp_hidden, patch_size=p,
                  in_channels=in_ch, out_channels=out_ch, text_dim=text_dim, text_dim_t5=t5_dim,
                  text_len=text_len, text_len_t5=text_len_t5, pooler_out=pooler_out,
                  size_cond=size, style_cond=style, qk_norm=qk_norm)
        if cfg.extra_in_dim != extra_in:
            raise NotHunyuanDiTError(
                f"extra_embedder.0.weight takes {extra_in} inputs; a HunyuanDiT with pooler {pooler_out}, "
                f"style={style} takes {pooler_out} (v1.2) or {pooler_out + 6 * 256 + hidden} (v1.0/v1.1)")
        return cfg
