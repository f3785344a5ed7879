"""The weights a command samples with, as the pool's job names them (job.WeightsRef): a checkpoint file or
folder, identified by its files' names, sizes and modification times (so an edited file is reloaded), or
the built-in random weights "random:<seed>:<preset>".
"""
from __future__ import annotations

from pathlib import Path


def checkpoint_identity(path: Path) -> str:
    """Changes whenever the file (or a diffusers folder's weights) changes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return f"file:{path.resolve()}|{stamp}"


def checkpoint_ref(path: Path):
    from comfyui_xdit_hunyuan.job import WeightsRef
    return WeightsRef(checkpoint_identity(path), str(path.resolve()))


def random_ref(seed: int, preset: str):
    from comfyui_xdit_hunyuan.job import WeightsRef
    source = f"random:{seed}:{preset}"
    return WeightsRef(source, source)


def param_count(arch) -> int:
    """Parameters of a HunyuanDiT of architecture `arch` (model.HunyuanDiTConfig), counted on the meta device."""
    from comfyui_xdit_hunyuan.model import HunyuanDiT
    return sum(p.numel() for p in HunyuanDiT(arch, device="meta").parameters())
