"""Our HunyuanDiT against diffusers' HunyuanDiT2DModel (an independent implementation) on the same
random weights, fp32 on the CPU; its RoPE against a re-derivation of ComfyUI's / the original's
positions; odd latent sizes, long prompts, low precision and conditioning broadcast."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import HunyuanDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed

from comfyui_xdit_hunyuan.model import TokenGrid, load_model, rope_table, save_checkpoint
from comfyui_xdit_hunyuan.model.layouts import canonical_to_diffusers, diffusers_config

TOL = 1e-5
BASE = 512 // 8 // 2          # the base RoPE grid of HunyuanDiT (patch 2)


def diffusers_twin(model) -> HunyuanDiT2DModel:
    """diffusers' model holding exactly our model's weights."""
    twin = HunyuanDiT2DModel(**diffusers_config(model.cfg))
    twin.load_state_dict(canonical_to_diffusers(model.state_dict()), strict=True)
    return twin.eval().requires_grad_(False)


def run_diffusers(twin, inputs, rope) -> torch.Tensor:
    """diffusers' v-prediction (first in_channels of the output) for our keyword inputs."""
    out = twin(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"],
               text_embedding_mask=inputs["text_embedding_mask"],
               encoder_hidden_states_t5=inputs["encoder_hidden_states_t5"],
               text_embedding_mask_t5=inputs["text_embedding_mask_t5"], image_meta_size=inputs["image_meta_size"],
               style=inputs["style"], image_rotary_emb=rope, return_dict=False)[0]
    return out[:, : twin.config.in_channels]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def fill_crop_region(rows: int, cols: int):
    """(top, left), (bottom, right) of the token grid fitted into the BASE x BASE grid: the long side
    fills it, the short side is resized proportionally and centred."""
    if rows > cols:
        size_y, size_x = BASE, int(round(BASE / rows * cols))
    else:
        size_y, size_x = int(round(BASE / cols * rows)), BASE
    top, left = int(round((BASE - size_y) / 2)), int(round((BASE - size_x) / 2))
    return (top, left), (top + size_y, left + size_x)


def comfyui_rope(rows: int, cols: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's / the original's RoPE table, re-derived: positions are numpy linspace(start, stop, n,
    endpoint=False) in float32 over the fill-crop region; the first half of the head dim rotates with
    x, the second with y, adjacent pairs share a frequency."""
    (top, left), (bottom, right) = fill_crop_region(rows, cols)
    ys = np.linspace(top, bottom, rows, endpoint=False, dtype=np.float32)
    xs = np.linspace(left, right, cols, endpoint=False, dtype=np.float32)
    pos_x, pos_y = (p.ravel().astype(np.float64) for p in np.meshgrid(xs, ys))
    quarter = head_dim // 4
    inv_freq = 10000.0 ** (-np.arange(quarter) / quarter)
    angles = [np.repeat(np.outer(p, inv_freq), 2, axis=1) for p in (pos_x, pos_y)]
    return (torch.from_numpy(np.concatenate([np.cos(a) for a in angles], axis=1)).float(),
            torch.from_numpy(np.concatenate([np.sin(a) for a in angles], axis=1)).float())


@pytest.fixture(scope="module", params=["tiny_model", "tiny_v11_model"], ids=["v1.2", "v1.1"])
def pair(request):
    """(our model, diffusers' model with the same weights), for a v1.2- and a v1.1-style config."""
    model = request.getfixturevalue(request.param)
    return model, diffusers_twin(model)


@pytest.mark.parametrize("size", [8, 16])
def test_square_sizes_match_diffusers(pair, model_inputs, size):
    model, twin = pair
    inputs = model_inputs(model.cfg, batch=2, height=size, width=size)
    ours = model(**inputs)
    rope = rope_table(TokenGrid(size, size), model.cfg.head_dim)
    assert ours.shape == (2, 4, size, size)
    assert max_diff(ours, run_diffusers(twin, inputs, rope)) < TOL
    assert ours.abs().mean() > 0.1                      # a real signal, not a vanishing one


@pytest.mark.parametrize("rows, cols", [(48, 80), (80, 48), (64, 64), (54, 72), (10, 6), (7, 13)])
@pytest.mark.parametrize("head_dim", [8, 88])
def test_rope_follows_comfyui_positions(rows, cols, head_dim):
    cos, sin = rope_table(TokenGrid(2 * rows, 2 * cols), head_dim)
    ref_cos, ref_sin = comfyui_rope(rows, cols, head_dim)
    assert max_diff(cos, ref_cos) < TOL and max_diff(sin, ref_sin) < TOL


@pytest.mark.parametrize("rows, cols, differs", [(48, 80, True), (80, 48, True), (10, 6, True), (64, 64, False)])
def test_diffusers_rope_differs_where_crop_starts_inside(rows, cols, differs):
    """diffusers' get_2d_rotary_pos_embed stretches positions when the crop starts past 0 (1280x768:
    up to 0.125 in position); on square grids it agrees with ComfyUI's."""
    theirs = get_2d_rotary_pos_embed(88, fill_crop_region(rows, cols), (rows, cols), output_type="pt")
    ref = comfyui_rope(rows, cols, 88)
    diff = max(max_diff(a, b) for a, b in zip(theirs, ref))
    assert diff > 1e-2 if differs else diff < TOL


def test_non_square_matches_diffusers_fed_comfyui_rope(pair, model_inputs):
    model, twin = pair
    inputs = model_inputs(model.cfg, batch=2, height=20, width=12)     # tokens 10 x 6, crop starts at x=6
    ours = model(**inputs)
    rope = rope_table(TokenGrid(20, 12), model.cfg.head_dim)
    assert max_diff(ours, run_diffusers(twin, inputs, rope)) < TOL
    diffusers_rope = get_2d_rotary_pos_embed(model.cfg.head_dim, fill_crop_region(10, 6), (10, 6), output_type="pt")
    assert max_diff(ours, run_diffusers(twin, inputs, diffusers_rope)) > 1e-4


def test_odd_latent_size_pads_circularly_and_crops(pair, model_inputs):
    model, twin = pair
    inputs = model_inputs(model.cfg, batch=2, height=15, width=13)
    ours = model(**inputs)
    assert ours.shape == (2, 4, 15, 13)
    padded = dict(inputs, x=F.pad(inputs["x"], (0, 1, 0, 1), mode="circular"))
    ref = run_diffusers(twin, padded, rope_table(TokenGrid(16, 14), model.cfg.head_dim))[..., :15, :13]
    assert max_diff(ours, ref) < TOL


def test_text_longer_than_text_len(pair, model_inputs):
    """As ComfyUI: learned padding replaces masked tokens among the LAST text_len / text_len_t5 only
    (an earlier masked token stays), and the pooler reads the first text_len_t5 mT5 tokens."""
    model, _ = pair
    cfg = model.cfg
    n, n5 = cfg.text_len, cfg.text_len_t5
    extra = {"text_embedding_mask": 3, "text_embedding_mask_t5": 4}          # tokens beyond n / n5
    inputs = model_inputs(cfg, batch=2, bert_len=n + 3, t5_len=n5 + 4)
    for key in extra:
        mask = torch.ones_like(inputs[key])
        mask[:, 1] = 0                                  # before the last n / n5: must not be padded
        mask[0, -2:] = 0
        mask[1, -4:] = 0
        inputs[key] = mask
    ours = model(**inputs)

    # diffusers takes exactly n + n5 tokens. Reference: its padding laid over the last n / n5 positions,
    # masks set to 1 before them, its pooler fed the first n5 mT5 tokens.
    twin = diffusers_twin(model)
    pad, width = model.text_embedding_padding, cfg.text_dim
    twin.text_embedding_padding = torch.nn.Parameter(
        torch.cat([torch.zeros(3, width), pad[:n], torch.zeros(4, width), pad[n:]]))
    for key, k in extra.items():
        inputs[key][:, :k] = 1
    twin.time_extra_emb.pooler.register_forward_pre_hook(lambda module, args: (args[0][:, :n5],))
    ref = run_diffusers(twin, inputs, rope_table(TokenGrid(16, 16), cfg.head_dim))
    assert max_diff(ours, ref) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(pair, model_inputs, dtype):
    model, _ = pair
    inputs = model_inputs(model.cfg, batch=2)
    ref = model(**inputs)
    low = copy.deepcopy(model).to(dtype)(**inputs)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert ((low - ref).norm() / ref.norm()).item() < 3e-2


def test_conditioning_batch_1_is_repeated(tiny_v11_model, model_inputs):
    model = tiny_v11_model
    inputs = model_inputs(model.cfg, batch=2)
    single = {k: v if k in ("x", "t") else v[:1] for k, v in inputs.items()}
    repeated = {k: v if k in ("x", "t") else v[:1].repeat(2, *[1] * (v.ndim - 1)) for k, v in inputs.items()}
    assert max_diff(model(**single), model(**repeated)) < 1e-6


def test_diffusers_reads_our_diffusers_directory(pair, model_inputs, tmp_path):
    model, _ = pair
    inputs = model_inputs(model.cfg, batch=2)
    twin = HunyuanDiT2DModel.from_pretrained(save_checkpoint(model, tmp_path / "transformer", "diffusers")).eval()
    with torch.no_grad():
        theirs = run_diffusers(twin, inputs, rope_table(TokenGrid(16, 16), model.cfg.head_dim))
    assert max_diff(model(**inputs), theirs) < TOL


def test_we_read_a_directory_diffusers_saved(pair, tmp_path):
    model, twin = pair
    twin.save_pretrained(tmp_path / "transformer")
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert loaded.cfg == model.cfg
    theirs = model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items())
