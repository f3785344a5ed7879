"""The ComfyUI adapter: what the two nodes (nodes.py) do, importable and testable without ComfyUI (ComfyUI's
modules are imported lazily, in backend.py, progress.py and weights.py). It converts ComfyUI's objects into
the engine's job and names what it cannot use; the job's own checks are the engine's (checks.validate_job).

    inputs        node ids and every input, declared once; the engine's names that differ from them
    config_node   the config node: widgets -> RunConfig
    samplers      sampler / scheduler names and the sampler node's widgets
    conditioning  CONDITIONING -> CondEntry
    latent        LATENT -> latent samples
    model         MODEL -> the HunyuanDiT architecture, patches that cannot be reproduced rejected
    weights       the MODEL's weights as KSampler runs them, and their identity
    backend       every call into ComfyUI (a seam the tests fake)
    progress      ComfyUI's progress bar and previews
    sampler       the sampler node's flow
    stats         the pool's statistics as a log line
"""
from .backend import ComfyBackend
from .conditioning import HUNYUAN_KEYS, IGNORED_KEYS, UNSUPPORTED_KEYS, convert_conditioning
from .config_node import build_parallel_config, check_declared, validate_parallel_inputs
from .inputs import (CATEGORY, CONFIG_DESCRIPTION, CONFIG_DISPLAY_NAME, CONFIG_INPUTS, CONFIG_NODE_ID,
                     CONFIG_OUTPUT_TOOLTIP, ENGINE_NAMES, OPTION_SOURCES, PARALLEL_TYPE, SAMPLER_DESCRIPTION,
                     SAMPLER_DISPLAY_NAME, SAMPLER_INPUTS, SAMPLER_NODE_ID, SAMPLER_OUTPUT_TOOLTIP, InputSpec,
                     in_input_words, resolve_options)
from .latent import convert_latent
from .model import check_model, check_model_sampling, model_kind
from .progress import ComfyProgress
from .sampler import Prepared, build_job, prepare, run_sampler, start_spare_workers
from .samplers import check_sampler_inputs, map_sampler, noise_plan, validate_sampler_name
from .stats import format_pool_stats
from .weights import PatchedStateDict, comfy_patched_keys, model_identity

__all__ = [
    "ComfyBackend", "HUNYUAN_KEYS", "IGNORED_KEYS", "UNSUPPORTED_KEYS", "convert_conditioning",
    "build_parallel_config", "check_declared", "validate_parallel_inputs",
    "CATEGORY", "CONFIG_DESCRIPTION", "CONFIG_DISPLAY_NAME", "CONFIG_INPUTS", "CONFIG_NODE_ID", "CONFIG_OUTPUT_TOOLTIP",
    "ENGINE_NAMES", "OPTION_SOURCES", "PARALLEL_TYPE", "SAMPLER_DESCRIPTION", "SAMPLER_DISPLAY_NAME", "SAMPLER_INPUTS",
    "SAMPLER_NODE_ID", "SAMPLER_OUTPUT_TOOLTIP", "InputSpec", "in_input_words", "resolve_options", "convert_latent",
    "check_model", "check_model_sampling", "model_kind", "ComfyProgress", "Prepared", "build_job", "prepare",
    "run_sampler", "start_spare_workers", "check_sampler_inputs", "map_sampler", "noise_plan", "validate_sampler_name",
    "format_pool_stats", "PatchedStateDict", "comfy_patched_keys", "model_identity",
]
