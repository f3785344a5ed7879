"""What the command line tells a user about a bad input: the exit codes, UsageError, and the engine's words
about its inputs in this command line's flags.

The engine's errors and warnings (plan.PlanError, the plan.Message warnings of check_job, job.JobError)
carry the input they concern and name inputs as {placeholders}; `in_option_words` renders them with
OPTION_NAMES, so the user reads the flag to change, never an engine field name:

    >>> from comfyui_xdit_hunyuan.plan import PlanError
    >>> e = PlanError("{cfg_degree} must be 1 or 2, got {value}", field="cfg_degree", value=3)
    >>> in_option_words(e)
    '--cfg-degree must be 1 or 2, got 3'
    >>> in_option_words(ValueError("x.safetensors does not exist"))      # other text as it is
    'x.safetensors does not exist'
"""
from __future__ import annotations

from contextlib import contextmanager

PROG = "python -m comfyui_xdit_hunyuan"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# the engine's input names (the `field` and {placeholders} of its messages) -> this command line's flags,
# which are the ComfyUI nodes' input names: xDiT Parallel Config's, and KSampler's for the sampling
OPTION_NAMES = {
    "devices": "--devices", "strategy": "--strategy", "cfg_degree": "--cfg-degree",
    "ulysses_degree": "--ulysses-degree", "ring_degree": "--ring-degree", "pipefusion_degree": "--pipefusion-degree",
    "num_pipeline_patch": "--num-pipeline-patch", "warmup_steps": "--warmup-steps", "attention": "--attention",
    "dtype": "--dtype", "compile": "--compile",
    "seed": "--seed", "steps": "--steps", "guidance": "--cfg", "sampler": "--sampler-name",
    "sampler_name": "--sampler-name", "scheduler": "--scheduler",
}


class UsageError(Exception):
    """A bad option or input: reported with exit code 2, before any worker starts where it can be checked
    then. The message names the flag and says what to change."""


def in_option_words(message) -> str:
    """An engine message (a plan.Message: PlanError, a plan warning, JobError) in this command line's
    flags; other text as it is."""
    render = getattr(message, "render", None)
    return render(OPTION_NAMES) if render is not None else str(message)


@contextmanager
def checking():
    """Turn the engine's input errors into UsageError (exit code 2), worded as this command line's flags."""
    from comfyui_xdit_hunyuan.job import JobError
    from comfyui_xdit_hunyuan.plan import PlanError

    try:
        yield
    except (PlanError, JobError, ValueError) as e:
        raise UsageError(in_option_words(e)) from e
