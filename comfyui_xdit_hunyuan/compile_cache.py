"""The workers' persistent compile caches: torch.compile's (inductor: FX graphs, AOTAutograd, kernels) and
Triton's, in a folder of the pack that outlives the pool and ComfyUI, so a restart compiles nothing it
compiled before. Safe to delete at any time (the next first image of a size compiles again).

Layout: `<root>/<stack>/` per software stack (torch, CUDA, Triton and Python versions, so caches of another
stack are never read), with `MANIFEST.json` naming that stack, `inductor/` and `triton/`:

    >>> import tempfile
    >>> folder = prepare(tempfile.mkdtemp())
    >>> sorted(environment(folder))
    ['TORCHINDUCTOR_CACHE_DIR', 'TRITON_CACHE_DIR']

and, where torch's bytecode is not cached (some images), `pycache/` for the workers' Python
(`bytecode_environment`).

A folder whose manifest is missing, unreadable or names another stack is moved aside with a warning and
made anew; an entry inductor cannot read is recompiled by inductor itself (with its own warning).
The root is PoolConfig.cache_dir: in ComfyUI `<ComfyUI user folder>/xdit_hunyuan/compile_cache`, elsewhere
`$XDG_CACHE_HOME/comfyui_xdit_hunyuan` (default `~/.cache/comfyui_xdit_hunyuan`).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

log = logging.getLogger("comfyui_xdit_hunyuan")

MANIFEST = "MANIFEST.json"
FORMAT = 1


def stack() -> dict:
    """The software that decides whether a compiled artifact can be reused."""
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"format": FORMAT, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version()}


def stack_name(info: dict) -> str:
    cuda = info["cuda"] or "cpu"
    return f"torch{info['torch']}-cuda{cuda}-triton{info['triton'] or 'none'}-py{info['python']}".replace("+", "_")


def default_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfyui_xdit_hunyuan"


def prepare(root: str | os.PathLike) -> Path:
    """This stack's cache folder under `root`, created if needed; a foreign or corrupted one is replaced."""
    info = stack()
    folder = Path(root) / stack_name(info)
    manifest = folder / MANIFEST
    if folder.exists():
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            found, why = None, f"its {MANIFEST} cannot be read ({e})"
        else:
            why = f"it was made by {found}" if found != info else ""
        if found != info:
            aside = folder.with_name(f"{folder.name}.stale-{int(time.time())}")
            log.warning("xDiT: the compile cache %s is not this software's (%s); it is moved to %s and made anew "
                        "(the first image of each size compiles again)", folder, why, aside)
            try:
                folder.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, manifest)
    return folder


def environment(folder: Path) -> dict[str, str]:
    """The variables by which torch.compile and Triton find their caches (read when they compile)."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}


def bytecode_environment(folder: Path, probe: str | None = None) -> dict[str, str]:
    """Where the workers' Python keeps compiled bytecode, when it would otherwise keep none for torch: some
    images ship torch without .pyc files in a read-only folder, or set PYTHONDONTWRITEBYTECODE, and every
    worker then compiles torch.compile's modules from source (5 s of each first image on the H200 image).
    Then: `<folder>/pycache` (PYTHONPYCACHEPREFIX), written once, read by every later worker. Empty where
    torch's bytecode is cached as usual (a pip install writes it), so nothing changes there. `probe`: the
    module source to look for (default torch._dynamo's)."""
    import importlib.util
    if probe is None:
        spec = importlib.util.find_spec("torch._dynamo")
        probe = spec.origin if spec is not None else None
    if not probe or os.path.exists(importlib.util.cache_from_source(probe)):
        return {}
    return {"PYTHONPYCACHEPREFIX": str(folder / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}


def size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
