"""One worker process of the pool: `python -m comfyui_xdit_hunyuan.worker.main --rank R --device D ...`.

Started by PoolClient (worker/client.py) as its own program. Reads the control key from stdin, connects back to
the client, joins the torch.distributed group, builds the runtime and serves jobs until told to stop or
until its parent is gone.

Or started ahead as a spare (worker/spares.py): `... main --spare --device D --parent-pid N --log FILE`
imports, makes its CUDA context and warms up (worker/warmup.py) with its output in FILE, then reads its
command line (a JSON list, one line) and the control key from stdin and goes on as above.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback

from . import protocol
from .processes import EXIT_PARENT_GONE, exit_with_parent, parent_gone

PROCESS_STARTED = time.time()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="xDiT HunyuanDiT pool worker (started by the pool client)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--device", required=True, help="cuda:N or cpu")
    p.add_argument("--family", required=True, choices=("AF_UNIX", "AF_INET"))
    p.add_argument("--address", required=True, help="the client's control socket")
    p.add_argument("--init-method", required=True, help="torch.distributed rendezvous (file:// URL)")
    p.add_argument("--config", required=True, help="config.PoolConfig as JSON")
    p.add_argument("--runtime", default="comfyui_xdit_hunyuan.parallel.runtime:RankRuntime",
                   help="module:Class of the per-rank runtime")
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--pg-timeout", type=float, default=600.0, help="process group timeout, seconds")
    return p.parse_args(argv)


def _read_authkey(size: int) -> bytes:
    """The control key arrives on stdin (never argv or the environment); stdin is then closed."""
    key = sys.stdin.buffer.read(size)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if len(key) != size:
        print("the pool client did not send the control key on stdin; exiting", file=sys.stderr)
        sys.exit(EXIT_PARENT_GONE)
    return key


def _wait_as_spare(argv: list[str]) -> tuple[list[str], dict]:
    """A spare's life until a pool takes it: (the worker command line it was given, what it did meanwhile).
    Exits 0 if its stdin ends first (dismissed)."""
    p = argparse.ArgumentParser(prog="worker --spare")
    p.add_argument("--device", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--log", required=True)
    spare = p.parse_args(argv)
    exit_with_parent(spare.parent_pid)
    saved = [os.dup(1), os.dup(2)]
    out = os.open(spare.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    info: dict = {}
    t = time.perf_counter()
    try:
        import importlib

        import torch
        importlib.import_module(protocol.DEFAULT_RUNTIME.partition(":")[0])    # the default runtime's imports
        info["imports"] = round(time.perf_counter() - t, 3)
        if spare.device.startswith("cuda"):
            t = time.perf_counter()
            torch.cuda.set_device(spare.device)
            torch.empty(1, device=spare.device)
            info["cuda"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            from ..config import PoolConfig
            from .warmup import warm_up
            info["warmup"] = warm_up(PoolConfig(devices=spare.device), spare.device, stop=_stdin_ready)
            info["warmup_seconds"] = round(time.perf_counter() - t, 3)
    except Exception:  # noqa: BLE001 - a failed warm-up leaves a plain worker, whose first job does it all
        traceback.print_exc()
    line = sys.stdin.buffer.readline()
    info["waited"] = round(time.time() - PROCESS_STARTED, 3)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    for fd in saved:
        os.close(fd)
    if not line.strip():
        sys.exit(0)
    given = json.loads(line)
    args = _parse(given)
    if args.device != spare.device or args.parent_pid != spare.parent_pid:
        print(f"a spare for {spare.device} of pid {spare.parent_pid} was given {args.device} of pid "
              f"{args.parent_pid}; exiting", file=sys.stderr)
        sys.exit(EXIT_PARENT_GONE)
    return given, info


def _stdin_ready() -> bool:
    """Whether a pool has written to this spare's stdin (or closed it): the warm-up then stops early."""
    try:
        import select
        return bool(select.select([0], [], [], 0)[0])
    except (OSError, ValueError):
        return False


class Worker:
    """The connection to the client: a receiver thread (jobs, cancel, shutdown; exits the process when
    the connection ends), a heartbeat thread, and the main thread running jobs one at a time."""

    def __init__(self, conn, args: argparse.Namespace, spare: dict | None = None):
        self.p = protocol
        self.conn, self.args, self.rank = conn, args, args.rank
        self._send_lock = threading.Lock()
        self.jobs: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        self.busy = threading.Event()
        self.busy.set()                      # starting up counts as busy
        self._job_id = None
        self.runtime = None
        self._profiled_once = False
        self.start_phases: dict = {}
        self.spare = spare                   # a spare's account of its wait (imports, CUDA, warm-up), or None

    # ------------------------------------------------------------------ channel
    def send(self, msg: dict) -> None:
        msg.setdefault("rank", self.rank)
        with self._send_lock:
            self.p.send(self.conn, msg)

    def _receive(self) -> None:
        p = self.p
        while True:
            try:
                msg = p.recv(self.conn)
            except (EOFError, OSError):
                print("control connection closed: the pool client is gone; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_PARENT_GONE)
            kind = msg.get("type")
            if kind == p.JOB:
                msg["received_wall"] = time.time()
                self._job_id = msg["id"]
                self.cancel.clear()
                self.busy.set()
                self.jobs.put(msg)
            elif kind == p.CANCEL and msg.get("id") == self._job_id:
                self.cancel.set()
            elif kind == p.SHUTDOWN:
                self.jobs.put(msg)

    def _heartbeat(self) -> None:
        while True:
            time.sleep(self.p.HEARTBEAT_S)
            if parent_gone(self.args.parent_pid):
                print("the pool client is gone; exiting", file=sys.stderr, flush=True)
                os._exit(EXIT_PARENT_GONE)
            if self.busy.is_set():
                try:
                    self.send({"type": self.p.HEARTBEAT})
                except OSError:
                    return

    # ------------------------------------------------------------------ life
    def serve(self) -> None:
        threading.Thread(target=self._receive, name="control-receiver", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        t0 = time.perf_counter()
        try:
            self.runtime = self._start_runtime()
        except BaseException as e:  # noqa: BLE001 - every start-up failure goes back to the client
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            self.send({"type": self.p.ERROR, "kind": self.p.ERROR_STARTUP, "cls": type(e).__name__,
                       "message": f"{type(e).__name__}: {e}", "traceback": tb})
            os._exit(1)
        seconds = time.perf_counter() - t0
        print(f"rank {self.rank} ready on {self.args.device} in {seconds:.1f} s", flush=True)
        self.busy.clear()        # before READY: a job may follow it at once and set it again
        self.send({"type": self.p.READY, "pid": os.getpid(), "seconds": seconds})
        while True:
            msg = self.jobs.get()
            if msg["type"] == self.p.SHUTDOWN:
                break
            self._run(msg)
        self._stop()

    def _start_runtime(self):
        import importlib
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        from ..config import PoolConfig

        args = self.args
        device = torch.device(args.device)
        phases, t = {}, time.perf_counter()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.empty(1, device=device)        # the CUDA context, now
        phases["cuda"], t = time.perf_counter() - t, time.perf_counter()
        if args.world_size > 1:              # one worker needs no process group (and saves its start-up)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=args.init_method,
                                    rank=args.rank, world_size=args.world_size,
                                    timeout=timedelta(seconds=args.pg_timeout))
            probe = torch.ones(1, device=device)
            dist.all_reduce(probe)           # every rank can reach every other one (NCCL inits here)
            if probe.item() != args.world_size:
                raise RuntimeError(f"the start-up all_reduce gave {probe.item()}, expected {args.world_size}")
        phases["process_group"], t = time.perf_counter() - t, time.perf_counter()
        module, _, name = args.runtime.partition(":")
        cls = getattr(importlib.import_module(module), name)
        config = PoolConfig(**json.loads(args.config))
        phases["imports"], t = time.perf_counter() - t, time.perf_counter()
        runtime = cls(config, args.rank, args.world_size, args.device)
        phases["runtime"] = time.perf_counter() - t
        self.start_phases = {k: round(v, 3) for k, v in phases.items()}
        if self.spare is not None:
            self.start_phases["spare"] = self.spare
        return runtime

    def _run(self, msg: dict) -> None:
        from ..job import JobCancelled, JobError
        from ..plan import PlanError

        p, job_id = self.p, msg["id"]
        if self.args.device.startswith("cuda"):
            import torch
            torch.cuda.reset_peak_memory_stats(self.args.device)     # the stats report this job's peak
        t0, started_wall = time.perf_counter(), time.time()
        step_seconds: list[float] = []
        last = [t0]

        def report(info: dict) -> None:
            info = {k: _to_cpu(v) for k, v in info.items()}
            info.setdefault("type", p.PROGRESS)
            if info["type"] == p.PROGRESS:
                now = time.perf_counter()
                step_seconds.append(now - last[0])
                last[0] = now
            info["id"] = job_id
            self.send(info)

        out: dict = {"id": job_id}
        try:
            extra = {"eager": True} if msg.get("eager") else {}
            run = lambda: self.runtime.run(msg["job"], msg["plan"], report=report,   # noqa: E731
                                           cancel_requested=self.cancel.is_set, **extra)
            folder = getattr(self.runtime, "pool", None) and self.runtime.pool.profile_dir
            result = self._profiled(run, folder) if folder and not self._profiled_once else run()
            out.update(type=p.DONE, result=_to_cpu(result) if self.rank == 0 else None)
        except JobCancelled as e:
            out.update(type=p.CANCELLED, message=str(e) or "cancelled")
        except (JobError, PlanError) as e:
            out.update(type=p.ERROR, kind=p.ERROR_JOB, cls=type(e).__name__, message=str(e))
        except BaseException as e:  # noqa: BLE001 - reported; the client restarts the pool
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            out.update(type=p.ERROR, kind=p.ERROR_FATAL, cls=type(e).__name__,
                       message=f"{type(e).__name__}: {e}", traceback=tb)
        out["stats"] = self._stats(time.perf_counter() - t0, step_seconds)
        # wall-clock times (one host, one clock), for the client's breakdown of the pool's own overhead
        out["stats"]["wall"] = {"received": msg.get("received_wall"), "started": started_wall,
                                "finished": time.time()}
        self.busy.clear()        # before the answer: the next job's message (which sets it) comes after
        self.send(out)

    def _profiled(self, run, folder: str):
        """run() under cProfile (the first job only, PoolConfig.profile_dir): the 60 functions with the most
        cumulative time, to <folder>/rank<N>.txt."""
        import cProfile
        import io
        import pstats
        self._profiled_once = True
        prof = cProfile.Profile()
        try:
            return prof.runcall(run)
        finally:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{self.args.rank}.txt"), "w") as f:
                f.write(text.getvalue())

    def _stats(self, seconds: float, step_seconds: list[float]) -> dict:
        rt = self.runtime
        stats = {"pid": os.getpid(), "device": self.args.device, "loads": getattr(rt, "loads", None),
                 "job_seconds": seconds, "step_seconds": step_seconds, "rss_bytes": _rss_bytes(),
                 "start_phases": self.start_phases, "process_seconds": time.time() - PROCESS_STARTED}
        if hasattr(rt, "loaded_identity"):
            stats["identity"] = rt.loaded_identity
        try:
            import torch
            if self.args.device.startswith("cuda"):
                dev = torch.device(self.args.device)
                stats.update(gpu_allocated_bytes=torch.cuda.memory_allocated(dev),
                             gpu_reserved_bytes=torch.cuda.memory_reserved(dev),
                             gpu_peak_allocated_bytes=torch.cuda.max_memory_allocated(dev))
            extra = getattr(rt, "stats", None)
            extra = extra() if callable(extra) else extra
            if isinstance(extra, dict):
                stats["runtime"] = extra
        except Exception as e:  # noqa: BLE001 - statistics must never fail a job
            stats["stats_error"] = str(e)
        return stats

    def _stop(self) -> None:
        try:
            close = getattr(self.runtime, "close", None)
            if callable(close):
                close()
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def _to_cpu(value):
    import torch
    return value.detach().to("cpu") if isinstance(value, torch.Tensor) else value


def _rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    spare = None
    if argv[:1] == ["--spare"]:
        argv, spare = _wait_as_spare(argv[1:])
    args = _parse(argv)
    exit_with_parent(args.parent_pid)
    if hasattr(signal, "SIGUSR1"):
        import faulthandler
        faulthandler.register(signal.SIGUSR1, all_threads=True)   # the client asks for stacks of a stall
    from multiprocessing.connection import Client

    authkey = _read_authkey(protocol.AUTHKEY_BYTES)
    conn = Client(protocol.parse_address(args.family, args.address), args.family, authkey=authkey)
    protocol.send(conn, {"type": protocol.HELLO, "rank": args.rank, "pid": os.getpid()})
    Worker(conn, args, spare).serve()


if __name__ == "__main__":
    main()
