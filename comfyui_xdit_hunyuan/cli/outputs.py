"""What a run leaves in --out: latent.safetensors (ComfyUI SaveLatent format), preview.png (latent-space),
run.json (the run's settings, plan, exactness and timings), the per-step previews, and the list printed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from .exactness import exactness
from .printout import say
from .session import RunResult
from .settings import Settings


def write_latent(path: Path, latent, meta: dict) -> None:
    """The latent as ComfyUI's SaveLatent writes it (LoadLatent reads it back unscaled)."""
    import torch
    from safetensors.torch import save_file

    save_file({"latent_tensor": latent.to("cpu", torch.float32).contiguous(),
               "latent_format_version_0": torch.tensor([])},
              str(path), metadata={"xdit_hunyuan": json.dumps(meta)})


def run_record(s: Settings, model: dict, result: RunResult, files: dict) -> dict:
    exact, words = exactness(s.plan, s.steps)
    return {
        "command": s.command,
        "devices": s.devices,
        "pool": s.pool.to_dict(),
        "parallel": s.plan.to_dict(),
        "parallel_description": s.plan.describe(),
        "exact": exact,
        "exactness": " ".join(words),
        "dtype": s.dtype_name,
        "model": model,
        "size": {"width": s.width, "height": s.height},
        "latent_shape": list(result.latent.shape),
        "steps": s.steps, "sampler": s.sampler, "scheduler": s.scheduler, "guidance": s.guidance, "seed": s.seed,
        "warnings": s.warnings,
        "timings": {"pool_start_s": round(result.start_seconds, 4), "load_and_warmup_s": round(result.load_seconds, 4),
                    "sampling_s": round(result.sampling_seconds, 4),
                    "step_s": [round(t, 4) for t in result.step_seconds]},
        "files": files,
    }


def write_outputs(s: Settings, result: RunResult, model: dict, extra: dict | None = None) -> dict:
    """latent.safetensors, preview.png and run.json into s.out; `extra` maps a name to (path, note) of
    files already written (listed in run.json and printed)."""
    from comfyui_xdit_hunyuan.preview import save_preview

    extra = extra or {}
    files = {name: str(path) for name, (path, _) in extra.items()}
    files.update(latent=str(s.out / "latent.safetensors"), preview=str(s.out / "preview.png"),
                 record=str(s.out / "run.json"))
    record = run_record(s, model, result, files)
    write_latent(Path(files["latent"]), result.latent, record)
    pw, ph = save_preview(result.latent, files["preview"])
    Path(files["record"]).write_text(json.dumps(record, indent=2) + "\n")
    lines = [(files["latent"], f"latent {'x'.join(map(str, result.latent.shape))}, key 'latent_tensor'"),
             (files["preview"], f"{pw}x{ph} latent-space preview"), (files["record"], "the run's settings and timings"),
             *((str(path), note) for path, note in extra.values())]
    width = max(len(path) for path, _ in lines)
    for i, (path, note) in enumerate(lines):
        say(f"{'wrote' if i == 0 else '     '} {path:<{width}}  ({note})")
    return record


def preview_writer(s: Settings) -> Callable[[int, Any], None] | None:
    """Writes preview_stepNNN.png for the x0 previews the workers send every --preview-every steps."""
    if not s.preview_every:
        return None
    from comfyui_xdit_hunyuan.preview import save_preview

    def write(step: int, x0) -> None:
        save_preview(x0, s.out / f"preview_step{step:03d}.png", scaled=True)
    return write
