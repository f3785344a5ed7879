"""ComfyUI entry point of the xDiT HunyuanDiT node pack.

ComfyUI imports this folder by its path; the pack root is put on sys.path so the engine
(`comfyui_xdit_hunyuan`) and the pool (`worker`) import absolutely, here and in the worker processes.
Nothing heavy and nothing from ComfyUI is imported until ComfyUI calls comfy_entrypoint, so importing the
pack outside ComfyUI works.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


async def comfy_entrypoint():
    """V3 registration: ComfyUI awaits this and asks the extension for its node classes."""
    from .nodes import XDiTHunyuanExtension  # needs comfy_api, present only inside ComfyUI
    return XDiTHunyuanExtension()


__all__ = ["comfy_entrypoint"]
