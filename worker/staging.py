"""What one job's weights travel as, and freeing it once the workers have read it (worker/weights.py
decides which tensors travel; this decides how):

- a whole model: one buffer in the GPU memory of the first worker this process can reach (CUDA IPC, one handle:
  job.SharedWeights) when PoolConfig.weights_transfer is "auto", else one private safetensors file in the pool's
  staging folder (/dev/shm where there is one);
- changed tensors: shared by CUDA IPC where they already live on a worker's GPU (a LoRA's patched weights that
  ComfyUI computed there), the rest in one staged file.

`JobStaging` is the `stage` callable of HeldWeights.plan; `release()` removes its files and lets its GPU memory
go (the client calls it when every rank has loaded, and again when the job ends).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch

from ..job import PoolError, SharedWeights
from .weights import Staged

SHARED_ALIGN = 256       # byte alignment of each tensor in a whole model's shared GPU buffer


class JobStaging:
    def __init__(self, devices: list[str], transfer: str, folder: str | None, job_id: int,
                 log: logging.Logger):
        self.devices, self.transfer, self.folder, self.job_id, self.log = devices, transfer, folder, job_id, log
        self.items: list = []                 # staged files (Path) and GPU tensors shared with the workers

    def __call__(self, tensors: Mapping[str, torch.Tensor], whole: bool = False):
        """Staged (changed tensors) or, `whole`, a file path or SharedWeights."""
        if whole:
            return self._stage_whole(tensors)
        shared, rank = self._share(tensors)
        rest = {k: t for k, t in tensors.items() if k not in shared}
        files = [str(self._stage(rest))] if rest else []
        return Staged(files=files, shared=shared, shared_rank=rank or 0)

    def release(self) -> None:
        """Free what was staged: files removed, shared GPU tensors released (and the GPU memory they held given
        back to the device, so that a whole model handed over in GPU memory does not stay reserved here)."""
        shared = any(isinstance(item, torch.Tensor) for item in self.items)
        for item in self.items:
            if isinstance(item, Path):
                _remove(item)
        self.items.clear()
        if torch.cuda.is_initialized():
            torch.cuda.ipc_collect()
            if shared:
                torch.cuda.empty_cache()

    def _stage_whole(self, tensors: Mapping[str, torch.Tensor]):
        """A whole model for the workers: SharedWeights (one buffer in GPU memory, by CUDA IPC) when
        config.weights_transfer is "auto" and this process can use the GPU of a worker, else the path of one
        staged safetensors file. The buffer is freed once every rank has read it."""
        rank = self._reachable_gpu_rank() if self.transfer == "auto" else None
        if rank is not None:
            try:
                return self._share_whole(tensors, rank)
            except torch.cuda.OutOfMemoryError:
                self.items = [item for item in self.items if isinstance(item, Path)]
                self.log.warning("no room on %s for a copy of the weights to hand to the workers; staging them in "
                                 "a file instead", self.devices[rank])
        return str(self._stage(tensors))

    def _share_whole(self, tensors: Mapping[str, torch.Tensor], rank: int) -> SharedWeights:
        from torch.multiprocessing.reductions import reduce_tensor
        entries, offset = {}, 0
        for key, t in tensors.items():
            entries[key] = (offset, t.dtype, tuple(t.shape))
            offset += -(-t.numel() * t.element_size() // SHARED_ALIGN) * SHARED_ALIGN
        buffer = torch.empty(max(offset, 1), dtype=torch.uint8, device=self.devices[rank])
        self.items.append(buffer)                 # alive until every rank has read it
        for key, t in tensors.items():
            start, dtype, shape = entries[key]
            n = t.numel() * t.element_size()
            buffer[start:start + n].view(dtype).view(shape).copy_(t.detach())
        torch.cuda.synchronize(buffer.device)
        _, handle = reduce_tensor(buffer)
        return SharedWeights(handle=handle, nbytes=buffer.numel(), entries=entries, rank=rank)

    def _reachable_gpu_rank(self) -> int | None:
        """The first rank whose GPU this process can use (the same device string here as in the workers)."""
        cuda = [r for r, d in enumerate(self.devices) if d.startswith("cuda")]
        if not cuda or not torch.cuda.is_available():
            return None
        index = torch.device(self.devices[cuda[0]]).index or 0
        return cuda[0] if index < torch.cuda.device_count() else None

    def _share(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict, int | None]:
        """CUDA IPC handles of the tensors that live on the GPU of one of the workers (a LoRA's patched weights,
        computed by ComfyUI on its own GPU): that rank copies them device to device, no copy through the host."""
        from torch.multiprocessing.reductions import reduce_tensor
        ranks = {d: r for r, d in enumerate(self.devices) if d.startswith("cuda")}
        shared, rank = {}, None
        for key, t in tensors.items():
            where = ranks.get(str(t.device)) if t.is_cuda else None
            if where is None or (rank is not None and where != rank):
                continue
            t = t.detach().contiguous()
            self.items.append(t)                  # alive until the job ends (the workers have copied it)
            _, args = reduce_tensor(t)
            shared[key], rank = args, where
        return shared, rank

    def _stage(self, tensors: Mapping[str, torch.Tensor]) -> Path:
        """One private safetensors file of `tensors` (CPU copies) that every rank reads."""
        from safetensors.torch import save_file

        out, storages = {}, set()
        for name, value in tensors.items():
            t = value.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr in storages:
                t = t.clone()         # safetensors refuses tensors that share memory
            storages.add(ptr)
            out[name] = t
        path = Path(self.folder, f"weights-{self.job_id}-{len(os.listdir(self.folder))}.safetensors")
        self.items.append(path)
        try:
            save_file(out, str(path))
        except OSError as e:
            raise PoolError(f"could not write the model weights for the workers to {path}: {e}; free space there "
                            f"(or, for a disk folder, point TMPDIR to a larger disk)") from e
        os.chmod(path, 0o600)
        return path


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
