"""Shared fixtures: tiny random HunyuanDiT models (8 blocks, so skip connections exist) and inputs."""
from __future__ import annotations

import os

# The Triton kernels of model/kernels.py run on the CPU through Triton's interpreter (read when they are
# defined, so before the package is imported; worker processes inherit it).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Worker processes that host the tests' stand-in runtime (tests.fake_runtime) import it from the repository.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

import pytest  # noqa: E402
import torch  # noqa: E402

try:
    import comfyui_xdit_hunyuan.worker  # noqa: E402,F401 - the worker pool, mapped from worker/ by the install
except ImportError as e:  # pragma: no cover - a setup problem, said once instead of in every test
    raise pytest.UsageError(f"the pack is not installed ({e}): run `python -m pip install -e .` in the "
                            f"repository first (requirements-test.txt does)") from e
from comfyui_xdit_hunyuan.model import HunyuanDiTConfig  # noqa: E402
from comfyui_xdit_hunyuan.tiny import random_cond, random_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """v1.2-style (no size/style conditioning), fp32, CPU. Shared: do not modify."""
    return random_model("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_v11_model():
    """v1.0/v1.1-style (image meta size + style conditioning), fp32, CPU. Shared: do not modify."""
    return random_model("tiny-v1.1", seed=1)


@pytest.fixture(scope="session")
def model_inputs():
    """Factory of model keyword inputs: `make(cfg, batch=2, height=16, width=16, seed=0, bert_len=None,
    t5_len=None)` -> {x, t, context, text_embedding_mask, encoder_hidden_states_t5,
    text_embedding_mask_t5, image_meta_size, style}, every tensor with `batch` rows. Timesteps differ
    per sample, text masks have padding, and the last sample's prompts are shorter than the others'."""
    def make(cfg: HunyuanDiTConfig, batch: int = 2, height: int = 16, width: int = 16, seed: int = 0,
             bert_len: int | None = None, t5_len: int | None = None) -> dict[str, torch.Tensor]:
        cond = random_cond(cfg, seed=seed, batch=batch, bert_len=bert_len, t5_len=t5_len,
                           hw=(8 * height, 8 * width))
        for mask in (cond.text_embedding_mask, cond.text_embedding_mask_t5):
            mask[-1, max(1, mask.shape[1] // 3):] = 0
        g = torch.Generator().manual_seed(seed + 1)
        inputs = cond.model_kwargs()
        inputs.update(x=torch.randn(batch, cfg.in_channels, height, width, generator=g),
                      t=torch.linspace(50.0, 900.0, batch), image_meta_size=cond.image_meta_size.repeat(batch, 1),
                      style=torch.zeros(batch, dtype=torch.long))
        return inputs
    return make
