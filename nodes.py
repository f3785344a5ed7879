"""The pack's two ComfyUI nodes (V3 schema, API pinned to comfy_api v0_0_2). Declarations only: the
inputs are declared once in comfyui_xdit_hunyuan.comfy_glue (CONFIG_INPUTS, SAMPLER_INPUTS) and the
work is done there. Imported by ComfyUI through the pack's comfy_entrypoint, never by name: ComfyUI
has a top-level module called `nodes` of its own.
"""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from comfyui_xdit_hunyuan import comfy_glue as glue

XDiTParallel = io.Custom(glue.PARALLEL_TYPE)

_SOCKETS = {"MODEL": io.Model, "CONDITIONING": io.Conditioning, "LATENT": io.Latent,
            glue.PARALLEL_TYPE: XDiTParallel}


def _input(spec: glue.InputSpec):
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
        return io.Combo.Input(spec.name, options=glue.resolve_options(spec), default=spec.default, tooltip=tip)
    return _SOCKETS[k].Input(spec.name, tooltip=tip)


class XDiTParallelConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id=glue.CONFIG_NODE_ID, display_name=glue.CONFIG_DISPLAY_NAME,
                         category=glue.CATEGORY, description=glue.CONFIG_DESCRIPTION,
                         inputs=[_input(s) for s in glue.CONFIG_INPUTS],
                         outputs=[XDiTParallel.Output(tooltip=glue.CONFIG_OUTPUT_TOOLTIP)])

    @classmethod
    def validate_inputs(cls, devices, strategy, cfg_degree, ulysses_degree, ring_degree, pipefusion_degree,
                        num_pipeline_patch, warmup_steps, attention, dtype, compile) -> bool | str:
        return glue.validate_parallel_inputs(
            devices=devices, strategy=strategy, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree,
            ring_degree=ring_degree, pipefusion_degree=pipefusion_degree, num_pipeline_patch=num_pipeline_patch,
            warmup_steps=warmup_steps, attention=attention, dtype=dtype, compile=compile)

    @classmethod
    def execute(cls, devices, strategy, cfg_degree, ulysses_degree, ring_degree, pipefusion_degree,
                num_pipeline_patch, warmup_steps, attention, dtype, compile) -> io.NodeOutput:
        return io.NodeOutput(glue.build_parallel_config(
            devices=devices, strategy=strategy, cfg_degree=cfg_degree, ulysses_degree=ulysses_degree,
            ring_degree=ring_degree, pipefusion_degree=pipefusion_degree, num_pipeline_patch=num_pipeline_patch,
            warmup_steps=warmup_steps, attention=attention, dtype=dtype, compile=compile))


class XDiTHunyuanDiTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(node_id=glue.SAMPLER_NODE_ID, display_name=glue.SAMPLER_DISPLAY_NAME,
                         category=glue.CATEGORY, description=glue.SAMPLER_DESCRIPTION,
                         inputs=[_input(s) for s in glue.SAMPLER_INPUTS],
                         outputs=[io.Latent.Output(tooltip=glue.SAMPLER_OUTPUT_TOOLTIP)],
                         hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, sampler_name) -> bool | str:
        return glue.validate_sampler_name(sampler_name)

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, parallel) -> io.NodeOutput:
        node_id = getattr(cls.hidden, "unique_id", None) if cls.hidden is not None else None
        return io.NodeOutput(glue.run_sampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                              latent_image, denoise, parallel, node_id=node_id))


class XDiTHunyuanExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [XDiTParallelConfig, XDiTHunyuanDiTSampler]
