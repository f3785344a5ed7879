"""The weights the pack sends to its workers are the weights KSampler runs: for MODELs built by ComfyUI's own
loader, merge nodes and LoRA loader, `PatchedStateDict` equals, bit for bit, the diffusion model's state
dict after ComfyUI has loaded (and so patched) the MODEL for sampling, and the model is left untouched.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (0.3.64 was checked) whose dependencies import.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not COMFYUI_DIR:
    pytest.skip("set COMFYUI_DIR to a ComfyUI checkout to compare with ComfyUI's patched weights",
                allow_module_level=True)
if COMFYUI_DIR not in sys.path:
    sys.path.insert(0, COMFYUI_DIR)
try:
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import comfy.sd
    from comfy_extras.nodes_model_merging import ModelAdd, ModelMergeBlocks, ModelMergeSimple, ModelSubtract
except ImportError as exc:  # a dependency of ComfyUI is missing
    pytest.skip(f"ComfyUI at {COMFYUI_DIR} does not import here: {exc}", allow_module_level=True)

from comfyui_xdit_hunyuan import adapter as glue  # noqa: E402
from comfyui_xdit_hunyuan.model import HunyuanDiT, HunyuanDiTConfig, init_random_  # noqa: E402

# what ComfyUI leaves unpatched in HunyuanDiT: parameters of modules that also have child modules
NEVER_PATCHED = {"text_embedding_padding", "pooler.positional_embedding"}


def checkpoint(seed: int) -> dict[str, torch.Tensor]:
    """The integration test's tiny HunyuanDiT (ComfyUI's detection loads it)."""
    model = HunyuanDiT(HunyuanDiTConfig(depth=6, hidden_size=128, num_heads=16, mlp_hidden=512))
    init_random_(model, seed)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def lora() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    sd = {}
    for key, (out_f, in_f) in {"blocks.0.attn1.Wqkv": (384, 128), "blocks.3.mlp.fc1": (512, 128),
                               "final_layer.linear": (32, 128), "x_embedder.proj": (128, 16)}.items():
        shape_in = (4, in_f) if key != "x_embedder.proj" else (4, 4, 2, 2)
        shape_out = (out_f, 4) if key != "x_embedder.proj" else (out_f, 4, 1, 1)
        sd[f"diffusion_model.{key}.lora_up.weight"] = torch.randn(shape_out, generator=g) * 0.05
        sd[f"diffusion_model.{key}.lora_down.weight"] = torch.randn(shape_in, generator=g) * 0.05
    return sd


def comfy_model(sd, weight_dtype=None):
    options = {} if weight_dtype is None else {"dtype": weight_dtype}
    return comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in sd.items()}, model_options=options)


def as_ksampler_runs_it(model) -> dict[str, torch.Tensor]:
    """The diffusion model's weights while ComfyUI has the MODEL loaded for sampling (patched in place)."""
    mm.unload_all_models()
    with torch.inference_mode():              # as ComfyUI's executor runs nodes
        mm.load_models_gpu([model], force_full_load=True)
    try:
        prefix = "diffusion_model."
        return {k[len(prefix):]: v.detach().clone() for k, v in model.model.state_dict().items()
                if k.startswith(prefix)}
    finally:
        mm.unload_all_models()


LORA = None  # set by the models fixture: the LoRA file's tensors, loaded once (as LoraLoader caches them)


@pytest.fixture(scope="module")
def models():
    global LORA
    LORA = lora()
    a, b = comfy_model(checkpoint(1234)), comfy_model(checkpoint(4321))
    with_lora = lambda m: comfy.sd.load_lora_for_models(m, None, LORA, 0.8, 0)[0]  # noqa: E731
    cases = {
        "plain": a,
        "lora": with_lora(a),
        "simple": ModelMergeSimple().merge(a, b, 0.5)[0],
        "add": ModelAdd().merge(a, b)[0],
        "subtract": ModelSubtract().merge(a, b, 0.7)[0],
        "blocks": ModelMergeBlocks().merge(a, b, input=0.3, middle=0.6, out=0.9)[0],
        "self_add": ModelAdd().merge(a, a)[0],
    }
    cases["add+lora"] = with_lora(cases["add"])
    cases["simple+lora"] = with_lora(cases["simple"])
    cases["fp8+lora"] = with_lora(comfy_model(checkpoint(1234), torch.float8_e4m3fn))
    return cases


@pytest.mark.parametrize("case", ["plain", "lora", "simple", "add", "subtract", "blocks", "self_add", "add+lora",
                                  "simple+lora", "fp8+lora"])
def test_patched_state_dict_is_what_ksampler_runs(models, case):
    model = models[case]
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    ours = glue.PatchedStateDict(model).materialize()
    assert {k: v for k, v in model.model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())   # nothing patched
    ref = as_ksampler_runs_it(model)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    if case in ("add", "self_add", "simple"):
        # the merge patches every key, but ComfyUI applies none to these: they keep model1's values
        assert NEVER_PATCHED <= {k for k in ref if torch.equal(ref[k], before["diffusion_model." + k])}


def test_only_the_keys_comfyui_loads_are_patched(models):
    model = models["add"]
    assert {f"diffusion_model.{k}" for k in NEVER_PATCHED} <= set(model.patches)
    assert not {f"diffusion_model.{k}" for k in NEVER_PATCHED} & glue.comfy_patched_keys(model)
    assert glue.PatchedStateDict(model).patched == {k[len("diffusion_model."):] for k in model.patches} - NEVER_PATCHED


def test_a_session_of_changes_sends_only_what_changed_and_equals_fresh_runs(models, monkeypatch):
    """MODELs as an artist's session makes them (LoRA added, strength changed, LoRA removed, another
    checkpoint, back), through the adapter's weights and a warm pool of real CPU workers: each result equals
    the same job run by a fresh runtime on the materialised weights; only changed tensors travel."""
    from comfyui_xdit_hunyuan.config import PoolConfig
    from comfyui_xdit_hunyuan.job import WeightsRef
    from comfyui_xdit_hunyuan.plan import ParallelConfig
    from comfyui_xdit_hunyuan import sampling
    from comfyui_xdit_hunyuan.job import Job
    from comfyui_xdit_hunyuan.tiny import random_cond
    from comfyui_xdit_hunyuan.worker import PoolClient
    from parallel_harness import run_on_mesh

    arch = HunyuanDiTConfig(depth=6, hidden_size=128, num_heads=16, mlp_hidden=512)
    ms = sampling.DiscreteVSampling.for_model(arch)

    def make_job(h, w, steps):
        lat = torch.zeros(1, 4, h, w)
        return Job(weights=None, positive=[random_cond(arch, 1, hw=(8 * h, 8 * w))],
                   negative=[random_cond(arch, 2, hw=(8 * h, 8 * w))], latent=lat,
                   noise=sampling.prepare_noise(lat, 3), sigmas=sampling.calculate_sigmas(ms, "normal", steps))

    a = models["plain"]
    b = comfy_model(checkpoint(4321))
    with_lora = lambda m, s: comfy.sd.load_lora_for_models(m, None, LORA, s, 0)[0]  # noqa: E731
    session = [("base", a), ("lora 0.8", with_lora(a, 0.8)), ("lora 0.5", with_lora(a, 0.5)), ("removed", a),
               ("other checkpoint", b), ("back", a), ("lora 0.8 again", with_lora(a, 0.8))]
    n, lora_keys = len(glue.PatchedStateDict(a)), len(glue.PatchedStateDict(with_lora(a, 0.8)).patched)
    expected = [(True, n, 0), (False, lora_keys, 0), (False, lora_keys, 0), (False, 0, lora_keys), (False, n, 0),
                (False, 0, n), (False, 0, lora_keys)]
    plan, counts = ParallelConfig(), []
    monkeypatch.setenv("OMP_NUM_THREADS", "1")        # the worker rounds as the one-thread fresh runs do
    with PoolClient(PoolConfig(devices="cpu:1", dtype="fp32"), startup_timeout=300) as client:
        for (name, model), want in zip(session, expected):
            source = glue.PatchedStateDict(model)
            job = make_job(h=8, w=8, steps=2)
            job.weights = WeightsRef(glue.model_identity(model), source)
            out = client.run(job, plan)
            w = client.last_stats["weights"]
            counts.append((w["whole"], w["sent"], w["restored"]))
            job.weights = WeightsRef("fresh", source.materialize())
            assert torch.equal(out, run_on_mesh(plan, [job])[0]), name
    assert counts == expected, counts
