"""Every checkpoint layout users have loads to the same model, bit for bit; bad sources are rejected
before any tensor data is read, with errors that say what was expected, what was found, what to do."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfyui_xdit_hunyuan import load_model, load_state_dict
from comfyui_xdit_hunyuan.model import CheckpointError, NotHunyuanDiTError, inspect_source, save_checkpoint
from comfyui_xdit_hunyuan.model import loading
from comfyui_xdit_hunyuan.model.layouts import COMFY_PREFIX, canonical_to_diffusers


def _sharded_diffusers(sd, tmp):
    """A diffusers transformer directory with the weights split over two shards and an index."""
    weights = canonical_to_diffusers(sd)
    names = list(weights)
    root = tmp / "transformer"
    root.mkdir()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({n: weights[n] for n in part}, root / file)
        weight_map |= {n: file for n in part}
    (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp


def _torch_save(obj, path, **kw):
    torch.save(obj, path, **kw)
    return path


def _save_file(tensors, path):
    save_file(tensors, path)
    return path


# layout -> writer(canonical state dict, tmp dir) -> source path
FILE_LAYOUTS = {
    "comfyui": lambda sd, tmp: save_checkpoint(sd, tmp / "hunyuan_dit_1.2.safetensors", "comfyui"),
    "bare": lambda sd, tmp: save_checkpoint(sd, tmp / "dit.sft", "bare"),
    "pt-ema": lambda sd, tmp: save_checkpoint(sd, tmp / "pytorch_model_ema.pt", "original_pt"),
    "pt-plain": lambda sd, tmp: _torch_save(sd, tmp / "model.pth"),
    "pt-module": lambda sd, tmp: _torch_save({"module": sd, "epoch": 3}, tmp / "model.bin"),
    "pt-prefixed": lambda sd, tmp: _torch_save({f"module.{k}": v for k, v in sd.items()}, tmp / "model.ckpt"),
    "pt-legacy-format": lambda sd, tmp: _torch_save(sd, tmp / "old.pt", _use_new_zipfile_serialization=False),
    "diffusers-transformer-dir": lambda sd, tmp: save_checkpoint(sd, tmp / "transformer", "diffusers"),
    "diffusers-model-root": lambda sd, tmp: save_checkpoint(sd, tmp / "HunyuanDiT" / "transformer", "diffusers").parent,
    "diffusers-sharded": _sharded_diffusers,
    "diffusers-names-file": lambda sd, tmp: _save_file(canonical_to_diffusers(sd), tmp / "d.safetensors"),
}
MEMORY_LAYOUTS = {
    "comfyui": lambda sd: {**{COMFY_PREFIX + k: v for k, v in sd.items()}, "vae.decoder.conv_in.weight": torch.zeros(3)},
    "bare": dict,
    "ema-wrapped": lambda sd: {"ema": dict(sd), "steps": 1000},
    "ema-prefixed": lambda sd: {f"ema.{k}": v for k, v in sd.items()},
    "diffusers": canonical_to_diffusers,
}


@pytest.fixture(scope="module")
def reference(tiny_model, model_inputs):
    """(inputs, output) of the original tiny model."""
    inputs = model_inputs(tiny_model.cfg, batch=2, height=12, width=10)
    return inputs, tiny_model(**inputs)


def assert_same_weights(sd, model):
    expected = model.state_dict()
    assert sd.keys() == expected.keys()
    assert all(sd[k].dtype == v.dtype and torch.equal(sd[k], v) for k, v in expected.items())


@pytest.mark.parametrize("layout", FILE_LAYOUTS)
def test_file_layouts_load_identically(layout, tiny_model, reference, tmp_path):
    source = FILE_LAYOUTS[layout](tiny_model.state_dict(), tmp_path)
    sd, cfg, info = load_state_dict(source)
    assert cfg == tiny_model.cfg and "v1.2" in info
    assert_same_weights(sd, tiny_model)
    inputs, expected = reference
    assert torch.equal(load_model(source, dtype=torch.float32)(**inputs), expected)


@pytest.mark.parametrize("layout", MEMORY_LAYOUTS)
def test_in_memory_layouts_load_identically(layout, tiny_model, reference):
    source = MEMORY_LAYOUTS[layout](tiny_model.state_dict())
    sd, cfg, _ = load_state_dict(source)
    assert cfg == tiny_model.cfg
    assert_same_weights(sd, tiny_model)
    inputs, expected = reference
    assert torch.equal(load_model(source, dtype=torch.float32)(**inputs), expected)


def test_v11_detected_in_every_layout(tiny_v11_model, model_inputs, tmp_path):
    inputs = model_inputs(tiny_v11_model.cfg, batch=2)
    expected = tiny_v11_model(**inputs)
    for layout in ("comfyui", "pt-ema", "diffusers-model-root"):
        (tmp_path / layout).mkdir()
        source = FILE_LAYOUTS[layout](tiny_v11_model.state_dict(), tmp_path / layout)
        cfg = inspect_source(source)
        assert cfg == tiny_v11_model.cfg and cfg.size_cond and cfg.style_cond and cfg.version == "v1.0/v1.1"
        assert torch.equal(load_model(source, dtype=torch.float32)(**inputs), expected)


@pytest.fixture
def bare_file(tiny_model, tmp_path):
    return save_checkpoint(tiny_model, tmp_path / "dit.safetensors", "bare")


def test_dtype_and_device_honoured(tiny_model, bare_file):
    model = load_model(bare_file)                                   # default: bfloat16 on the CPU
    assert not model.training
    expected = tiny_model.state_dict()
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu" and not p.requires_grad
        assert torch.equal(p, expected[name].to(torch.bfloat16))
    on_meta = load_model(bare_file, dtype=torch.float16, device="meta")
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in on_meta.parameters())


def test_state_dict_keeps_stored_dtype(tiny_model, tmp_path):
    path = save_checkpoint({k: v.half() for k, v in tiny_model.state_dict().items()}, tmp_path / "h.safetensors", "bare")
    sd, _, _ = load_state_dict(path)
    assert all(v.dtype == torch.float16 for v in sd.values())


@pytest.mark.parametrize("layout", ["comfyui", "bare", "diffusers-model-root", "diffusers-sharded"])
def test_inspect_source_reads_no_tensor_data(layout, tiny_model, tmp_path, monkeypatch):
    source = FILE_LAYOUTS[layout](tiny_model.state_dict(), tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(loading, "safe_open", no_reading)
    assert inspect_source(source) == tiny_model.cfg
    with pytest.raises(AssertionError, match="tensor data was read"):     # the patch covers all reading
        load_state_dict(source)


# ------------------------------------------------------------------------------------- errors
def test_not_hunyuandit_sdxl_like(tmp_path):
    path = tmp_path / "sd_xl_base.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4)}, path)
    with pytest.raises(NotHunyuanDiTError, match="not a HunyuanDiT") as err:
        inspect_source(path)
    message = str(err.value)
    assert "x_embedder.proj.weight" in message and "input_blocks" in message and "SDXL" in message


def test_not_hunyuandit_random_tensors(tmp_path):
    path = tmp_path / "random.safetensors"
    save_file({"foo": torch.zeros(2), "bar.weight": torch.zeros(3)}, path)
    with pytest.raises(NotHunyuanDiTError, match=r"found 2 tensors such as 'bar.weight', 'foo'"):
        load_model(path)


@pytest.mark.parametrize("keep", [20, -100], ids=["header", "data"])
def test_truncated_safetensors(bare_file, keep):
    data = bare_file.read_bytes()
    bare_file.write_bytes(data[:keep])
    with pytest.raises(NotHunyuanDiTError, match="truncated.*re-download"):
        inspect_source(bare_file)


def test_truncated_pt(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "m.pt", "original_pt")
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(NotHunyuanDiTError, match="truncated or damaged.*re-download"):
        load_model(path)


def test_wrong_shape_tensor(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd["blocks.3.mlp.fc2.weight"] = torch.zeros(256, 128)
    path = save_checkpoint(sd, tmp_path / "bad.safetensors", "bare")
    with pytest.raises(NotHunyuanDiTError, match=r"'blocks.3.mlp.fc2.weight' should be \[128, 256\] but is \[256, 128\]"):
        load_model(path)


def test_missing_and_unexpected_tensors(tiny_model):
    sd = dict(tiny_model.state_dict())
    del sd["blocks.2.attn2.kv_proj.bias"]
    sd["blocks.0.lora_up.weight"] = torch.zeros(2)
    with pytest.raises(NotHunyuanDiTError) as err:
        load_state_dict(sd)
    assert "missing tensors 'blocks.2.attn2.kv_proj.bias'" in str(err.value)
    assert "unexpected tensors 'blocks.0.lora_up.weight'" in str(err.value)


def test_missing_diffusers_qkv_part(tiny_model):
    sd = canonical_to_diffusers(tiny_model.state_dict())
    del sd["blocks.4.attn1.to_k.weight"]
    with pytest.raises(NotHunyuanDiTError, match=r"blocks.4.attn1.Wqkv.weight.*lack part"):
        inspect_source(sd)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere.safetensors")


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint extension '.gguf'.*\.safetensors"):
        inspect_source(path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no HunyuanDiT weights.*'readme.txt'"):
        inspect_source(tmp_path)


class _Opaque:
    """Any class: weights_only unpickling refuses it."""


def test_pickle_with_objects_refused(tiny_model, tmp_path):
    path = _torch_save({"ema": tiny_model.state_dict(), "args": _Opaque()}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="Python objects besides tensors"):
        inspect_source(path)


def test_unknown_save_layout(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="choose one of comfyui, bare, original_pt, diffusers"):
        save_checkpoint(tiny_model, tmp_path / "x", "gguf")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-buffer path loads to CUDA only")
def test_a_file_loads_to_the_gpu_as_it_is_stored(tiny_model, tmp_path):
    """Through the two pinned bounce buffers (and directly, for tensors larger than one): bit-identical."""
    from comfyui_xdit_hunyuan.model.loading import _to_gpu
    path = save_checkpoint(tiny_model, tmp_path / "tiny.safetensors", "bare")
    cpu, _, _ = load_state_dict(path)
    for dtype in (None, torch.float16):
        gpu, _, _ = load_state_dict(path, device="cuda", dtype=dtype)
        assert gpu.keys() == cpu.keys()
        for k in cpu:
            want = cpu[k] if dtype is None else cpu[k].to(dtype)
            assert gpu[k].device.type == "cuda" and torch.equal(gpu[k].cpu(), want), k
    small = dict(_to_gpu(((k, v) for k, v in cpu.items()), torch.device("cuda"), None, chunk=1024))
    assert all(torch.equal(small[k].cpu(), cpu[k]) for k in cpu)
