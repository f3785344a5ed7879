"""ComfyUI entry point of the xDiT HunyuanDiT node pack.

ComfyUI imports this folder by its path. The engine (`comfyui_xdit_hunyuan`, with the worker pool of the
`worker/` folder as `comfyui_xdit_hunyuan.worker`) is an installed package: `pip install -e` of this folder
(what the README's install step and install.py do) maps both to this clone, so nothing edits sys.path and
no other pack's modules can shadow ours. Nothing heavy and nothing from ComfyUI is imported until ComfyUI
calls comfy_entrypoint, so importing the pack outside ComfyUI works.
"""
import logging

NOT_INSTALLED = ("the xDiT HunyuanDiT node pack is not installed in ComfyUI's Python: run "
                 "`python -m pip install -e {folder}` with ComfyUI's Python, then restart ComfyUI")


async def comfy_entrypoint():
    """V3 registration: ComfyUI awaits this and asks the extension for its node classes."""
    try:
        import comfyui_xdit_hunyuan.worker.client as pool
    except ImportError as e:
        import os
        msg = NOT_INSTALLED.format(folder=os.path.dirname(os.path.abspath(__file__)))
        logging.getLogger("xdit_hunyuan").error("%s (%s)", msg, e)
        raise ImportError(msg) from e
    from .nodes import XDiTHunyuanExtension  # needs comfy_api, present only inside ComfyUI
    pool.close_pools_on_sigterm()             # ComfyUI loads packs on its main thread
    try:                                      # the first image's workers start now (GPU machines)
        from comfyui_xdit_hunyuan.adapter import start_spare_workers
        start_spare_workers()
    except Exception as e:  # noqa: BLE001 - ComfyUI starts all the same; the first pool starts cold
        logging.getLogger("xdit_hunyuan").warning("xDiT: no spare workers (%s)", e)
    return XDiTHunyuanExtension()


__all__ = ["comfy_entrypoint"]
