"""The ComfyUI-facing layer without ComfyUI: node schemas against the example workflows, input
validation, conditioning conversion, MODEL checks and the sampler node's flow, with fake ComfyUI-shaped
objects. The real-ComfyUI test is tests/integration/test_comfyui_server.py."""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from comfyui_xdit_hunyuan import adapter as glue
from comfyui_xdit_hunyuan.job import Job, JobCancelled, JobError, PoolError, WeightsRef
from comfyui_xdit_hunyuan.config import PoolConfig, RunConfig
from comfyui_xdit_hunyuan.plan import ParallelConfig, PlanError
from comfyui_xdit_hunyuan.sampling import DiscreteVSampling
from comfyui_xdit_hunyuan.tiny import random_model

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "example_workflows"
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde")
COMFY_SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc"]
COMFY_SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal"]

# Output types of the core ComfyUI nodes used by the example workflows (from ComfyUI 0.3.64's nodes.py)
CORE_NODES = {
    "CheckpointLoaderSimple": {"widgets": ["ckpt_name"], "sockets": [], "outputs": ["MODEL", "CLIP", "VAE"]},
    "CLIPTextEncode": {"widgets": ["text"], "sockets": ["clip"], "outputs": ["CONDITIONING"]},
    "EmptyLatentImage": {"widgets": ["width", "height", "batch_size"], "sockets": [], "outputs": ["LATENT"]},
    "VAEDecode": {"widgets": [], "sockets": ["samples", "vae"], "outputs": ["IMAGE"]},
    "SaveImage": {"widgets": ["filename_prefix"], "sockets": ["images"], "outputs": []},
}
OUR_NODES = {
    glue.CONFIG_NODE_ID: (glue.CONFIG_INPUTS, [glue.PARALLEL_TYPE]),
    glue.SAMPLER_NODE_ID: (glue.SAMPLER_INPUTS, ["LATENT"]),
}


@pytest.fixture(autouse=True)
def _comfy_lists(monkeypatch):
    """What only ComfyUI (sampler / scheduler lists) or the sampling module (worker samplers) knows."""
    monkeypatch.setitem(glue.OPTION_SOURCES, "samplers", lambda: list(COMFY_SAMPLERS))
    monkeypatch.setitem(glue.OPTION_SOURCES, "schedulers", lambda: list(COMFY_SCHEDULERS))
    monkeypatch.setattr(glue.samplers, "SAMPLERS", SAMPLERS)


# ============================================================================ schemas vs workflows
def _api():
    return json.loads((WORKFLOWS / "hunyuan_dit_xdit_api.json").read_text())


def _ui():
    return json.loads((WORKFLOWS / "hunyuan_dit_xdit.json").read_text())


def _output_types(class_type):
    if class_type in OUR_NODES:
        return OUR_NODES[class_type][1]
    return CORE_NODES[class_type]["outputs"]


def test_node_ids_and_input_order_match_the_api_workflow():
    api = _api()
    classes = [n["class_type"] for n in api.values()]
    assert classes.count(glue.CONFIG_NODE_ID) == 1 and classes.count(glue.SAMPLER_NODE_ID) == 1
    for nid, node in api.items():
        if node["class_type"] not in OUR_NODES:
            continue
        specs = OUR_NODES[node["class_type"]][0]
        assert list(node["inputs"]) == [s.name for s in specs], f"node {nid}: names or order differ"
        for s in specs:
            v = node["inputs"][s.name]
            if s.is_widget:
                kind = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool, "COMBO": str}[s.kind]
                assert isinstance(v, kind) and not (s.kind == "INT" and isinstance(v, bool)), (s.name, v)
                if s.min is not None:
                    assert s.min <= v <= s.max, (s.name, v)
                if s.kind == "COMBO":
                    assert v in glue.resolve_options(s), (s.name, v)
            else:
                src, slot = v
                assert _output_types(api[src]["class_type"])[slot] == s.kind, (s.name, v)


def test_sampler_inputs_are_ksamplers_plus_parallel():
    ksampler = ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                "latent_image", "denoise"]
    assert [s.name for s in glue.SAMPLER_INPUTS] == ksampler + ["parallel"]
    kinds = {s.name: s.kind for s in glue.SAMPLER_INPUTS}
    assert kinds == {"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT", "sampler_name": "COMBO",
                     "scheduler": "COMBO", "positive": "CONDITIONING", "negative": "CONDITIONING",
                     "latent_image": "LATENT", "denoise": "FLOAT", "parallel": "XDIT_PARALLEL"}
    assert [s.name for s in glue.CONFIG_INPUTS] == [
        "devices", "strategy", "cfg_degree", "ulysses_degree", "ring_degree", "pipefusion_degree",
        "num_pipeline_patch", "warmup_steps", "attention", "dtype", "compile"]
    for s in glue.CONFIG_INPUTS + glue.SAMPLER_INPUTS:
        assert len(s.tooltip) > 40, f"{s.name} needs a tooltip that says what it trades"


def _ui_to_api(ui):
    """The frontend's conversion, for the node types of the example: widgets_values are positional over
    the widget inputs; a widget with control_after_generate is followed by its mode ("fixed", ...)."""
    links = {l[0]: l for l in ui["links"]}
    out = {}
    for n in ui["nodes"]:
        ct = n["type"]
        if ct in OUR_NODES:
            specs = OUR_NODES[ct][0]
            widget_names = [s.name for s in specs if s.is_widget]
            controls = {s.name for s in specs if s.control_after_generate}
            order = [s.name for s in specs]
        else:
            widget_names, controls = CORE_NODES[ct]["widgets"], set()
            order = CORE_NODES[ct]["sockets"] + widget_names
        values = list(n.get("widgets_values") or [])
        inputs = {}
        for name in widget_names:
            inputs[name] = values.pop(0)
            if name in controls:
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert not values, f"node {n['id']} has extra widget values {values}"
        for slot, inp in enumerate(n.get("inputs", [])):
            link = links[inp["link"]]
            assert (link[3], link[4]) == (n["id"], slot) and link[5] == inp["type"]
            inputs[inp["name"]] = [str(link[1]), link[2]]
        out[str(n["id"])] = {"class_type": ct, "inputs": {k: inputs[k] for k in order if k in inputs}}
    return out


def test_ui_workflow_is_the_api_workflow():
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in _api().items()}
    assert _ui_to_api(_ui()) == api
    ui = _ui()
    for n in ui["nodes"]:              # link ids agree between nodes and the link table
        for o in n.get("outputs", []):
            for lid in o.get("links") or []:
                assert next(l for l in ui["links"] if l[0] == lid)[1] == n["id"]


# ============================================================================ nodes.py with a fake comfy_api
class _FakeIO:
    """Records what nodes.py declares, in the shape of comfy_api's io module."""

    def __init__(self):
        io = self

        class _Type:
            def __init__(self, io_type):
                self.io_type = io_type
                outer = self

                class Input:
                    def __init__(self, id, **kw):
                        self.id, self.kw, self.io_type = id, kw, outer.io_type

                class Output:
                    def __init__(self, id=None, **kw):
                        self.id, self.kw, self.io_type = id, kw, outer.io_type

                self.Input, self.Output = Input, Output

        for name, t in (("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"), ("Boolean", "BOOLEAN"),
                        ("Combo", "COMBO"), ("Model", "MODEL"), ("Conditioning", "CONDITIONING"),
                        ("Latent", "LATENT")):
            setattr(self, name, _Type(t))
        self.Custom = _Type

        class Schema:
            def __init__(self, **kw):
                self.__dict__.update(kw)

        class NodeOutput:
            def __init__(self, *args):
                self.args = args

        class ComfyNode:
            hidden = None

        self.Schema, self.NodeOutput, self.ComfyNode = Schema, NodeOutput, ComfyNode
        self.Hidden = types.SimpleNamespace(unique_id="UNIQUE_ID")
        del io


@pytest.fixture()
def fake_nodes(monkeypatch):
    io = _FakeIO()

    class ComfyExtension:
        pass

    api = types.ModuleType("comfy_api")
    v002 = types.ModuleType("comfy_api.v0_0_2")
    v002.io, v002.ComfyExtension = io, ComfyExtension
    monkeypatch.setitem(sys.modules, "comfy_api", api)
    monkeypatch.setitem(sys.modules, "comfy_api.v0_0_2", v002)
    spec = importlib.util.spec_from_file_location("xdit_pack_nodes_under_test", ROOT / "nodes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, ComfyExtension


def test_nodes_declare_the_glue_specs(fake_nodes):
    mod, ext_cls = fake_nodes
    nodes = asyncio.run(mod.XDiTHunyuanExtension().get_node_list())
    assert isinstance(mod.XDiTHunyuanExtension(), ext_cls)
    schemas = {n.define_schema().node_id: n.define_schema() for n in nodes}
    assert set(schemas) == {"XDiTParallelConfig", "XDiTHunyuanDiTSampler"}
    for node_id, (specs, outputs) in OUR_NODES.items():
        sch = schemas[node_id]
        assert sch.category == "sampling/xDiT" and sch.display_name and sch.description
        assert [i.id for i in sch.inputs] == [s.name for s in specs]
        assert [i.io_type for i in sch.inputs] == [s.kind for s in specs]
        assert [o.io_type for o in sch.outputs] == outputs
        for i, s in zip(sch.inputs, specs):
            assert i.kw["tooltip"] == s.tooltip
            if s.kind == "COMBO":
                assert i.kw["options"] == glue.resolve_options(s)
    assert schemas["XDiTHunyuanDiTSampler"].inputs[4].kw["options"] == COMFY_SAMPLERS
    assert schemas["XDiTHunyuanDiTSampler"].inputs[1].kw["control_after_generate"] is True
    assert schemas["XDiTHunyuanDiTSampler"].hidden == ["UNIQUE_ID"]
    assert schemas["XDiTParallelConfig"].display_name == "xDiT Parallel Config"
    assert schemas["XDiTHunyuanDiTSampler"].display_name == "xDiT HunyuanDiT Sampler"


def test_config_node_executes_and_validates(fake_nodes):
    mod, _ = fake_nodes
    vals = dict(devices="cpu:2", strategy="manual", cfg_degree=2, ulysses_degree=1, ring_degree=1,
                pipefusion_degree=1, num_pipeline_patch=0, warmup_steps=1, attention="auto", dtype="fp32",
                compile=False)
    out = mod.XDiTParallelConfig.execute(**vals)
    assert out.args == (RunConfig(PoolConfig(devices="cpu:2", attention="auto", dtype="fp32", compile=False),
                                  ParallelConfig(strategy="manual", cfg_degree=2)),)
    assert mod.XDiTParallelConfig.validate_inputs(**vals) is True
    msg = mod.XDiTParallelConfig.validate_inputs(**{**vals, "cfg_degree": 1})
    assert isinstance(msg, str) and "multiply to 1" in msg and "cpu:2" in msg


def test_sampler_node_hands_everything_to_the_glue(fake_nodes, monkeypatch):
    mod, _ = fake_nodes
    seen = {}
    monkeypatch.setattr(glue, "run_sampler", lambda *a, **kw: seen.update(args=a, kw=kw) or {"samples": 1})
    mod.XDiTHunyuanDiTSampler.hidden = types.SimpleNamespace(unique_id="17")
    out = mod.XDiTHunyuanDiTSampler.execute(model="M", seed=1, steps=2, cfg=3.0, sampler_name="euler",
                                            scheduler="normal", positive="P", negative="N", latent_image="L",
                                            denoise=1.0, parallel="C")
    assert out.args == ({"samples": 1},)
    assert seen["args"] == ("M", 1, 2, 3.0, "euler", "normal", "P", "N", "L", 1.0, "C")
    assert seen["kw"] == {"node_id": "17"}
    # validate_inputs takes the sampler name alone: ComfyUI checks the other widgets' ranges itself, and
    # reports a rejected name once (it repeats the message for every input validate_inputs takes)
    assert list(inspect.signature(mod.XDiTHunyuanDiTSampler.validate_inputs).parameters) == ["sampler_name"]
    assert mod.XDiTHunyuanDiTSampler.validate_inputs(sampler_name="euler") is True
    assert "not implemented by the xDiT workers" in mod.XDiTHunyuanDiTSampler.validate_inputs(sampler_name="uni_pc")


def test_pack_imports_without_comfyui():
    assert "comfy_api" not in sys.modules or not hasattr(sys.modules["comfy_api"], "latest")
    path_before = list(sys.path)
    spec = importlib.util.spec_from_file_location("xdit_pack_under_test", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.__all__ == ["comfy_entrypoint"] and not hasattr(mod, "NODE_CLASS_MAPPINGS")
    assert asyncio.iscoroutinefunction(mod.comfy_entrypoint)
    assert sys.path == path_before              # the engine is an installed package: no sys.path edit


# ============================================================================ config validation
CFG = dict(devices="cpu:1", strategy="manual", cfg_degree=1, ulysses_degree=1, ring_degree=1, pipefusion_degree=1,
           num_pipeline_patch=0, warmup_steps=1, attention="auto", dtype="auto", compile=False)


@pytest.mark.parametrize("change, words", [
    (dict(devices="cuda:9"), ["cuda:9 does not exist", "GPUs 0..1"]),
    (dict(devices="cpu:2"), ["multiply to 1", "devices 'cpu:2' gives 2"]),
    (dict(devices="cpu:3", ulysses_degree=3), ["does not divide", "16 attention heads"]),
    (dict(cfg_degree=3, devices="cpu:3"), ["cfg_degree must be 1 or 2"]),
    (dict(pipefusion_degree=21, devices="cpu:21"), ["too large for 40 blocks", "at most 20"]),
    (dict(devices="gpu0"), ["not a GPU index"]),
    (dict(strategy="fast"), ["strategy 'fast' is unknown"]),
    (dict(attention="xformers"), ["attention backend 'xformers' is unknown"]),
    (dict(dtype="fp8"), ["dtype 'fp8' is unknown"]),
    (dict(cfg_degree=1.5), ["cfg_degree must be a whole number"]),
])
def test_bad_parallel_configs_say_what_to_change(change, words):
    with pytest.raises(PlanError) as e:
        glue.build_parallel_config(**{**CFG, **change}, cuda_count=2)
    for w in words:
        assert w in str(e.value)
    msg = glue.validate_parallel_inputs(**{**CFG, **change})
    assert isinstance(msg, str)


@pytest.mark.parametrize("change, words", [
    (dict(num_pipeline_patch=1000), ["num_pipeline_patch is 1000", "at most 64"]),
    (dict(warmup_steps=10001), ["warmup_steps is 10001", "at most 10000"]),
    (dict(ring_degree=65, devices="cpu:65"), ["ring_degree is 65", "at most 64"]),
])
def test_declared_ranges_are_enforced(change, words):
    """validate_inputs takes every config input, so ComfyUI skips its own min/max checks for them: the
    declared ranges are checked here (at /prompt, and when linked values arrive at run time)."""
    msg = glue.validate_parallel_inputs(**{**CFG, **change})
    assert isinstance(msg, str) and all(w in msg for w in words), msg
    with pytest.raises(PlanError):
        glue.build_parallel_config(**{**CFG, **change})


def test_good_parallel_configs():
    c = glue.build_parallel_config(**{**CFG, "devices": "cpu:4", "cfg_degree": 2, "ulysses_degree": 2})
    assert c.parallel.world_size == 4 and c.parallel.strategy == "manual" and c.pool.devices == "cpu:4"
    auto = glue.build_parallel_config(**{**CFG, "devices": "cpu:4", "strategy": "auto"})
    assert auto.parallel.strategy == "auto"     # degrees are chosen per image
    assert glue.validate_parallel_inputs(**{**CFG, "devices": None}) is True   # linked: checked at run time


# ============================================================================ sampler widget validation
@pytest.mark.parametrize("change, words", [
    (dict(steps=0), ["steps is 0", "at least 1 step"]),
    (dict(denoise=1.5), ["denoise is 1.5", "from 0"]),
    (dict(denoise=-0.1), ["denoise is -0.1"]),
    (dict(cfg=float("nan")), ["cfg must be a finite number"]),
    (dict(cfg=-1.0), ["cfg is -1.0"]),
    (dict(sampler_name="uni_pc"), ["'uni_pc' is not implemented", "euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde",
                                   "use KSampler"]),
    (dict(scheduler="warp"), ["scheduler 'warp' is unknown", "karras"]),
])
def test_bad_sampler_inputs_say_what_to_change(change, words):
    vals = dict(steps=20, cfg=6.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    vals.update(change)
    with pytest.raises(JobError) as e:
        glue.check_sampler_inputs(**vals, schedulers=COMFY_SCHEDULERS, comfy_samplers=COMFY_SAMPLERS)
    for w in words:
        assert w in str(e.value)
    if "sampler_name" in change:                    # what the node's validate_inputs checks itself
        assert isinstance(glue.validate_sampler_name(vals["sampler_name"]), str)


def test_sampler_name_mapping():
    assert glue.map_sampler("dpmpp_2m_sde", SAMPLERS) == "dpmpp_2m_sde"
    with pytest.raises(JobError, match="choose one of: euler, euler_ancestral, dpmpp_2m, dpmpp_2m_sde"):
        glue.map_sampler("lms", SAMPLERS)


def test_every_noise_source_names_a_sampler_and_a_noise_the_backend_draws():
    """(The engine's sampler names are ComfyUI's own: checked against ComfyUI's list in
    test_sampling_vs_comfyui.py when COMFYUI_DIR is set.)"""
    from comfyui_xdit_hunyuan.sampling import NOISE_SOURCES, SAMPLERS as REAL
    assert set(NOISE_SOURCES) <= set(REAL)
    assert set(NOISE_SOURCES.values()) <= {None, "default", "brownian_cpu", "brownian_gpu"}


# ============================================================================ conditioning
def hydit_cond(seed=0, batch=1, lb=77, lt=256, extras=None, dim=1024, dim_t5=2048):
    """What CLIPTextEncode returns with the HunyuanDiT text encoders."""
    g = torch.Generator().manual_seed(seed)
    mb = torch.zeros(batch, lb, dtype=torch.long)
    mb[:, :5] = 1
    mt = torch.zeros(batch, lt, dtype=torch.long)
    mt[:, :7] = 1
    ex = {"pooled_output": torch.randn(batch, 1024, generator=g), "attention_mask": mb,
          "conditioning_mt5xl": torch.randn(batch, lt, dim_t5, generator=g), "attention_mask_mt5xl": mt}
    ex.update(extras or {})
    return [[torch.randn(batch, lb, dim, generator=g), ex]]


LATENT_SHAPE = (1, 4, 16, 24)


def test_conditioning_maps_to_the_model_inputs():
    c = hydit_cond(1)
    (e,) = glue.convert_conditioning(c, "positive", LATENT_SHAPE)
    assert torch.equal(e.context, c[0][0]) and torch.equal(e.text_embedding_mask, c[0][1]["attention_mask"])
    assert torch.equal(e.encoder_hidden_states_t5, c[0][1]["conditioning_mt5xl"])
    assert torch.equal(e.text_embedding_mask_t5, c[0][1]["attention_mask_mt5xl"])
    assert e.strength == 1.0
    # image_meta_size as model_base.HunyuanDiT.extra_conds: [[H, W, target H, target W, 0, 0]] from the latent
    assert e.image_meta_size.tolist() == [[128.0, 192.0, 128.0, 192.0, 0.0, 0.0]]


def test_size_extras_override_image_meta_size():
    c = hydit_cond(extras={"width": 1024, "height": 768, "crop_w": 0, "crop_h": 0, "target_width": 2048})
    (e,) = glue.convert_conditioning(c, "positive", LATENT_SHAPE)
    assert e.image_meta_size.tolist() == [[768.0, 1024.0, 768.0, 2048.0, 0.0, 0.0]]


def test_combined_entries_stay_separate_with_their_strengths():
    c = hydit_cond(1, lb=77) + hydit_cond(2, lb=154, extras={"strength": 0.5})
    a, b = glue.convert_conditioning(c, "positive", LATENT_SHAPE)
    assert (a.strength, b.strength) == (1.0, 0.5)
    assert a.context.shape[1] == 77 and b.context.shape[1] == 154       # any prompt length


def test_conditioning_batch_follows_comfyui():
    (e,) = glue.convert_conditioning(hydit_cond(batch=2), "positive", (3, 4, 8, 8))
    assert e.batch() == 3                                  # tiled like comfy.utils.repeat_to_batch_size
    c = hydit_cond(batch=2)
    assert torch.equal(e.context[2], c[0][0][0])
    (e1,) = glue.convert_conditioning(hydit_cond(batch=1), "positive", (3, 4, 8, 8))
    assert e1.batch() == 1                                 # the engine broadcasts batch 1


@pytest.mark.parametrize("extra, words", [
    ({"area": (8, 8, 0, 0)}, ["'area'", "regional prompting"]),
    ({"mask": torch.ones(1, 8, 8)}, ["'mask'", "masked prompting"]),
    ({"start_percent": 0.2, "end_percent": 1.0}, ["'start_percent'", "timestep range"]),
    ({"timestep_start": 5.0}, ["'timestep_start'"]),
    ({"control": object()}, ["'control'", "ControlNet"]),
    ({"gligen": ("position", None, [])}, ["'gligen'", "GLIGEN"]),
    ({"hooks": object()}, ["'hooks'"]),
    ({"my_custom_key": 1}, ["'my_custom_key'", "unknown to this node pack"]),
])
def test_unsupported_extras_are_rejected_by_name(extra, words):
    with pytest.raises(JobError) as e:
        glue.convert_conditioning(hydit_cond(extras=extra), "negative", LATENT_SHAPE)
    msg = str(e.value)
    assert "negative conditioning" in msg and "KSampler" in msg
    for w in words:
        assert w in msg


def test_full_range_timestep_extras_change_nothing_and_pass():
    c = hydit_cond(extras={"start_percent": 0.0, "end_percent": 1.0})
    assert len(glue.convert_conditioning(c, "positive", LATENT_SHAPE)) == 1


def test_conditioning_from_another_text_encoder_is_rejected():
    sdxl = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    with pytest.raises(JobError, match="not encoded with a HunyuanDiT CLIP.*attention_mask, conditioning_mt5xl"):
        glue.convert_conditioning(sdxl, "positive", LATENT_SHAPE)
    with pytest.raises(JobError, match="empty"):
        glue.convert_conditioning([], "positive", LATENT_SHAPE)




def test_concatenated_conditioning_is_rejected():
    c = hydit_cond()
    c[0][0] = torch.cat([c[0][0], c[0][0]], dim=1)        # ConditioningConcat: the mask keeps its length
    with pytest.raises(JobError, match="Conditioning Combine"):
        glue.convert_conditioning(c, "positive", LATENT_SHAPE)


# ============================================================================ latent
def test_latent_checks():
    s = torch.randn(2, 4, 8, 8)
    assert torch.equal(glue.convert_latent({"samples": s}), s)
    assert torch.equal(glue.convert_latent({"samples": s, "noise_mask": torch.ones(1, 64, 64)}), s)
    with pytest.raises(JobError, match="noise mask.*inpainting"):
        glue.convert_latent({"samples": s, "noise_mask": torch.zeros(1, 64, 64)})
    assert glue.convert_latent({"samples": torch.zeros(1, 16, 8, 8)}).shape == (1, 4, 8, 8)   # empty SD3 latent
    with pytest.raises(JobError, match="16 channels"):
        glue.convert_latent({"samples": torch.ones(1, 16, 8, 8)})
    with pytest.raises(JobError, match="not video latents"):
        glue.convert_latent({"samples": torch.zeros(1, 4, 2, 8, 8)})
    with pytest.raises(JobError, match="not a ComfyUI LATENT"):
        glue.convert_latent(torch.zeros(1, 4, 8, 8))


# ============================================================================ MODEL
class ModelSamplingDiscrete:
    pass


class V_PREDICTION:  # noqa: N801 - ComfyUI's class name
    pass


class EPS:
    pass


def _ms(bases=(ModelSamplingDiscrete, V_PREDICTION), linear_end=0.018, zsnr=False):
    cls = type("ModelSampling", bases, {})
    ms = cls()
    ms.sigmas = DiscreteVSampling(linear_end).sigmas.clone()
    ms.linear_end, ms.zsnr, ms.sigma_data = linear_end, zsnr, 1.0
    return ms


class BaseModel:
    pass


class HunyuanDiT(BaseModel):
    pass


class SDXL(BaseModel):
    pass


class FakePatcher:
    """The parts of comfy.model_patcher.ModelPatcher the checks read."""

    def __init__(self, inner, ms=None):
        self.model = inner
        self.model_options = {"transformer_options": {}}
        self.wrappers, self.callbacks, self.object_patches, self.weight_wrapper_patches = {}, {}, {}, {}
        self.injections, self.additional_models, self.patches = {}, {}, {}
        self.patches_uuid = "u1"
        self.load_device = "cpu"
        self._ms = ms or _ms()

    def get_model_object(self, name):
        return self.object_patches.get(name, self._ms)


@pytest.fixture(scope="module")
def tiny_dm():
    return random_model("tiny", seed=0)


def hydit_model(dm):
    inner = HunyuanDiT()
    inner.diffusion_model = dm
    return FakePatcher(inner)


def test_model_checks(tiny_dm):
    m = hydit_model(tiny_dm)
    cfg = glue.check_model(m)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads) == (8, 128, 16)
    sd = SDXL()
    with pytest.raises(JobError, match="the MODEL is SDXL, not HunyuanDiT"):
        glue.check_model(FakePatcher(sd))


@pytest.mark.parametrize("patch, words", [
    (lambda m: m.model_options.update(sampler_cfg_function=lambda a: a), ["sampler_cfg_function", "RescaleCFG"]),
    (lambda m: m.model_options.update(sampler_post_cfg_function=[lambda a: a]), ["sampler_post_cfg_function"]),
    (lambda m: m.model_options["transformer_options"].update(patches={"attn1_patch": [1]}),
     ["transformer_options['patches']"]),
    (lambda m: m.wrappers.update(apply_model={"freeu": [lambda: 0]}), ["'apply_model' wrapper 'freeu'"]),
    (lambda m: m.object_patches.update(diffusion_model=object()), ["object patch of 'diffusion_model'"]),
    (lambda m: m.object_patches.update(model_sampling=_ms(linear_end=0.012)), ["model sampling was changed",
                                                                                 "linear_end 0.012"]),
    (lambda m: m.object_patches.update(model_sampling=_ms(bases=(ModelSamplingDiscrete, EPS))),
     ["ModelSamplingDiscrete + EPS"]),
    (lambda m: m.object_patches.update(model_sampling=_ms(zsnr=True)), ["zsnr"]),
])
def test_model_patches_that_change_the_result_are_rejected(tiny_dm, patch, words):
    m = hydit_model(tiny_dm)
    patch(m)
    with pytest.raises(JobError) as e:
        glue.check_model(m)
    for w in words:
        assert w in str(e.value)


def test_harmless_model_additions_pass(tiny_dm, caplog):
    m = hydit_model(tiny_dm)
    m.wrappers["apply_model"] = {"torch.compile": [lambda: 0]}       # TorchCompileModel: result unchanged
    m.model_options["torch_compile_kwargs"] = {"backend": "inductor"}
    m.object_patches["model_sampling"] = _ms()                       # an identical schedule
    m.patches = {"diffusion_model.blocks.0.attn1.qkv.weight": [(1.0, "lora", 1.0, None, None)]}   # LoRA
    with caplog.at_level(logging.INFO, logger="xdit_hunyuan"):
        assert glue.check_model(m) == glue.check_model(hydit_model(tiny_dm))
    assert "went through TorchCompileModel" in caplog.text


def test_model_identity_follows_patches(tiny_dm):
    a = hydit_model(tiny_dm)
    b = FakePatcher(a.model)                                  # a clone: same base, no patches
    assert glue.model_identity(a) == glue.model_identity(b)
    b.patches, b.patches_uuid = {"k": [1]}, "lora-1"
    assert glue.model_identity(b) != glue.model_identity(a)
    other = hydit_model(tiny_dm)                              # another loaded checkpoint object
    assert glue.model_identity(other) != glue.model_identity(a)


# ============================================================================ the sampler node's flow
class FakeBackend:
    def __init__(self, pool, sigmas=None, interrupted=False):
        self.pool, self._sigmas, self._interrupted = pool, sigmas, interrupted
        self.calls = []

    def noise(self, samples, seed, batch_index):
        return torch.randn(samples.shape, generator=torch.Generator().manual_seed(seed))

    def sampler_names(self):
        return glue.OPTION_SOURCES["samplers"]()

    def scheduler_names(self):
        return glue.OPTION_SOURCES["schedulers"]()

    def sigmas(self, model, steps, sampler_name, scheduler, denoise):
        self.calls.append(("sigmas", steps, sampler_name, scheduler, denoise))
        if self._sigmas is not None:
            return self._sigmas
        return torch.linspace(10.0, 0.0, steps + 1) if denoise > 0 else torch.tensor([])

    def step_noises(self, model, kind, shape, sigmas, seed, steps):
        self.calls.append(("step_noises", kind, steps))
        return [torch.zeros(shape) if i in steps else None for i in range(len(sigmas) - 1)]

    def weights(self, model):
        return WeightsRef(glue.model_identity(model), source={"x": torch.zeros(1)})

    def progress(self, model, total, node_id):
        self.calls.append(("progress", total, node_id))
        return lambda step, total, preview: self.calls.append(("step", step, total))

    def interrupted(self):
        return self._interrupted

    def raise_interrupted(self):
        raise KeyboardInterrupt("comfy interrupt")

    def cache_root(self):
        return "/nonexistent/compile_cache"

    def get_pool(self, config):
        self.calls.append(("pool", config))
        return self.pool


class FakePool:
    def __init__(self, result=None, error=None):
        self.result, self.error, self.jobs = result, error, []
        self.last_stats = {"job_seconds": 1.5, "step_seconds": [0.1, 0.2], "loads": 1,
                           "ranks": [{"device": "cuda:0", "gpu_allocated_bytes": 3 << 30,
                                      "gpu_reserved_bytes": 4 << 30, "gpu_peak_allocated_bytes": 5 << 30},
                                     {"device": "cpu", "rss_bytes": 1 << 30}]}

    def run(self, job, plan, *, on_progress=None, cancel=None, model_config=None):
        assert model_config is not None, "the node passes the model's shape (no re-reading of its weights)"
        self.jobs.append((job, plan))
        on_progress(1, job.steps, None)
        if self.error is not None:
            raise self.error
        return self.result if self.result is not None else job.latent + 1


def run_config(devices: str, **degrees) -> RunConfig:
    return RunConfig(PoolConfig(devices=devices), ParallelConfig(strategy="manual", **degrees))


def _run(backend, tiny_dm, **change):
    latent = {"samples": torch.zeros(1, 4, 8, 8), "batch_index": [0]}
    args = dict(model=hydit_model(tiny_dm), seed=7, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal",
                positive=hydit_cond(1, lb=7, lt=9, dim=64, dim_t5=96),
                negative=hydit_cond(2, lb=7, lt=9, dim=64, dim_t5=96), latent_image=latent, denoise=1.0,
                parallel=run_config("cpu:2", cfg_degree=2))
    args.update(change)
    return glue.run_sampler(*args.values(), node_id="5", backend=backend)


def test_sampler_runs_a_job_and_returns_a_latent_like_ksampler(tiny_dm, caplog):
    pool = FakePool()
    backend = FakeBackend(pool)
    with caplog.at_level(logging.INFO, logger="xdit_hunyuan"):
        out = _run(backend, tiny_dm)
    assert out["batch_index"] == [0] and torch.equal(out["samples"], torch.ones(1, 4, 8, 8))
    (job, plan), = pool.jobs
    assert isinstance(job, Job) and job.sampler == "euler" and job.guidance == 5.0 and job.seed == 7
    assert job.steps == 3 and job.step_noises is None and plan.world_size == 2
    assert torch.equal(job.noise, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)))
    assert ("progress", 3, "5") in backend.calls and ("step", 1, 3) in backend.calls
    assert "rank 0 (cuda:0): allocated 3.00 GiB, reserved 4.00 GiB, peak 5.00 GiB" in caplog.text
    assert "rank 1 (cpu): RSS 1.00 GiB" in caplog.text


def test_sde_sampler_gets_comfyuis_step_noises(tiny_dm):
    pool = FakePool()
    backend = FakeBackend(pool)
    _run(backend, tiny_dm, sampler_name="dpmpp_2m_sde")
    kind = next(c for c in backend.calls if c[0] == "step_noises")
    assert kind[1] == "brownian_cpu" and kind[2] == [0, 1]          # no noise on the last (sigma 0) step
    job = pool.jobs[0][0]
    assert [n is None for n in job.step_noises] == [False, False, True]


def test_denoise_zero_returns_the_input_without_the_pool(tiny_dm):
    pool = FakePool()
    out = _run(FakeBackend(pool), tiny_dm, denoise=0.0)
    assert not pool.jobs and torch.equal(out["samples"], torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("change, exc, words", [
    (dict(steps=0), JobError, ["steps is 0"]),
    (dict(sampler_name="uni_pc"), JobError, ["not implemented by the xDiT workers"]),
    (dict(parallel="cpu:2"), JobError, ["connect an xDiT Parallel Config node"]),
    (dict(parallel=run_config("cpu:3", cfg_degree=2)), PlanError, ["multiply to 2"]),
    (dict(parallel=run_config("cpu:2", ulysses_degree=2),
          latent_image={"samples": torch.zeros(1, 4, 2, 2)}), PlanError, ["1 image tokens"]),
    (dict(positive=[[torch.randn(1, 7, 64), {"pooled_output": None}]]), JobError, ["HunyuanDiT CLIP"]),
    (dict(positive=hydit_cond(lb=7, lt=9)), JobError, ["text widths 1024 (BERT) and 2048 (mT5)",
                                                       "expects 64 and 96"]),
])
def test_bad_input_is_rejected_before_any_pool_work(tiny_dm, change, exc, words):
    pool = FakePool()
    backend = FakeBackend(pool)
    with pytest.raises(exc) as e:
        _run(backend, tiny_dm, **change)
    for w in words:
        assert w in str(e.value)
    assert not pool.jobs and not any(c[0] == "pool" for c in backend.calls)


def test_non_finite_sigmas_are_rejected(tiny_dm):
    with pytest.raises(JobError, match="non-finite sigmas"):
        _run(FakeBackend(FakePool(), sigmas=torch.tensor([float("nan"), 0.0])), tiny_dm, steps=1)


def test_the_engines_words_reach_the_node_in_its_input_names(tiny_dm, caplog, monkeypatch):
    """The engine calls the guidance scale `guidance`; the node's warnings and errors say cfg, KSampler's name."""
    with caplog.at_level(logging.WARNING, logger="xdit_hunyuan"):
        _run(FakeBackend(FakePool()), tiny_dm, cfg=1.0)                 # cfg_degree 2 with no negative pass
    assert "xDiT: cfg is 1.0, so there is no negative-prompt pass: with cfg_degree 2 both halves" in caplog.text
    assert "guidance" not in caplog.text

    from comfyui_xdit_hunyuan.adapter import sampler as flow

    def reject(job, plan, arch):
        raise JobError("{guidance} {value} is not a finite number", field="guidance", value=float("nan"))
    monkeypatch.setattr(flow, "validate_job", reject)
    pool = FakePool()
    with pytest.raises(JobError) as e:
        _run(FakeBackend(pool), tiny_dm)
    assert str(e.value) == "cfg nan is not a finite number" and e.value.field == "guidance" and not pool.jobs


def test_pool_outcomes_become_node_errors(tiny_dm):
    with pytest.raises(KeyboardInterrupt, match="comfy interrupt"):       # ComfyUI's own interrupt
        _run(FakeBackend(FakePool(error=JobCancelled("cancelled before step 2"))), tiny_dm)
    with pytest.raises(PoolError, match="pool failed: rank 1 .* died.*restarted for the next run"):
        _run(FakeBackend(FakePool(error=PoolError("rank 1 (cpu, pid 9) died: SIGKILL"))), tiny_dm)
    with pytest.raises(JobError, match="workers rejected the job: bad latent"):
        _run(FakeBackend(FakePool(error=JobError("bad latent"))), tiny_dm)
    with pytest.raises(PoolError, match="instead of a latent"):
        _run(FakeBackend(FakePool(result=torch.zeros(2, 4, 8, 8))), tiny_dm)


def test_pool_stats_formatting():
    assert glue.format_pool_stats({}) == "no statistics"
    line = glue.format_pool_stats(FakePool().last_stats)
    assert line.startswith("job 1.50 s; 2 steps, 0.150 s/step; weight loads 1; rank 0 (cuda:0)")


# ============================================================================ progress + interrupt (fake comfy)
@pytest.fixture()
def fake_comfy(monkeypatch):
    """comfy.utils.ProgressBar whose hook raises and clears the interrupt flag like ComfyUI's main.py hook,
    comfy.model_management's flag, latent_preview's previewer."""
    mm = types.ModuleType("comfy.model_management")
    mm.flag = False

    class InterruptProcessingException(Exception):
        pass

    def throw():
        if mm.flag:
            mm.flag = False
            raise InterruptProcessingException()

    mm.InterruptProcessingException = InterruptProcessingException
    mm.processing_interrupted = lambda: mm.flag
    mm.interrupt_current_processing = lambda value=True: setattr(mm, "flag", value)
    mm.throw_exception_if_processing_interrupted = throw
    utils = types.ModuleType("comfy.utils")
    updates = []

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total, self.node_id = total, node_id
            self.race = False

        def update_absolute(self, value, total=None, preview=None):
            if self.race:                          # the user presses cancel right now
                mm.flag = True
            throw()
            updates.append((value, total, preview, self.node_id))

    utils.ProgressBar = ProgressBar
    lp = types.ModuleType("latent_preview")
    seen = []

    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            seen.append(tuple(x0.shape))
            return ("JPEG", "image", 512)

    lp.get_previewer = lambda device, fmt: Previewer()
    comfy = types.ModuleType("comfy")
    comfy.utils, comfy.model_management = utils, mm
    for name, mod in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm),
                      ("latent_preview", lp)):
        monkeypatch.setitem(sys.modules, name, mod)
    return mm, updates, seen


def test_progress_updates_comfyuis_bar_with_previews_and_never_swallows_cancel(fake_comfy):
    mm, updates, seen = fake_comfy
    model = types.SimpleNamespace(load_device="cpu", model=types.SimpleNamespace(latent_format=None))
    progress = glue.ComfyProgress(model, 3, "8")
    assert progress.wants_previews
    progress(1, 3, torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert updates == [(1, 3, ("JPEG", "image", 512), "8")] and seen == [(1, 4, 8, 8)]
    backend = glue.ComfyBackend()
    mm.flag = True                                          # cancel pressed: no update, flag kept for cancel()
    progress(2, 3, None)
    assert len(updates) == 1 and backend.interrupted()
    mm.flag = False
    progress.pbar.race = True                               # cancel pressed inside ComfyUI's hook
    progress(2, 3, None)
    assert backend.interrupted(), "the hook cleared the flag; the progress callback must set it again"
    with pytest.raises(mm.InterruptProcessingException):
        backend.raise_interrupted()
    assert not mm.flag


def test_patch_signatures_tell_tensors_apart_also_inference_tensors():
    """A patch's tensors are compared by identity and in-place version; tensors made under inference_mode (as
    ComfyUI's executor makes a LoRA's) have no version counter and are compared by identity alone."""
    from comfyui_xdit_hunyuan.adapter.weights import signature
    a, b = torch.ones(3), torch.ones(3)
    with torch.inference_mode():
        c, d = torch.ones(3), torch.ones(3)
    patch = lambda t: [(1.0, t, 0.5, None, None)]   # noqa: E731 - a ComfyUI patch list entry
    assert signature(patch(a)) == signature(patch(a)) and signature(patch(a)) != signature(patch(b))
    before = signature(patch(a))
    a.add_(1)                                         # in place: a new version
    assert signature(patch(a)) != before
    assert signature(patch(c)) == signature(patch(c)) and signature(patch(c)) != signature(patch(d))
