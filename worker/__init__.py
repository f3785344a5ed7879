"""The worker pool: `client` runs in ComfyUI's process and owns one worker process per device;
`main` is the worker program; `protocol` is what they say to each other; `processes` starts
and kills worker processes; `weights` decides which tensors a job sends, `staging` how they travel;
`registry` holds the process's pools."""
from .client import PoolClient, get_pool
from .registry import shutdown_all

__all__ = ["PoolClient", "get_pool", "shutdown_all"]
