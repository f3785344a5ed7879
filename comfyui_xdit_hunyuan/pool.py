"""The pack's worker pool package (`worker/` beside this package), found robustly.

ComfyUI loads many custom-node packs into one process; another pack may already have imported a top-level
module called `worker`. Then this pack's pool is loaded under a private name instead of being shadowed.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

WORKER_DIR = Path(__file__).resolve().parent.parent / "worker"
_PRIVATE = "_comfyui_xdit_hunyuan_worker"


def _ours(module) -> bool:
    f = getattr(module, "__file__", None)
    return f is not None and Path(f).resolve().parent == WORKER_DIR


def worker_package():
    """The `worker` package of this pack (PoolClient, get_pool, shutdown_all; submodule `client`)."""
    mod = sys.modules.get("worker")
    if mod is None:
        try:
            mod = importlib.import_module("worker")
        except ImportError:
            mod = None
    if mod is not None and _ours(mod):
        return mod
    if _PRIVATE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_PRIVATE, WORKER_DIR / "__init__.py",
                                                      submodule_search_locations=[str(WORKER_DIR)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_PRIVATE] = mod
        spec.loader.exec_module(mod)
    return sys.modules[_PRIVATE]


def client_module():
    """worker.client of this pack."""
    return importlib.import_module(worker_package().__name__ + ".client")
