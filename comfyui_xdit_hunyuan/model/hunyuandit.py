"""HunyuanDiT (v1.0, v1.1, v1.2; DiT-g/2 and any smaller shape), one parameter naming: ComfyUI's / the
original release's. The forward follows ComfyUI's `comfy.ldm.hydit.models.HunYuanDiT` keyword for
keyword, so CONDITIONING maps 1:1.

Hooks for the parallel engine, and nothing else parallel-specific:
- self-attention calls `attention(q, k, v, block_index)` on post-norm, post-RoPE head-first tensors
  (`SelfAttention` protocol below); the default is local SDPA. With the fused kernels, an attention that
  communicates may take the fused QKV projection instead (`attend_projection(y, layer, block_index)`) and
  prepare q, k, v itself with `layer.qkv_from` after its exchange (Ulysses: on its heads);
- `run_blocks` runs any contiguous block range on any token slice, taking and returning skip
  activations by block index, so stages and sequence slices compose.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention as attention_kernel, pads_head_dim
from .config import HunyuanDiTConfig
from . import kernels
from .kernels import add_layer_norm, cat_layer_norm, norm_rope_pad, pad_head_dim, padded_head_dim, softmax_rescale
from .rope import TokenGrid, apply_rope, rope_table


class SelfAttention(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> torch.Tensor:
        """q, k, v: [B, H, L_local, d] (RoPE applied with global positions) -> [B, H, L_local, d]."""


class LocalAttention:
    """Plain attention over the tokens given (serial runs, and cross-checks)."""

    traceable = True          # torch.compile may trace it into the block graphs

    def __init__(self, backend: str = "sdpa"):
        self.backend = backend

    def __call__(self, q, k, v, block):
        return attention_kernel(q, k, v, self.backend)


def layer_norm32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm in x's dtype; the kernels accumulate the statistics in float32 for half types (as the
    original computes them), and the affine weights are cast to x's dtype as ComfyUI does."""
    w = norm.weight.to(x.dtype) if norm.weight is not None else None
    b = norm.bias.to(x.dtype) if norm.bias is not None else None
    return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)


def silu32(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x.float()).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first (diffusers' flip_sin_to_cos=True), float32 [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@dataclass(frozen=True)
class ComputeOptions:
    """How the blocks compute, chosen by whoever hosts the model for its device (the runtime, from
    config.PoolConfig); given to HunyuanDiT.configure. Results differ by floating-point rounding only.

    fused_kernels: the Triton kernels of model/kernels.py (q/k norm + RoPE + head padding in one pass, the skip
    merge's norm without the concatenation, residual adds fused with the next norm); needs Triton.
    fused_gelu: fc1 + tanh-GELU as one GEMM with a GELU epilogue (cuBLASLt through torch._addmm_activation,
    which torch.compile keeps as one call): the 4.4x-wide hidden activation is written once instead of
    written, read and written again. CUDA only (the CPU kernel's epilogue is the erf GELU).
    cross_attention: the cross-attention kernel (model.attention.BACKENDS)."""
    fused_kernels: bool = False
    fused_gelu: bool = False
    cross_attention: str = "sdpa"


PLAIN = ComputeOptions()


class Mlp(nn.Module):
    options = PLAIN                # HunyuanDiT.configure gives every layer the model's options

    def __init__(self, dim: int, hidden: int, **kw):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **kw)
        self.fc2 = nn.Linear(hidden, dim, **kw)

    def forward(self, x):
        if self.options.fused_gelu:
            h = torch._addmm_activation(self.fc1.bias, x.reshape(-1, x.shape[-1]), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _OutProjection:
    """Output projection of head-first attention outputs, also of head dims zero-padded by the fused
    kernels (the weight then has matching zero columns, made once by `pad_out_weight`)."""

    heads: int
    head_dim: int
    out_proj: nn.Linear
    options = PLAIN
    out_weight_padded: torch.Tensor | None = None

    def pad_out_weight(self, pad_to: int | None) -> None:
        """The zero-padded copy of out_proj's weight for head dim pad_to (None: drop it). Refreshed in place
        when it exists, so code that holds it (compiled graphs, CUDA graphs) sees new weights."""
        if pad_to is None or pad_to == self.head_dim:
            self.out_weight_padded = None
            return
        w = self.out_proj.weight.detach()
        padded = self.out_weight_padded
        if padded is None or padded.shape != (w.shape[0], self.heads * pad_to) or padded.dtype != w.dtype \
                or padded.device != w.device:
            padded = w.new_zeros(w.shape[0], self.heads * pad_to)
        padded.view(w.shape[0], self.heads, pad_to)[..., : self.head_dim] = w.view(w.shape[0], self.heads,
                                                                                   self.head_dim)
        self.out_weight_padded = padded

    def out(self, o):
        b, _, n, d = o.shape
        o = o.transpose(1, 2).reshape(b, n, -1)       # a view when o is token-major (the fused path)
        if d != self.head_dim:
            return F.linear(o, self.out_weight_padded, self.out_proj.bias)
        return self.out_proj(o)


class SelfAttentionLayer(_OutProjection, nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, **kw):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.Wqkv = nn.Linear(dim, 3 * dim, **kw)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6, **kw) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6, **kw) if qk_norm else None
        self.out_proj = nn.Linear(dim, dim, **kw)

    def qkv(self, x, rope, pad_to: int | None = None):
        """Head-first q, k, v [b, h, n, d], normalised, RoPE on q and k. With the fused kernels and
        pad_to (attention traced with the block), `qkv_from` the projection."""
        b, n, _ = x.shape
        if self.options.fused_kernels and pad_to is not None:
            return self.qkv_from(self.Wqkv(x), rope, pad_to)
        q, k, v = self.Wqkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = layer_norm32(q, self.q_norm), layer_norm32(k, self.k_norm)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def qkv_from(self, y, rope, pad_to: int, heads: int | None = None, seq_first: bool = False):
        """The fused kernels' q, k, v of `heads` heads (default all) from a QKV projection y [b, n, 3*heads*d]
        (q, k, v columns in turn; seq_first: [n, b, 3*heads*d]), RoPE rows `rope` of its n tokens: one kernel
        per tensor, head-first [b, heads, n, pad_to] over token-major storage, the head dim padded to pad_to
        and q scaled so that attention's default softmax scale 1/sqrt(pad_to) acts as 1/sqrt(d)."""
        h, d = heads or self.heads, self.head_dim
        return (norm_rope_pad(y, 0, h, d, self.q_norm, rope, pad_to, softmax_rescale(d, pad_to), seq_first=seq_first),
                norm_rope_pad(y, h * d, h, d, self.k_norm, rope, pad_to, seq_first=seq_first),
                norm_rope_pad(y, 2 * h * d, h, d, None, None, pad_to, seq_first=seq_first))

    def forward(self, x, rope, attention: SelfAttention, block: int):
        return self.out(attention(*self.qkv(x, rope), block))


class CrossAttentionLayer(_OutProjection, nn.Module):
    def __init__(self, dim: int, text_dim: int, heads: int, qk_norm: bool, **kw):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, **kw)
        self.kv_proj = nn.Linear(text_dim, 2 * dim, **kw)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6, **kw) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6, **kw) if qk_norm else None
        self.out_proj = nn.Linear(dim, dim, **kw)

    def text_kv(self, text, pad_to: int | None = None):
        """Keys and values of the text tokens: the same for every image token and every step. pad_to: the
        head dim zero-padded (fused kernels with padded attention; forward then pads q to match)."""
        b, s, _ = text.shape
        k, v = self.kv_proj(text).view(b, s, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.k_norm is not None:
            k = layer_norm32(k, self.k_norm)
        if pad_to:
            k, v = pad_head_dim(k, pad_to), pad_head_dim(v, pad_to)
        return k.contiguous(), v.contiguous()     # one layout for every job (compiled code guards on it)

    def forward(self, x, text_kv, rope, backend: str):
        b, n, _ = x.shape
        if self.options.fused_kernels:             # q normed, rotated and padded to the text K/V in one pass
            dp = text_kv[0].shape[-1]
            q = norm_rope_pad(self.q_proj(x), 0, self.heads, self.head_dim, self.q_norm, rope, dp,
                              softmax_rescale(self.head_dim, dp))
            return self.out(attention_kernel(q, *text_kv, backend))
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = layer_norm32(q, self.q_norm)
        q = apply_rope(q, *rope)                                  # RoPE on the image query only
        out = attention_kernel(q, *text_kv, backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class HunyuanDiTBlock(nn.Module):
    options = PLAIN

    def __init__(self, cfg: HunyuanDiTConfig, skip: bool, **kw):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=1e-6, **kw)
        self.attn1 = SelfAttentionLayer(d, cfg.num_heads, cfg.qk_norm, **kw)
        self.norm2 = nn.LayerNorm(d, eps=1e-6, **kw)          # before the FFN (original naming)
        self.mlp = Mlp(d, cfg.mlp_hidden, **kw)
        self.default_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, d, **kw))
        self.attn2 = CrossAttentionLayer(d, cfg.text_dim, cfg.num_heads, cfg.qk_norm, **kw)
        self.norm3 = nn.LayerNorm(d, eps=1e-6, **kw)          # before the cross-attention
        if skip:
            self.skip_norm = nn.LayerNorm(2 * d, eps=1e-6, **kw)
            self.skip_linear = nn.Linear(2 * d, d, **kw)
        else:
            self.skip_norm = self.skip_linear = None

    def forward(self, x, shift, text_kv, rope, skip, attention: SelfAttention, index: int, cross_backend: str):
        pad_to = None      # attention traced with the block: the fused kernels may pad its head dim
        if getattr(attention, "traceable", False):
            d = self.attn1.head_dim
            pad_to = padded_head_dim(d) if pads_head_dim(getattr(attention, "backend", "")) else d
        x, q, k, v = self.before_attention(x, shift, rope, skip, pad_to)
        return self.after_attention(x, attention(q, k, v, index), text_kv, rope, cross_backend)

    def before_attention(self, x, shift, rope, skip, pad_to: int | None = None, projection: bool = False):
        """Skip merge, norm, shift, fused QKV, q/k norms and RoPE -> (x, q, k, v); projection: only up to the
        fused QKV projection -> (x, y), for an attention that prepares q, k, v itself (`attend_projection`)."""
        if self.skip_linear is not None:
            if self.options.fused_kernels:
                x = self.skip_linear(cat_layer_norm(x, skip, self.skip_norm))
            else:
                x = self.skip_linear(layer_norm32(torch.cat([x, skip], dim=-1), self.skip_norm))
        h = layer_norm32(x, self.norm1) + shift
        if projection:
            return x, self.attn1.Wqkv(h)
        return (x, *self.attn1.qkv(h, rope, pad_to))

    def after_attention(self, x, o, text_kv, rope, cross_backend: str):
        """Self-attention output projection and residual, cross-attention, MLP."""
        if self.options.fused_kernels:  # each residual add and the norm after it in one pass
            x, h = add_layer_norm(x, self.attn1.out(o), self.norm3)
            x, h = add_layer_norm(x, self.attn2(h, text_kv, rope, cross_backend), self.norm2)
            return x + self.mlp(h)
        x = x + self.attn1.out(o)
        x = x + self.attn2(layer_norm32(x, self.norm3), text_kv, rope, cross_backend)
        return x + self.mlp(layer_norm32(x, self.norm2))


class AttentionPool(nn.Module):
    """Pools the raw mT5 states: a mean token attends (8 heads) over itself and the tokens."""

    def __init__(self, seq: int, dim: int, heads: int, out_dim: int, **kw):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(seq + 1, dim, **kw))
        self.k_proj = nn.Linear(dim, dim, **kw)
        self.q_proj = nn.Linear(dim, dim, **kw)
        self.v_proj = nn.Linear(dim, dim, **kw)
        self.c_proj = nn.Linear(dim, out_dim, **kw)
        self.heads = heads

    def forward(self, x):
        x = x[:, : self.positional_embedding.shape[0] - 1]          # ComfyUI: longer prompts pool 256
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        b, n, c = x.shape
        hd = c // self.heads
        q = self.q_proj(x[:, :1]).view(b, 1, self.heads, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.heads, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c)
        return self.c_proj(out)


class FinalLayer(nn.Module):
    def __init__(self, d: int, patch: int, out_ch: int, **kw):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False, **kw)
        self.linear = nn.Linear(d, patch * patch * out_ch, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d, **kw))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = layer_norm32(x, self.norm_final) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self.linear(x)


class PatchEmbed(nn.Module):
    def __init__(self, in_ch: int, d: int, patch: int, **kw):
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(in_ch, d, kernel_size=patch, stride=patch, **kw)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass
class TextConditions:
    """Everything that depends on the conditioning but not on the timestep: computed once per job."""
    text: torch.Tensor                 # [B, L_text, text_dim] merged BERT ++ projected mT5 tokens
    extra: torch.Tensor                # [B, hidden] extra_embedder(pooled mT5 ++ meta size ++ style)
    text_kv: list = field(default_factory=list)   # per block: cross-attention (k, v), filled lazily


@dataclass
class Conditions:
    """Conditioning of one model evaluation: the timestep vector c plus the text."""
    c: torch.Tensor                    # [B, hidden]
    text: TextConditions
    shifts: list = field(default_factory=list)    # per block [B, 1, hidden], filled lazily


class HunyuanDiT(nn.Module):
    def __init__(self, cfg: HunyuanDiTConfig, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.cfg = cfg
        d = cfg.hidden_size
        self.mlp_t5 = nn.Sequential(nn.Linear(cfg.text_dim_t5, cfg.text_dim_t5 * 4, **kw), nn.SiLU(),
                                    nn.Linear(cfg.text_dim_t5 * 4, cfg.text_dim, **kw))
        self.text_embedding_padding = nn.Parameter(torch.empty(cfg.text_len + cfg.text_len_t5, cfg.text_dim, **kw))
        self.pooler = AttentionPool(cfg.text_len_t5, cfg.text_dim_t5, cfg.pooler_heads, cfg.pooler_out, **kw)
        if cfg.style_cond:
            self.style_embedder = nn.Embedding(1, d, **kw)
        self.x_embedder = PatchEmbed(cfg.in_channels, d, cfg.patch_size, **kw)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, d, **kw), nn.SiLU(), nn.Linear(d, d, **kw))
        self.extra_embedder = nn.Sequential(nn.Linear(cfg.extra_in_dim, d * 4, **kw), nn.SiLU(),
                                            nn.Linear(d * 4, d, **kw))
        self.blocks = nn.ModuleList(HunyuanDiTBlock(cfg, skip=i > cfg.depth // 2, **kw) for i in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels, **kw)
        self.options = PLAIN
        self._rope_cache: dict = {}
        # a block's two halves around self-attention, run one after the other where the attention
        # communicates (compile_blocks compiles them)
        self._halves = (HunyuanDiTBlock.before_attention, HunyuanDiTBlock.after_attention)
        self._any_size = False          # compiled blocks with a symbolic token count (compile_blocks)

    # ---------------------------------------------------------------- pieces the engine composes
    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    def rope(self, grid: TokenGrid) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) float32 [tokens, head_dim] on the model's device, cached per grid."""
        key = (grid, self.device)
        if key not in self._rope_cache:
            cos, sin = rope_table(grid, self.cfg.head_dim)
            self._rope_cache = {key: (cos.to(self.device), sin.to(self.device))}
        return self._rope_cache[key]

    def encode_text(self, context, text_embedding_mask, encoder_hidden_states_t5, text_embedding_mask_t5,
                    image_meta_size=None, style=None, *, batch: int | None = None) -> TextConditions:
        """Text tokens and the timestep-free part of c. Tensors with batch 1 are repeated to `batch`
        (default: the largest batch among the inputs), as ComfyUI repeats conds to the latent batch."""
        cfg, dt = self.cfg, self.dtype
        b = batch or max(context.shape[0], encoder_hidden_states_t5.shape[0])

        def rep(v, dtype=None):
            v = v.to(self.device, dtype) if dtype is not None else v.to(self.device)
            return v.expand(b, *v.shape[1:]) if v.shape[0] == 1 and b > 1 else v

        context, t5 = rep(context, dt), rep(encoder_hidden_states_t5, dt)
        mask = rep(text_embedding_mask).bool()
        mask_t5 = rep(text_embedding_mask_t5).bool()

        t5_tokens = self.mlp_t5[2](silu32(self.mlp_t5[0](t5)))
        pad = self.text_embedding_padding.to(dt)
        # Masked positions among the LAST text_len / text_len_t5 tokens take the learned padding.
        bert = context.clone()
        n = cfg.text_len
        bert[:, -n:] = torch.where(mask[:, -n:, None], bert[:, -n:], pad[:n][-bert.shape[1]:])
        n5 = cfg.text_len_t5
        t5_tokens[:, -n5:] = torch.where(mask_t5[:, -n5:, None], t5_tokens[:, -n5:], pad[n:][-t5_tokens.shape[1]:])
        text = torch.cat([bert, t5_tokens], dim=1)

        extra = [self.pooler(t5)]
        if cfg.size_cond:
            if image_meta_size is None:
                raise ValueError("this HunyuanDiT (v1.0/v1.1) needs image_meta_size "
                                 "[[height, width, target height, target width, crop top, crop left]]")
            meta = rep(image_meta_size.float().reshape(-1, 6))
            extra.append(timestep_embedding(meta.reshape(-1), 256).to(dt).reshape(b, 6 * 256))
        if cfg.style_cond:
            st = torch.zeros(b, dtype=torch.long, device=self.device) if style is None else rep(style.reshape(-1)).long()
            extra.append(self.style_embedder(st).to(dt))
        e = self.extra_embedder
        return TextConditions(text=text, extra=e[2](silu32(e[0](torch.cat(extra, dim=1)))))

    def conditions(self, text: TextConditions, t: torch.Tensor) -> Conditions:
        """Conditioning of one evaluation at timestep(s) t (scalar or [B])."""
        b = text.extra.shape[0]
        t = t.to(self.device).reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        temb = self.t_embedder.mlp[2](silu32(self.t_embedder.mlp[0](timestep_embedding(t, 256).to(self.dtype))))
        return Conditions(c=temb + text.extra, text=text)

    def block_inputs(self, cond: Conditions, block: int):
        """(shift, text_kv) of one block: the shift once per evaluation, the text K/V once per job."""
        if not cond.shifts:
            cond.shifts = [None] * self.cfg.depth
        if cond.shifts[block] is None:
            cond.shifts[block] = self.blocks[block].default_modulation[1](silu32(cond.c)).unsqueeze(1)
        return cond.shifts[block], self._text_kv(cond.text, block)

    def _text_kv(self, text: TextConditions, block: int):
        """One block's cross-attention K/V of `text`, computed at first use."""
        if not text.text_kv:
            text.text_kv = [None] * self.cfg.depth
        if text.text_kv[block] is None:
            attn2 = self.blocks[block].attn2
            pad_to = (padded_head_dim(attn2.head_dim)
                      if self.options.fused_kernels and self.options.cross_attention == "padded" else None)
            text.text_kv[block] = attn2.text_kv(text.text, pad_to)
        return text.text_kv[block]

    def fill_text_kv(self, text: TextConditions) -> None:
        """Compute every block's cross-attention K/V of `text` now (block_inputs computes them lazily)."""
        for i in range(self.cfg.depth):
            self._text_kv(text, i)

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        """Latent [B, C, H, W] -> tokens [B, rows*cols, hidden]; odd sizes padded circularly (ComfyUI)."""
        p = self.cfg.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="circular")
        return self.x_embedder(x.to(self.dtype))

    def run_blocks(self, x: torch.Tensor, cond: Conditions, rope, blocks: Iterable[int],
                   skips: dict[int, torch.Tensor], attention: SelfAttention) -> torch.Tensor:
        """Run `blocks` (ascending indices) on tokens x. Skip inputs are popped from `skips` by the
        index of the block that produced them; skip outputs are stored there under this block's index."""
        whole = getattr(attention, "traceable", False)
        # the fused kernels after a communicating attention's exchange (Ulysses: on its heads)
        projected = not whole and self.options.fused_kernels and hasattr(attention, "attend_projection")
        cross = self.options.cross_attention
        if self._any_size:
            _token_dim_dynamic(x, 1, *rope)
            for t in skips.values():
                _token_dim_dynamic(t, 1)
        for i in blocks:
            src = self.cfg.skip_source(i)
            skip = skips.pop(src) if src is not None else None
            shift, text_kv = self.block_inputs(cond, i)
            if whole:       # attention traced into the block (in its compiled graph when compiled)
                x = self.blocks[i](x, shift, text_kv, rope, skip, attention, i, cross)
            else:           # the halves around an attention that communicates (no graph break inside)
                before, after = self._halves
                if projected:
                    x, y = before(self.blocks[i], x, shift, rope, skip, projection=True)
                    o = attention.attend_projection(y, self.blocks[i].attn1, i)
                else:
                    x, q, k, v = before(self.blocks[i], x, shift, rope, skip)
                    o = attention(q, k, v, i)
                if self._any_size:
                    _token_dim_dynamic(o, 2)
                x = after(self.blocks[i], x, o, text_kv, rope, cross)
            if self.cfg.is_skip_source(i):
                skips[i] = x
        return x

    def final_tokens(self, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """Final layer on tokens -> [B, L, p*p*C_out]."""
        return self.final_layer(x, cond.c)

    def unpatchify(self, tokens: torch.Tensor, grid: TokenGrid, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens [B, n_rows*cols, p*p*C] of token rows `rows` (default all) -> v-prediction
        [B, C_in, latent rows, W], cropped to the latent size, float32."""
        p, c = self.cfg.patch_size, self.cfg.out_channels
        r0, r1 = rows if rows is not None else (0, grid.rows)
        b = tokens.shape[0]
        x = tokens.reshape(b, r1 - r0, grid.cols, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, (r1 - r0) * p, grid.cols * p)
        x = x[:, : self.cfg.in_channels, : min(grid.height, r1 * p) - r0 * p, : grid.width]
        return x.float()

    def configure(self, options: ComputeOptions) -> ComputeOptions:
        """How the blocks compute from now on (ComputeOptions); returns what was applied: the fused kernels
        only where Triton runs. Every layer shares the one options value."""
        if options.fused_kernels and not kernels.available(self.device):
            options = replace(options, fused_kernels=False)
        if options.fused_gelu and self.device.type != "cuda":
            options = replace(options, fused_gelu=False)
        self.options = options
        for blk in self.blocks:
            blk.options = blk.attn1.options = blk.attn2.options = blk.mlp.options = options
        self.refresh_derived()
        return options

    def refresh_derived(self) -> None:
        """Tensors derived from the weights (the zero-padded output projections of the fused kernels), in
        place: call after the weights change."""
        fused = self.options.fused_kernels
        for blk in self.blocks:
            for attn in (blk.attn1, blk.attn2):
                attn.pad_out_weight(padded_head_dim(attn.head_dim) if fused else None)

    def compile_blocks(self, mode: str | None = None, *, any_size: bool = True) -> None:
        """Regional torch.compile (blocks share the compiled code, so the first run stays short):
        - whole blocks, for attention that traces (one GPU, CFG parallel): attention fuses with its
          neighbours;
        - the two halves of a block around self-attention, for attention that communicates (Ulysses, Ring,
          PipeFusion's K/V buffer): called one after the other with the attention in between, so there is no
          graph break inside a block and no graph per block index. Both compile lazily, at first use.
        `mode`: torch.compile's mode (config.PoolConfig.compile_mode; None is its default). `any_size`: the token
        count is symbolic in the compiled code, so a new image size runs at once instead of compiling again
        (config.PoolConfig.compile_any_size)."""
        import torch._dynamo
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        # a machine that cannot compile (no Triton, no C compiler) runs the blocks eagerly, with dynamo's
        # warning in the worker's log, instead of failing every job
        torch._dynamo.config.suppress_errors = True
        dynamic = None if any_size else False          # None: the dimensions marked below stay symbolic
        for blk in self.blocks:
            blk.compile(dynamic=dynamic, mode=mode)
        self._halves = (torch.compile(HunyuanDiTBlock.before_attention, dynamic=dynamic, mode=mode),
                        torch.compile(HunyuanDiTBlock.after_attention, dynamic=dynamic, mode=mode))
        self._any_size = any_size

    # ---------------------------------------------------------------- the whole model, serially
    def forward(self, x, t, context, text_embedding_mask, encoder_hidden_states_t5, text_embedding_mask_t5,
                image_meta_size=None, style=None, *, attention: SelfAttention | None = None) -> torch.Tensor:
        """v-prediction [B, in_channels, H, W] (float32) for latent x [B, in_channels, H, W]."""
        text = self.encode_text(context, text_embedding_mask, encoder_hidden_states_t5, text_embedding_mask_t5,
                                image_meta_size, style, batch=x.shape[0])
        cond = self.conditions(text, t)
        grid = TokenGrid(x.shape[-2], x.shape[-1], self.cfg.patch_size)
        tokens = self.run_blocks(self.embed_image(x), cond, self.rope(grid), range(self.cfg.depth), {},
                                 attention or LocalAttention())
        return self.unpatchify(self.final_tokens(tokens, cond), grid)


def _token_dim_dynamic(t: torch.Tensor, dim: int, *more: torch.Tensor) -> None:
    """Mark the token dimension (dim of t; dim 0 of the RoPE tables in `more`) as symbolic for compiled code."""
    torch._dynamo.maybe_mark_dynamic(t, dim)
    for table in more:
        torch._dynamo.maybe_mark_dynamic(table, 0)


def init_random_(model: HunyuanDiT, seed: int = 0, std: float = 0.02) -> HunyuanDiT:
    """Fill every parameter with seeded random values on its own device (tests, demo, benchmark)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                val = 1.0 + 0.1 * r
            elif p.ndim == 1:
                val = std * r
            else:
                val = r / math.sqrt(p[0].numel())
            p.copy_(val.to(p.dtype))
    return model
