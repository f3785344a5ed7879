"""The pack's two ComfyUI nodes (V3 schema, API pinned to comfy_api v0_0_2). Declarations only: the
inputs are declared once in comfyui_xdit_hunyuan.adapter (CONFIG_INPUTS, SAMPLER_INPUTS) and the
work is done there. Imported by ComfyUI through the pack's comfy_entrypoint, never by name: ComfyUI
has a top-level module called `nodes` of its own.
"""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from comfyui_xdit_hunyuan import adapter

XDiTParallel = io.Custom(adapter.PARALLEL_TYPE)

_SOCKETS = {"MODEL": io.Model, "CONDITIONING": io.Conditioning, "LATENT": io.Latent,
            adapter.PARALLEL_TYPE: XDiTParallel}


def _input(spec: adapter.InputSpec):
    k, tip = spec.kind, spec.tooltip
    if k == "INT":
        return io.Int.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                            control_after_generate=spec.control_after_generate or None, tooltip=tip)
    if k == "FLOAT":
        return io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                              round=spec.round, tooltip=tip)
    if k == "STRING":
        return io.String.Input(spec.name, default=spec.default, tooltip=tip)
    if k == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, tooltip=tip)
    if k == "COMBO":
        return io.Combo.Input(spec.name, options=adapter.resolve_options(spec), default=spec.default, tooltip=tip)
    return _SOCKETS[k].Input(spec.name, tooltip=tip)


class XDiTParallelConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id=adapter.CONFIG_NODE_ID, display_name=adapter.CONFIG_DISPLAY_NAME,
                         category=adapter.CATEGORY, description=adapter.CONFIG_DESCRIPTION,
                         inputs=[_input(s) for s in adapter.CONFIG_INPUTS],
                         outputs=[XDiTParallel.Output(tooltip=adapter.CONFIG_OUTPUT_TOOLTIP)])

    @classmethod
    def validate_inputs(cls, devices, strategy, cfg_degree, ulysses_degree, ring_degree, pipefusion_degree,
                        num_pipeline_patch, warmup_steps, attention, dtype, compile) -> bool | str:
        return adapter.validate_parallel_inputs(
            devices=devices, strategy=strategy, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree,
            ring_degree=ring_degree, pipefusion_degree=pipefusion_degree, num_pipeline_patch=num_pipeline_patch,
            warmup_steps=warmup_steps, attention=attention, dtype=dtype, compile=compile)

    @classmethod
    def execute(cls, devices, strategy, cfg_degree, ulysses_degree, ring_degree, pipefusion_degree,
                num_pipeline_patch, warmup_steps, attention, dtype, compile) -> io.NodeOutput:
        return io.NodeOutput(adapter.build_parallel_config(
            devices=devices, strategy=strategy, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree,
            ring_degree=ring_degree, pipefusion_degree=pipefusion_degree, num_pipeline_patch=num_pipeline_patch,
            warmup_steps=warmup_steps, attention=attention, dtype=dtype, compile=compile))


class XDiTHunyuanDiTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id=adapter.SAMPLER_NODE_ID, display_name=adapter.SAMPLER_DISPLAY_NAME,
                         category=adapter.CATEGORY, description=adapter.SAMPLER_DESCRIPTION,
                         inputs=[_input(s) for s in adapter.SAMPLER_INPUTS],
                         outputs=[io.Latent.Output(tooltip=adapter.SAMPLER_OUTPUT_TOOLTIP)],
                         hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, sampler_name) -> bool | str:
        return adapter.validate_sampler_name(sampler_name)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, parallel) -> io.NodeOutput:
        node_id = getattr(cls.hidden, "unique_id", None) if cls.hidden is not None else None
        return io.NodeOutput(adapter.run_sampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent_image, denoise, parallel, node_id=node_id))


class XDiTHunyuanExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [XDiTParallelConfig, XDiTHunyuanDiTSampler]
