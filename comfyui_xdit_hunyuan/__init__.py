"""HunyuanDiT with xDiT-style hybrid parallelism: the engine of the ComfyUI node pack, importable
without ComfyUI. `load_model(path_or_state_dict)` reads any HunyuanDiT checkpoint layout."""
from .model import HunyuanDiT, HunyuanDiTConfig, load_model, load_state_dict

__all__ = ["HunyuanDiT", "HunyuanDiTConfig", "load_model", "load_state_dict"]
