"""The worker pool: `client` runs in ComfyUI's process and owns one worker process per device;
`main` is the worker program; `protocol` is what they say to each other; `processes` starts
and kills worker processes."""
from .client import PoolClient, get_pool, shutdown_all

__all__ = ["PoolClient", "get_pool", "shutdown_all"]
