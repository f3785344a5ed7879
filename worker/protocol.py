"""What the pool client and its worker processes say to each other, and the environment workers get.

Transport: one `multiprocessing.connection` connection per worker, authenticated in both directions by
the HMAC challenge of a random 32-byte key before anything is read. Messages are dicts, pickled with the
plain pickler (never multiprocessing's ForkingPickler, which would turn CPU tensors into shared-memory
handles that an unrelated process cannot open) and sent as bytes.

Client -> worker
    job       {id, job: Job, plan: ParallelConfig, eager} every rank gets the whole job; eager: run it without
                                                          compiling (a helper compiles meanwhile: background.py)
    cancel    {id}                                        sets the flag the runtime's cancel_requested reads
    shutdown  {}                                          finish, leave the process group, exit 0
Worker -> client
    hello     {rank, pid}                                 first message after the handshake
    ready     {rank, pid, seconds}                        process group and runtime are up
    heartbeat {rank}                                      every HEARTBEAT_S while starting or running a job
    progress  {id, rank, step, total, preview}            rank 0, after each step (preview: tensor or None)
    loaded    {id, rank, ...}                             a rank finished loading the job's weights
    done      {id, rank, result, stats}                   result: CPU latent on rank 0, None elsewhere
    cancelled {id, rank, message, stats}
    error     {id, rank, kind, cls, message, traceback, stats}
              kind "job": JobError/PlanError raised before any collective, the pool stays usable;
              kind "fatal": anything else, the pool is restarted; kind "startup": the worker could not start.
"""
from __future__ import annotations

import os
import pickle
import sys
from multiprocessing.connection import Connection, Listener
from typing import Mapping

# client -> worker
JOB, CANCEL, SHUTDOWN = "job", "cancel", "shutdown"
# worker -> client
HELLO, READY, HEARTBEAT, PROGRESS, LOADED, DONE, CANCELLED, ERROR = (
    "hello", "ready", "heartbeat", "progress", "loaded", "done", "cancelled", "error")
TERMINAL = (DONE, CANCELLED, ERROR)
ERROR_JOB, ERROR_FATAL, ERROR_STARTUP = "job", "fatal", "startup"

AUTHKEY_BYTES = 32
# `python -P`: the worker's sys.path does not start with the caller's working directory (ComfyUI's own
# folder, say), so no stray module there shadows one the worker imports (Python 3.11+)
ISOLATE_CWD = ("-P",) if sys.version_info >= (3, 11) else ()
HEARTBEAT_S = 1.0
DEFAULT_RUNTIME = "comfyui_xdit_hunyuan.parallel.runtime:RankRuntime"

ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
# NVLink multicast (NVLS) must stay off: the pool's collectives must not depend on it.
FORCED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
              "PYTHONUNBUFFERED": "1"}
LOOPBACK_IFNAME = {"linux": "lo", "darwin": "lo0"}


# ---------------------------------------------------------------------- messages
def send(conn: Connection, msg: dict) -> None:
    conn.send_bytes(dumps(msg))


def dumps(msg: dict) -> bytes:
    """A message pickled once, for conn.send_bytes (the same job goes to every rank)."""
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def recv(conn: Connection) -> dict:
    """The next message; only ever called on connections that passed the key handshake."""
    return pickle.loads(conn.recv_bytes())


# ---------------------------------------------------------------------- control channel
def control_listener(private_dir: str, authkey: bytes) -> Listener:
    """A listener only local processes that hold `authkey` can talk to: a Unix socket inside the
    caller's private (0700) directory where the OS has them, else TCP on 127.0.0.1."""
    if sys.platform != "win32":
        return Listener(os.path.join(private_dir, "control.sock"), "AF_UNIX", backlog=64, authkey=authkey)
    return Listener(("127.0.0.1", 0), "AF_INET", backlog=64, authkey=authkey)


def format_address(listener: Listener) -> tuple[str, str]:
    """(family, address) for a worker's command line."""
    if isinstance(listener.address, tuple):
        host, port = listener.address
        return "AF_INET", f"{host}:{port}"
    return "AF_UNIX", listener.address


def parse_address(family: str, address: str):
    if family == "AF_INET":
        host, port = address.rsplit(":", 1)
        return host, int(port)
    return address


# ---------------------------------------------------------------------- environment
def strip_cuda_malloc_async(value: str) -> str:
    """An allocator setting without `backend:cudaMallocAsync` (it breaks NCCL); other options stay."""
    kept = []
    for item in value.split(","):
        key, _, val = item.partition(":")
        if not item.strip():
            continue
        if key.strip().lower() == "backend" and val.strip().lower() == "cudamallocasync":
            continue
        kept.append(item.strip())
    return ",".join(kept)


def worker_env(base: Mapping[str, str], device: str, world_size: int,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one worker: the parent's, minus cudaMallocAsync, NVLink multicast off,
    unbuffered output, collectives on the loopback interface, and a fair share of CPU threads for
    CPU workers (unless the user set OMP_NUM_THREADS); `extra` on top (the compile caches' folders)."""
    env = dict(base)
    env.update(extra or {})
    for var in ALLOC_CONF_VARS:
        if var in env:
            cleaned = strip_cuda_malloc_async(env[var])
            if cleaned:
                env[var] = cleaned
            else:
                del env[var]
    env.update(FORCED_ENV)
    ifname = LOOPBACK_IFNAME.get(sys.platform)
    if ifname:
        env.setdefault("GLOO_SOCKET_IFNAME", ifname)
        env.setdefault("NCCL_SOCKET_IFNAME", ifname)
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // world_size)))
    return env


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
