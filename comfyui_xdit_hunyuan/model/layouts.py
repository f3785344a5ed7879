"""Parameter-name layouts of HunyuanDiT weights and the maps between them.

Canonical (this package's model): the ComfyUI / original-release names (`blocks.3.attn1.Wqkv.weight`).
Also handled:
- ComfyUI full checkpoint: canonical names under `model.diffusion_model.` (text encoders under
  `text_encoders.`, VAE under `vae.`: ignored);
- original `.pt`: canonical names, possibly under `ema.` / `module.` wrappers;
- diffusers `HunyuanDiT2DModel`: q/k/v split, renamed norms, (scale, shift) final modulation.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from .config import HunyuanDiTConfig

COMFY_PREFIX = "model.diffusion_model."
_WRAPPERS = ("ema.", "module.", "model.")

# canonical suffix in a block -> diffusers suffix (one-to-one renames)
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.norm.weight", "norm1.bias": "norm1.norm.bias",
    "default_modulation.1.weight": "norm1.linear.weight", "default_modulation.1.bias": "norm1.linear.bias",
    "attn1.q_norm.weight": "attn1.norm_q.weight", "attn1.q_norm.bias": "attn1.norm_q.bias",
    "attn1.k_norm.weight": "attn1.norm_k.weight", "attn1.k_norm.bias": "attn1.norm_k.bias",
    "attn1.out_proj.weight": "attn1.to_out.0.weight", "attn1.out_proj.bias": "attn1.to_out.0.bias",
    "norm3.weight": "norm2.weight", "norm3.bias": "norm2.bias",
    "attn2.q_proj.weight": "attn2.to_q.weight", "attn2.q_proj.bias": "attn2.to_q.bias",
    "attn2.q_norm.weight": "attn2.norm_q.weight", "attn2.q_norm.bias": "attn2.norm_q.bias",
    "attn2.k_norm.weight": "attn2.norm_k.weight", "attn2.k_norm.bias": "attn2.norm_k.bias",
    "attn2.out_proj.weight": "attn2.to_out.0.weight", "attn2.out_proj.bias": "attn2.to_out.0.bias",
    "norm2.weight": "norm3.weight", "norm2.bias": "norm3.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight", "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight", "mlp.fc2.bias": "ff.net.2.bias",
    "skip_norm.weight": "skip_norm.weight", "skip_norm.bias": "skip_norm.bias",
    "skip_linear.weight": "skip_linear.weight", "skip_linear.bias": "skip_linear.bias",
}
# canonical fused tensor in a block -> diffusers parts (concatenated along dim 0)
_BLOCK_FUSED = {
    "attn1.Wqkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn2.kv_proj": ("attn2.to_k", "attn2.to_v"),
}
_TOP_RENAMES = {
    "mlp_t5.0": "text_embedder.linear_1", "mlp_t5.2": "text_embedder.linear_2",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
    "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
    "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
    "pooler.k_proj": "time_extra_emb.pooler.k_proj", "pooler.q_proj": "time_extra_emb.pooler.q_proj",
    "pooler.v_proj": "time_extra_emb.pooler.v_proj", "pooler.c_proj": "time_extra_emb.pooler.c_proj",
    "final_layer.linear": "proj_out",
}
_TOP_PARAMS = {
    "text_embedding_padding": "text_embedding_padding",
    "pooler.positional_embedding": "time_extra_emb.pooler.positional_embedding",
    "style_embedder.weight": "time_extra_emb.style_embedder.weight",
}
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # halves swapped

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith(("pos_embed.proj.", "time_extra_emb.")) for k in keys)


def diffusers_to_canonical(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a diffusers HunyuanDiT2DModel state dict onto canonical names (merging q/k/v and k/v)."""
    out: dict[str, torch.Tensor] = {}
    inv_top = {v: k for k, v in _TOP_RENAMES.items()}
    inv_params = {v: k for k, v in _TOP_PARAMS.items()}
    inv_block = {v: k for k, v in _BLOCK_RENAMES.items()}
    fused_parts: dict[str, dict[str, torch.Tensor]] = {}
    part_of = {}
    for fused, parts in _BLOCK_FUSED.items():
        for j, part in enumerate(parts):
            part_of[part] = (fused, j, len(parts))
    for key, t in sd.items():
        if key in inv_params:
            out[inv_params[key]] = t
            continue
        base, _, leaf = key.rpartition(".")
        if base == _FINAL_MOD[1]:
            out[f"{_FINAL_MOD[0]}.{leaf}"] = _swap_halves(t)
            continue
        if base in inv_top:
            out[f"{inv_top[base]}.{leaf}"] = t
            continue
        m = _BLOCK_RE.match(key)
        if m:
            i, rest = m.group(1), m.group(2)
            if rest in inv_block:
                out[f"blocks.{i}.{inv_block[rest]}"] = t
                continue
            rbase, _, rleaf = rest.rpartition(".")
            if rbase in part_of:
                fused, j, n = part_of[rbase]
                fused_parts.setdefault(f"blocks.{i}.{fused}.{rleaf}", {})[j] = (t, n)
                continue
        out[key] = t  # unknown: kept, so that validation can name it
    for key, parts in fused_parts.items():
        n = next(iter(parts.values()))[1]
        if len(parts) != n:
            missing = sorted(set(range(n)) - set(parts))
            raise KeyError(f"diffusers weights for '{key}' lack part(s) {missing} of q/k/v")
        out[key] = torch.cat([parts[j][0] for j in range(n)], dim=0)
    return out


def canonical_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `diffusers_to_canonical` (tests and `save` use it to write diffusers files)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key in _TOP_PARAMS:
            out[_TOP_PARAMS[key]] = t
            continue
        base, _, leaf = key.rpartition(".")
        if base == _FINAL_MOD[0]:
            out[f"{_FINAL_MOD[1]}.{leaf}"] = _swap_halves(t)
            continue
        if base in _TOP_RENAMES:
            out[f"{_TOP_RENAMES[base]}.{leaf}"] = t
            continue
        m = _BLOCK_RE.match(key)
        if m:
            i, rest = m.group(1), m.group(2)
            if rest in _BLOCK_RENAMES:
                out[f"blocks.{i}.{_BLOCK_RENAMES[rest]}"] = t
                continue
            rbase, _, rleaf = rest.rpartition(".")
            if rbase in _BLOCK_FUSED:
                parts = _BLOCK_FUSED[rbase]
                for part, chunk in zip(parts, t.chunk(len(parts), dim=0)):
                    out[f"blocks.{i}.{part}.{rleaf}"] = chunk.contiguous()
                continue
        raise KeyError(f"no diffusers name for canonical weight '{key}'")
    return out


def diffusers_config(cfg: HunyuanDiTConfig) -> dict:
    """The `HunyuanDiT2DModel` config (config.json) of a model with this shape."""
    ratio = 4.3637 if (cfg.hidden_size, cfg.mlp_hidden) == (1408, 6144) else cfg.mlp_hidden / cfg.hidden_size
    if int(cfg.hidden_size * ratio) != cfg.mlp_hidden:
        raise ValueError(f"mlp width {cfg.mlp_hidden} is not int(hidden * ratio) for any simple ratio")
    return dict(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
        patch_size=cfg.patch_size, activation_fn="gelu-approximate", sample_size=128,
        hidden_size=cfg.hidden_size, num_layers=cfg.depth, mlp_ratio=ratio,
        learn_sigma=cfg.out_channels == 2 * cfg.in_channels, cross_attention_dim=cfg.text_dim,
        norm_type="layer_norm", cross_attention_dim_t5=cfg.text_dim_t5, pooled_projection_dim=cfg.pooler_out,
        text_len=cfg.text_len, text_len_t5=cfg.text_len_t5,
        use_style_cond_and_image_meta_size=cfg.size_cond,
    )
