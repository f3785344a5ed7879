"""Small random HunyuanDiT models and conditioning: the demo's embedded default and the tests' fixtures.
No downloads: everything is generated from a seed."""
from __future__ import annotations

import torch

from .job import CondEntry
from .model import HunyuanDiT, HunyuanDiTConfig, init_random_

PRESETS = {
    # 16 heads like the real model, so every Ulysses degree of the real model is testable.
    "tiny": HunyuanDiTConfig(depth=8, hidden_size=128, num_heads=16, mlp_hidden=256, text_dim=64,
                             text_dim_t5=96, text_len=7, text_len_t5=9, pooler_out=48),
    "tiny-v1.1": HunyuanDiTConfig(depth=8, hidden_size=128, num_heads=16, mlp_hidden=256, text_dim=64,
                                  text_dim_t5=96, text_len=7, text_len_t5=9, pooler_out=48,
                                  size_cond=True, style_cond=True),
    # real text widths and lengths (what ComfyUI's text encoders produce), small transformer
    "small": HunyuanDiTConfig(depth=6, hidden_size=256, num_heads=16, mlp_hidden=1024),
    "full": HunyuanDiTConfig.full(),
    "full-v1.1": HunyuanDiTConfig.full(size_cond=True),
}


def preset(name: str) -> HunyuanDiTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_random_source(source) -> tuple[int, str] | None:
    """(seed, preset) of a weights source "random:<seed>:<preset>", None for any other source."""
    if not (isinstance(source, str) and source.startswith("random:")):
        return None
    parts = source.split(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise ValueError(f"random weights are written 'random:<seed>:<preset>', got '{source}'")
    preset(parts[2])
    return int(parts[1]), parts[2]


def random_model(cfg: HunyuanDiTConfig | str = "tiny", seed: int = 0, dtype=torch.float32,
                 device="cpu") -> HunyuanDiT:
    """A HunyuanDiT with seeded random weights, generated directly on `device` (a full-size model
    initialises in a fraction of a second on a GPU). The same seed gives the same weights on every
    device of one type (CPU numbers differ from CUDA numbers)."""
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    with torch.device("meta"):
        model = HunyuanDiT(cfg, dtype=torch.float32)
    model.to_empty(device=device)
    init_random_(model, seed)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def random_cond(cfg: HunyuanDiTConfig, seed: int = 0, batch: int = 1, bert_len: int | None = None,
                t5_len: int | None = None, used: float = 0.6, hw: tuple[int, int] = (1024, 1024)) -> CondEntry:
    """Conditioning shaped like ComfyUI's CLIPTextEncode output for HunyuanDiT (masks: the first
    `used` fraction of tokens are real, the rest padding)."""
    g = torch.Generator().manual_seed(seed)
    lb = bert_len or cfg.text_len
    lt = t5_len or cfg.text_len_t5
    mb = torch.zeros(batch, lb, dtype=torch.long)
    mb[:, : max(1, int(lb * used))] = 1
    mt = torch.zeros(batch, lt, dtype=torch.long)
    mt[:, : max(1, int(lt * used))] = 1
    h, w = hw
    return CondEntry(context=torch.randn(batch, lb, cfg.text_dim, generator=g),
                     text_embedding_mask=mb,
                     encoder_hidden_states_t5=torch.randn(batch, lt, cfg.text_dim_t5, generator=g),
                     text_embedding_mask_t5=mt,
                     image_meta_size=torch.tensor([[h, w, h, w, 0, 0]], dtype=torch.float32))
