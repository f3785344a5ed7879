"""The pool client: lives in ComfyUI's process and owns one worker process per device.

    pool = get_pool(pool_config)                  # reused while pool_config.key() stays the same
    latent = pool.run(job, plan, on_progress=..., cancel=...)   # plan: this job's degrees

Faults never hang the caller: a worker that exits, stops answering or raises something other than a
JobError becomes a PoolError naming the rank, its device and its own last words; every worker is then
killed and the next run() starts a fresh pool. See worker/protocol.py for the messages.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from multiprocessing.connection import AuthenticationError, Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Callable

import torch

from ..job import Job, JobCancelled, JobError, PoolError, WeightsRef
from .. import compile_cache
from ..config import PoolConfig, parse_devices
from ..plan import ParallelConfig, PlanError

from . import protocol as P
from .processes import describe_exit, kill_group, own_process_group, private_dir, spawn, sweep_stale_dirs
from .registry import _clients, close_pools, close_pools_on_sigterm, current_or_new, shutdown_all
from .background import BackgroundCompile
from .spares import assign, spares
from .staging import JobStaging
from .weights import HeldWeights

__all__ = ["PoolClient", "get_pool", "start_spares", "close_pools", "shutdown_all",
           "close_pools_on_sigterm"]   # the last three: the registry's

WORKER_MODULE = __package__ + ".main"     # run as `python -m`: the pack's own modules, never another `worker`
POLL_S = 0.05            # how often run() looks at cancel(), exits and heartbeats
SETTLE_S = 10.0          # after one rank rejects a job (JobError), how long (at most hang_timeout) the
                         # others get to do the same before the pool counts as stuck
FAULT_GRACE_S = 0.5      # after a fault, how long to look for a dead rank that caused it
SHUTDOWN_GRACE_S = 5.0   # close(): how long workers get to exit on their own before SIGKILL
TAIL_LINES = 80

ProgressFn = Callable[[int, int, "torch.Tensor | None"], None]


@dataclass(eq=False)
class _Worker:
    rank: int
    device: str
    proc: subprocess.Popen
    log_path: Path
    pid: int = 0
    conn: Connection | None = None
    ready: bool = False
    last_seen: float = 0.0
    last_error: dict | None = None                  # its last "error" message
    send_error: OSError | None = None
    killed: bool = False
    tail: deque = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    outbox: queue.Queue = field(default_factory=queue.Queue)
    threads: list = field(default_factory=list)

    def name(self) -> str:
        return f"rank {self.rank} ({self.device}, pid {self.pid})"


class PoolClient:
    """A warm pool of worker processes, one per device of `config.devices` (a config.PoolConfig). Each job
    brings its own degrees (plan.ParallelConfig): a change of degrees reuses the same processes.

    startup_timeout: seconds the workers get to start (import, process group, runtime; GPU compile can
    be slow). hang_timeout: seconds a worker may stay silent during a job (heartbeats come every
    second) before it counts as hung. python: the interpreter for the workers. runtime: the per-rank
    runtime class as "module:Class" (tests use a fake). log: where the workers' output goes.
    """

    def __init__(self, config: PoolConfig, *, startup_timeout: float = 600.0, hang_timeout: float = 60.0,
                 python: str = sys.executable, log: logging.Logger | None = None,
                 runtime: str = P.DEFAULT_RUNTIME):
        self.config = config
        self.startup_timeout, self.hang_timeout = float(startup_timeout), float(hang_timeout)
        self.python, self.runtime = python, runtime
        self.log = log or logging.getLogger("comfyui_xdit_hunyuan.pool")
        self.last_stats: dict = {}
        self._wall: dict = {}              # wall-clock marks of the current job (overhead breakdown)
        self._workers: list[_Worker] = []
        self._devices: list[str] | None = None
        self._tmp: str | None = None
        self._stage_dir: str | None = None   # staged weights: memory-backed (/dev/shm) where there is one
        self._listener = None
        self._accept_stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._accepted: queue.Queue = queue.Queue()
        self._background = BackgroundCompile(config, [], None, "", python, {}, self.log)   # made per start
        self._worker_envs: dict[str, dict[str, str]] = {}    # per spare slot: a worker's environment
        self.spares_taken = 0                # workers of the last start that were spares
        self._replenish = False              # spares to start after this start's first job
        self._weights = HeldWeights(keep_bytes=int(config.keep_weights_gib * (1 << 30)), itemsize=self._itemsize())
        self._model_configs: dict = {}       # weights identity -> HunyuanDiTConfig (for job checks)
        self._job_id = 0
        self._lock = threading.RLock()
        _clients.add(self)

    # ------------------------------------------------------------------ state
    @property
    def jobs_sent(self) -> int:
        """Jobs that reached the workers (rejected jobs never do)."""
        return self._job_id

    @property
    def alive(self) -> bool:
        return bool(self._workers) and all(w.ready and w.proc.poll() is None for w in self._workers)

    @property
    def devices(self) -> list[str]:
        return list(self._devices) if self._devices is not None else parse_devices(self.config.devices)

    def _itemsize(self) -> int:
        """Bytes per weight element in the workers (what their kept tensors cost)."""
        dtype = self.config.dtype
        if dtype == "auto":
            dtype = "bf16" if any(d.startswith("cuda") for d in self.devices) else "fp32"
        return 4 if dtype == "fp32" else 2

    @property
    def _compiles(self) -> bool:
        """GPU workers compile (CPU workers run eager)."""
        return self.config.compile and any(d.startswith("cuda") for d in self.devices)

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    @property
    def control_address(self):
        """Where the control listener accepts workers (only while the pool starts), else None."""
        return self._listener.address if self._listener is not None else None

    @property
    def temp_dir(self) -> str | None:
        return self._tmp

    @property
    def stage_dir(self) -> str | None:
        """Where weights for the workers are staged (memory-backed /dev/shm where there is one)."""
        return self._stage_dir

    def __enter__(self) -> "PoolClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ start
    def start(self) -> "PoolClient":
        """Start the workers (no-op when alive); raises PoolError with the worker's words on failure."""
        with self._lock:
            if self.alive:
                return self
            self._begin_start()
            self._finish_start()
            return self

    def _begin_start(self) -> None:
        """Launch the workers without waiting for them (the caller may prepare the job meanwhile)."""
        self._teardown()
        self._devices = parse_devices(self.config.devices)
        try:
            self._spawn(self._devices)
        except BaseException:
            self._teardown()
            raise

    def _finish_start(self) -> None:
        """Wait until every worker launched by _begin_start is ready."""
        try:
            self._wait_ready()
        except BaseException:
            self._teardown()
            raise
        self._close_listener()
        self.log.info("xDiT pool ready: %d worker(s) on %s, pids %s", len(self._workers),
                      ", ".join(self._devices), self.pids)

    def _spawn(self, devices: list[str]) -> None:
        sweep_stale_dirs()
        self._tmp = private_dir()                                  # private: mode 0700
        self._stage_dir = private_dir(memory=True)
        authkey = os.urandom(P.AUTHKEY_BYTES)
        self._listener = P.control_listener(self._tmp, authkey)
        family, address = P.format_address(self._listener)
        self._accept_stop = threading.Event()      # one per start: an old accept thread keeps its own
        self._accepted = queue.Queue()
        self._accept_thread = threading.Thread(target=self._accept, name="xdit-pool-accept", daemon=True,
                                               args=(self._listener, len(devices), self._accepted,
                                                     self._accept_stop))
        self._accept_thread.start()
        world = len(devices)
        cache_folder, cache_env = cache_environment(self.config, self.log)
        self._background = BackgroundCompile(self.config, devices, cache_folder, self._tmp, self.python, cache_env,
                                             self.log)
        common = ["--world-size", str(world), "--family", family, "--address", address,
                  "--init-method", Path(self._tmp, "rendezvous").as_uri(),
                  "--config", json.dumps(self.config.to_dict()), "--runtime", self.runtime,
                  "--parent-pid", str(os.getpid()), "--pg-timeout", str(max(60.0, self.startup_timeout))]
        self._worker_envs = worker_environments(devices, cache_env)
        self.spares_taken = 0
        self._replenish = uses_spares(self.config, devices)      # take spares now, start new ones after a job
        for rank, (device, (slot, env)) in enumerate(zip(devices, self._worker_envs.items())):
            argv = ["--rank", str(rank), "--device", device, *common]
            proc = spares.take(self.python, slot, env) if self._replenish else None
            if proc is not None:
                try:
                    assign(proc, argv, authkey)      # the key goes through the stdin pipe only
                    self.spares_taken += 1
                except OSError:
                    kill_group(proc)                 # it died meanwhile: a fresh worker instead
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                    proc = None
            if proc is None:
                try:
                    proc = spawn([self.python, *P.ISOLATE_CWD, "-m", WORKER_MODULE, *argv], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **own_process_group())
                except OSError as e:
                    raise PoolError(f"could not start a worker process with the interpreter '{self.python}': "
                                    f"{e}; pass python= an interpreter that has torch installed") from e
                try:                  # the key goes through the stdin pipe only, then stdin is closed
                    proc.stdin.write(authkey)
                    proc.stdin.close()
                except OSError:
                    pass              # it died already; the start-up loop reports its output
            w = _Worker(rank, device, proc, Path(self._tmp, f"rank{rank}.log"), pid=proc.pid)
            self._workers.append(w)
            for target, name in ((self._pump_output, "output"), (self._send_loop, "sender")):
                t = threading.Thread(target=target, args=(w,), name=f"xdit-pool-{name}-{rank}", daemon=True)
                t.start()
                w.threads.append(t)

    def _accept(self, listener, expected: int, out: queue.Queue, stop: threading.Event) -> None:
        """Accept `expected` authenticated workers; each must say hello right after the handshake."""
        accepted = 0
        while accepted < expected and not stop.is_set():
            try:
                conn = listener.accept()      # HMAC challenge both ways before anything is unpickled
            except AuthenticationError:
                self.log.warning("xDiT pool: refused a connection to the control socket that did not "
                                 "know the pool's key")
                continue
            except (OSError, EOFError):
                if stop.wait(POLL_S):
                    return
                continue
            if stop.is_set():
                conn.close()
                return
            try:
                hello = P.recv(conn) if conn.poll(10.0) else None
            except Exception:  # noqa: BLE001 - an authenticated peer that says nothing useful
                hello = None
            if not isinstance(hello, dict) or hello.get("type") != P.HELLO:
                conn.close()
                continue
            out.put((hello, conn))
            accepted += 1

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not all(w.ready for w in self._workers):
            self._adopt_connections()
            for w, msg in self._poll():
                if msg["type"] == P.READY:
                    w.ready = True
                elif msg["type"] == P.ERROR:
                    raise self._fault(w, "failed to start")
            if time.monotonic() > deadline:
                late = next(w for w in self._workers if not w.ready)
                stage = "connect back" if late.conn is None else "finish starting"
                raise self._fault(late, f"did not {stage} within startup_timeout ({self.startup_timeout:g} s)")

    def _adopt_connections(self) -> None:
        while True:
            try:
                hello, conn = self._accepted.get_nowait()
            except queue.Empty:
                return
            rank = hello.get("rank")
            if not isinstance(rank, int) or not 0 <= rank < len(self._workers) or \
                    self._workers[rank].conn is not None:
                self.log.warning("xDiT pool: ignoring a worker connection that claims rank %r", rank)
                conn.close()
                continue
            w = self._workers[rank]
            w.conn, w.pid, w.last_seen = conn, int(hello.get("pid") or w.pid), time.monotonic()

    def _close_listener(self) -> None:
        """Stop accepting connections: after start-up nobody may connect any more."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._accept_stop.set()
        if self._accept_thread is not None and self._accept_thread.is_alive():
            try:                      # wake the accept() still waiting for a worker that never came
                family = socket.AF_INET if isinstance(listener.address, tuple) else socket.AF_UNIX
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(1.0)
                    s.connect(listener.address)
            except OSError:
                pass
            self._accept_thread.join(timeout=1.0)
        try:
            listener.close()
        except OSError:
            pass

    # ------------------------------------------------------------------ run
    def run(self, job: Job, plan: ParallelConfig, *, on_progress: ProgressFn | None = None,
            cancel: Callable[[], bool] | None = None, model_config=None) -> torch.Tensor:
        """Run one job on every rank; returns rank 0's final latent (CPU float32).

        on_progress(step, total, preview) is called after each step (preview: a small x0 tensor or
        None); if it raises, the job is cancelled on every rank and the exception re-raised.
        cancel() is polled every POLL_S seconds; when it returns True every rank stops at the same
        step and JobCancelled is raised. JobError: the job was rejected, the pool stays warm.
        PoolError: the pool failed and was stopped; the next run() starts a fresh one.

        Jobs for the engine's runtime are checked first (checks.validate_job, against `model_config` or
        the shape read from the weights source), so a bad job never reaches a worker.
        """
        submitted = time.time()
        if self.runtime == P.DEFAULT_RUNTIME:
            for warning in self._validate(job, plan, model_config):
                self.log.warning(warning)
        checked = time.time()
        with self._lock:
            if plan.world_size != len(self.devices):
                raise PlanError(f"the plan's degrees multiply to {plan.world_size} but the pool has "
                                f"{len(self.devices)} worker(s) on {', '.join(self.devices)}; resolve the "
                                f"plan for this pool's devices")
            self._wall = {"submitted": submitted, "checked": checked, "answers": {}}
            starting = not self._idle_and_healthy()
            t_start = time.perf_counter()
            if starting:                      # the workers start while the weights are staged
                self._begin_start()
            self._job_id += 1
            staged = JobStaging(self.devices, self.config.weights_transfer, self._stage_dir, self._job_id,
                                self.log)
            try:
                wire = self._wire_job(job, staged)
                if starting:
                    t0 = time.perf_counter()
                    self._finish_start()
                    self._wall["start_wait_seconds"] = time.perf_counter() - t0
                    self._wall["start_seconds"] = time.perf_counter() - t_start
                arch = self._model_configs.get(job.weights.identity)
                eager = self._background.eager(job, plan, arch) if arch is not None else False
                out = self._run(self._job_id, wire, plan, staged, on_progress, cancel, eager=eager)
                rank0 = (self.last_stats.get("ranks") or [{}])[0].get("runtime") or {}
                if arch is not None and rank0.get("compiled"):
                    self._background.workers_compiled(job, plan, arch)
                self.last_stats["eager"] = eager
                self.last_stats["spares_taken"] = self.spares_taken
                if self._replenish:           # after a start's first job: spares for the next pool
                    self._replenish = False
                    spares.start(self.python, self._worker_envs)
                return out
            except BaseException:
                if starting and not self.alive:
                    self._teardown()
                raise
            finally:
                staged.release()              # GPU tensors: the workers hold their own copies now

    def _run(self, job_id: int, job: Job, plan: ParallelConfig, staged: JobStaging,
             on_progress: ProgressFn | None, cancel: Callable[[], bool] | None, *, eager: bool = False
             ) -> torch.Tensor:
        outcome: dict[int, dict] = {}
        loaded: set[int] = set()
        interrupt: BaseException | None = None
        cancelling, settle_deadline = False, None
        t0 = time.perf_counter()
        # Stall watchdog: heartbeats come from a side thread, so a rank stuck in a collective still looks
        # alive. A job must report its first step within startup_timeout (weights, compilation) and then
        # each step within max(hang_timeout, 20 x the slowest step so far) (startup_timeout when compiling).
        last_step, slowest, steps_seen = time.monotonic(), 0.0, 0
        data = P.dumps({"type": P.JOB, "id": job_id, "job": job, "plan": plan, "eager": eager})
        for w in self._workers:
            w.last_seen = time.monotonic()
            w.outbox.put(data)
        self._wall["sent"] = time.time()
        try:
            while len(outcome) < len(self._workers):
                busy = [w for w in self._workers if w.rank not in outcome]
                for w, msg in self._poll(busy):
                    if msg.get("id") != job_id:
                        continue
                    kind = msg["type"]
                    if kind == P.PROGRESS:
                        now = time.monotonic()
                        if steps_seen:
                            slowest = max(slowest, now - last_step)
                        last_step, steps_seen = now, steps_seen + 1
                    if kind == P.PROGRESS and on_progress is not None and interrupt is None:
                        try:
                            on_progress(msg["step"], msg["total"], msg.get("preview"))
                        except BaseException as e:  # noqa: BLE001 - e.g. ComfyUI's interrupt: cancel, then re-raise
                            interrupt = e
                    elif kind == P.LOADED:
                        loaded.add(w.rank)
                        if len(loaded) == len(self._workers):
                            staged.release()            # every rank read them
                    elif kind in P.TERMINAL:
                        self._wall["answers"][w.rank] = time.time()
                        if kind == P.ERROR and msg.get("kind") != P.ERROR_JOB:
                            raise self._fault(w, "failed during the job")
                        outcome[w.rank] = msg
                        if kind == P.ERROR and settle_deadline is None:
                            settle_deadline = time.monotonic() + min(SETTLE_S, self.hang_timeout)
                if not cancelling:
                    try:
                        cancelling = interrupt is not None or (cancel is not None and bool(cancel()))
                    except BaseException as e:  # noqa: BLE001 - re-raised once every rank stopped
                        interrupt, cancelling = e, True
                    if cancelling:
                        self._broadcast({"type": P.CANCEL, "id": job_id})
                limit = (max(self.hang_timeout, 20 * slowest) if steps_seen and not self._compiles
                         else self.startup_timeout)          # compiling a new shape may take minutes
                if not cancelling and time.monotonic() - last_step > limit:
                    self._dump_stacks()
                    raise self._fault(self._workers[0], f"made no progress for {limit:.0f} s "
                                      f"({'after step ' + str(steps_seen) if steps_seen else 'before the first step'}"
                                      f"): the ranks are alive but stuck, most likely in a collective; check "
                                      f"NCCL (NCCL_DEBUG=INFO, NCCL_P2P_DISABLE=1) or use other degrees",
                                      hung=True)
                if settle_deadline is not None and time.monotonic() > settle_deadline:
                    late = next(w for w in self._workers if w.rank not in outcome)
                    first = next(m for m in outcome.values() if m["type"] == P.ERROR)
                    raise self._fault(late, f"went on after rank {first['rank']} rejected the job "
                                            f"({first['message']}); the runtime must reject a job on every "
                                            f"rank before any collective, or the other ranks wait forever")
        except PoolError:
            raise
        except BaseException:
            self._teardown()          # interrupted mid-job: the workers' state is unknown
            raise
        if len(loaded) == len(self._workers):
            self._weights.commit()    # every rank holds this job's weights (also when it was cancelled later)
        else:
            self._weights.forget()
        self._record(job, outcome, time.perf_counter() - t0)
        if interrupt is not None:
            raise interrupt
        return self._result(outcome)

    def _record(self, job: Job, outcome: dict[int, dict], seconds: float) -> None:
        ranks = [outcome[r].get("stats", {}) for r in sorted(outcome)]
        steps = next((s["step_seconds"] for s in ranks if s.get("step_seconds")), [])   # the reporting rank
        self.last_stats = {"loads": ranks[0].get("loads"), "step_seconds": steps,
                           "job_seconds": seconds, "ranks": ranks, "overhead": self._overhead(ranks),
                           "weights": dict(self._weights.counts),
                           "client_seconds": {k: self._wall.get(k) for k in ("start_seconds", "stage_seconds", "start_wait_seconds")}}

    def _overhead(self, ranks: list[dict]) -> dict | None:
        """Where a job's time beyond the ranks' own work went (seconds): the job's checks and its wiring
        (pool health, serialising, posting) in the client, delivery until the last rank started, and from the
        last rank's end to the last answer here."""
        wall = self._wall
        walls = [r.get("wall") or {} for r in ranks]
        if not wall or "sent" not in wall or not all(w.get("started") and w.get("finished") for w in walls):
            return None
        answered = max(wall["answers"].values(), default=None)
        return {"checks": wall["checked"] - wall["submitted"], "wiring": wall["sent"] - wall["checked"],
                "delivery": max(w["started"] for w in walls) - wall["sent"],
                "return": None if answered is None else answered - max(w["finished"] for w in walls)}

    def _result(self, outcome: dict[int, dict]) -> torch.Tensor:
        errors = [outcome[r] for r in sorted(outcome) if outcome[r]["type"] == P.ERROR]
        if errors:
            raise (PlanError if errors[0].get("cls") == "PlanError" else JobError)(errors[0]["message"])
        first = outcome[0]
        if first["type"] == P.CANCELLED:
            raise JobCancelled(first.get("message") or "the job was cancelled")
        result = first.get("result")
        if not isinstance(result, torch.Tensor):
            raise self._fault(self._workers[0], "finished the job without returning a latent (a bug in the "
                                                "runtime: rank 0 must return the final latent)")
        return result.to(device="cpu", dtype=torch.float32)

    def _validate(self, job: Job, plan: ParallelConfig, model_config) -> list[str]:
        from .. import checks

        ref = job.weights
        if not isinstance(ref, WeightsRef):
            raise JobError(f"job.weights must be a WeightsRef(identity, source), got {type(ref).__name__}")
        cfg = model_config or self._model_configs.get(ref.identity)
        if cfg is None:
            if ref.source is None:
                raise JobError(f"the weights '{ref.identity}' are not loaded in the pool and the job gives no "
                               f"source; pass a file path, a state dict or 'random:<seed>:<preset>'")
            try:
                cfg = checks.model_config(ref.source)
            except ValueError as e:          # not HunyuanDiT, truncated, missing file, ...
                raise JobError(str(e)) from e
        self._model_configs[ref.identity] = cfg
        if job.checked == (plan, cfg):       # the front end ran the gate already
            return []
        return checks.validate_job(job, plan, cfg)

    def _wire_job(self, job: Job, staged: JobStaging) -> Job:
        """The job as sent: its weights as the transfer the workers need (worker/weights.py), staged by
        `staged` (files, GPU memory shared with the workers), which frees them after the job."""
        ref = job.weights
        if not isinstance(ref, WeightsRef):
            raise JobError(f"job.weights must be a WeightsRef(identity, source), got {type(ref).__name__}")
        t0 = time.perf_counter()
        delta = self._weights.plan(ref, staged)
        self._wall["stage_seconds"] = time.perf_counter() - t0
        return replace(job, weights=WeightsRef(ref.identity, delta))

    # ------------------------------------------------------------------ channel
    def _broadcast(self, msg: dict) -> None:
        data = P.dumps(msg)
        for w in self._workers:
            w.outbox.put(data)

    def _send_loop(self, w: _Worker) -> None:
        """Sends never block the caller: a stopped worker must not stop the hang detector."""
        while True:
            data = w.outbox.get()
            if data is None:
                return
            if w.conn is None:
                continue              # never connected; it is killed at teardown
            try:
                w.conn.send_bytes(data)
            except OSError as e:
                w.send_error = e
                return

    def _poll(self, busy: list[_Worker] = ()) -> list[tuple[_Worker, dict]]:
        """Messages that arrived within POLL_S; raises PoolError (after stopping every worker) when a
        worker died, broke its connection, or is one of `busy` (they send heartbeats) and stayed silent
        for hang_timeout."""
        conns = {w.conn: w for w in self._workers if w.conn is not None}
        if conns:
            ready = wait_connections(list(conns), POLL_S)
        else:
            time.sleep(POLL_S)
            ready = []
        now, out = time.monotonic(), []
        for conn in ready:
            w = conns[conn]
            try:
                msg = P.recv(conn)
            except (EOFError, OSError):
                raise self._fault(w, "closed its control connection") from None
            w.last_seen = now
            if msg.get("type") == P.ERROR:
                w.last_error = msg
            if msg.get("type") != P.HEARTBEAT:
                out.append((w, msg))
        for w in self._workers:
            if w.proc.poll() is not None:
                raise self._fault(w, "exited")
            if w.send_error is not None:
                raise self._fault(w, f"could not be sent a message ({w.send_error})")
            if w in busy and now - w.last_seen > self.hang_timeout:
                raise self._fault(w, f"sent nothing, not even a heartbeat, for {now - w.last_seen:.1f} s",
                                  hung=True)
        return out

    def _idle_and_healthy(self) -> bool:
        """Between jobs: every worker runs and its connection is open (stale messages are dropped)."""
        if not self.alive:
            if self._workers:
                self.log.warning("xDiT pool: a worker exited while idle (%s); starting a fresh pool",
                                 "; ".join(f"{w.name()} {describe_exit(w.proc.returncode)}"
                                           for w in self._workers if w.proc.returncode is not None))
            return False
        for w in self._workers:
            try:
                while w.conn.poll(0):
                    P.recv(w.conn)
            except (EOFError, OSError):
                self.log.warning("xDiT pool: %s lost its connection while idle; starting a fresh pool",
                                 w.name())
                return False
        return True

    def _pump_output(self, w: _Worker) -> None:
        """Copy a worker's stdout/stderr to its log file, the tail kept for errors, and the logger."""
        with open(w.log_path, "ab") as f:
            for raw in iter(w.proc.stdout.readline, b""):
                f.write(raw)
                f.flush()
                line = raw.decode("utf-8", "replace").rstrip()
                w.tail.append(line)
                self.log.info("[xdit worker %d] %s", w.rank, line)
        w.proc.stdout.close()

    # ------------------------------------------------------------------ faults and shutdown
    def _fault(self, w: _Worker, what: str, *, hung: bool = False) -> PoolError:
        """Stop every worker and build the error: the rank that caused it, what it said, its output."""
        starting = not all(o.ready for o in self._workers)
        if not hung:
            # A rank killed by a signal makes the collectives of its peers fail too: wait briefly for
            # a rank that died without a word, and blame it rather than the peers that raised.
            # (A worker that connected during start-up may still be in the accept queue with its last
            # words: adopt and read it first.)
            deadline = time.monotonic() + FAULT_GRACE_S
            while True:
                self._adopt_connections()
                self._drain_errors()
                dead = self._died_silently()
                if (dead and all(o.conn is not None for o in dead)) or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            if dead and w not in dead:
                w = dead[0]
        err = w.last_error if w.last_error and w.last_error.get("kind") != P.ERROR_JOB else None
        if err:
            what = "failed to start" if err.get("kind") == P.ERROR_STARTUP else "failed during the job"
        elif not hung and w.proc.poll() is not None:
            what = describe_exit(w.proc.returncode)
        self._kill_all()
        for o in self._workers:
            for t in o.threads[:1]:
                t.join(timeout=1.0)   # the output pump: let the last lines arrive
        lines = [f"The xDiT worker pool failed{' during start-up' if starting else ''}: {w.name()} {what}"
                 + (f": {err['message']}" if err else ".")]
        for o in self._workers:
            if o is not w and o.last_error and o.last_error.get("kind") != P.ERROR_JOB:
                lines.append(f"Also {o.name()} raised {o.last_error['message'].splitlines()[0]}")
        if err and err.get("traceback"):
            lines.append(f"Traceback on rank {w.rank}:\n{err['traceback'].rstrip()}")
        elif w.tail:
            lines.append(f"Last output of rank {w.rank}:\n" + "\n".join("  " + line for line in w.tail))
        if hung:
            for o in self._workers:
                if o is not w and o.tail:
                    lines.append(f"Last output of rank {o.rank}:\n" + "\n".join("  " + line for line in o.tail))
            lines.append(f"If a step legitimately takes longer than {self.hang_timeout:g} s, raise hang_timeout.")
        if starting:
            lines.append("Check the output above (a missing package, a wrong device, a driver or NCCL "
                         "problem). All workers were stopped; the next job tries to start the pool again.")
        else:
            lines.append("All workers were stopped; the next job starts a fresh pool.")
        error = PoolError("\n".join(lines))
        error.rank, error.device, error.pid = w.rank, w.device, w.pid
        self.log.error("%s", lines[0])
        self._teardown()
        return error

    def _dump_stacks(self) -> None:
        """Ask every worker for the Python stacks of all its threads (they go to its output, which the
        error includes): where each rank is stuck."""
        if not hasattr(signal, "SIGUSR1"):
            return
        for w in self._workers:
            try:
                os.kill(w.pid, signal.SIGUSR1)
            except OSError:
                pass
        time.sleep(1.0)

    def _died_silently(self) -> list[_Worker]:
        return [o for o in self._workers if o.proc.poll() is not None and o.last_error is None]

    def _drain_errors(self) -> None:
        for w in self._workers:
            try:
                while w.conn is not None and w.conn.poll(0):
                    msg = P.recv(w.conn)
                    if msg.get("type") == P.ERROR:
                        w.last_error = msg
            except (EOFError, OSError):
                pass

    def close(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Ask every worker to exit, wait up to `grace` seconds, then kill whatever is left (their whole
        process groups). Leaves no worker process and no temporary file. Idempotent."""
        locked = self._lock.acquire(timeout=2.0)   # at exit a daemon thread may still be inside run()
        try:
            if locked and self._workers:
                self._broadcast({"type": P.SHUTDOWN})
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline and any(w.proc.poll() is None for w in self._workers):
                    time.sleep(POLL_S)
            self._teardown()
        finally:
            if locked:
                self._lock.release()

    def _kill_all(self) -> None:
        for w in self._workers:
            if w.killed:
                continue
            w.killed = True
            kill_group(w.proc)        # the worker and anything it started
        for w in self._workers:
            try:
                w.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.log.error("xDiT pool: %s did not exit after SIGKILL", w.name())

    def _teardown(self) -> None:
        """Kill every worker and free everything the pool holds; safe to call at any time."""
        self._close_listener()
        self._background.close()
        if self._workers:
            self._kill_all()
        for w in self._workers:
            w.outbox.put(None)
            for t in w.threads:           # never close a connection under its sender thread
                t.join(timeout=1.0)
            if w.conn is not None:
                w.conn.close()
        self._workers = []
        self._weights.forget()
        for folder in (self._tmp, self._stage_dir):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        self._tmp = self._stage_dir = None


def cache_environment(config: PoolConfig, log: logging.Logger) -> tuple[Path | None, dict[str, str]]:
    """(folder, variables): where the workers' compilers keep their caches (config.cache_dir; none: their own
    defaults). Made before any worker starts."""
    if not config.cache_dir:
        return None, {}
    try:
        folder = compile_cache.prepare(config.cache_dir)
        return folder, {**compile_cache.environment(folder), **compile_cache.bytecode_environment(folder)}
    except OSError as e:
        log.warning("xDiT pool: the compile cache folder %s cannot be used (%s); the workers use their "
                    "compilers' default caches", config.cache_dir, e)
        return None, {}


def worker_environments(devices: list[str], cache_env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Each worker's environment by spare slot ("cuda:0#0"; "cpu#0", "cpu#1" for two CPU workers), in rank
    order."""
    world = len(devices)
    return {f"{d}#{devices[:i].count(d)}": P.worker_env(os.environ, d, world, cache_env)
            for i, d in enumerate(devices)}


def uses_spares(config: PoolConfig, devices: list[str]) -> bool:
    """config.spare_workers for these devices: auto means GPU pools; never where the spares' waiting on their
    stdin is not available (not POSIX)."""
    if os.name != "posix" or config.spare_workers == "off":
        return False
    return config.spare_workers == "on" or any(d.startswith("cuda") for d in devices)


def start_spares(config: PoolConfig, *, python: str = sys.executable,
                 log: logging.Logger | None = None) -> list[str]:
    """Start spare workers for a pool of `config` (ComfyUI's start does this for the default config), unless
    config.spare_workers says no; returns the slots started. A later pool of this config, or of any config
    whose workers get the same environment, starts from them."""
    log = log or logging.getLogger("comfyui_xdit_hunyuan.pool")
    devices = parse_devices(config.devices)
    if not uses_spares(config, devices):
        return []
    _, cache_env = cache_environment(config, log)
    return spares.start(python, worker_environments(devices, cache_env))


def get_pool(config: PoolConfig, **options) -> PoolClient:
    """The pool for `config`: the current one when its config.key() matches (options are then ignored);
    otherwise the current pool is closed first (GPUs are exclusive) and a new client is made. The client starts
    its workers on its first run() (or start())."""
    return current_or_new(config, lambda: PoolClient(config, **options))
