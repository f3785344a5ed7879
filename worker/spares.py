"""Spare workers: worker processes started before a pool needs them, so that a pool's start costs neither
Python's start and torch's import (3-6 s on the H200 image) nor what a first job pays once per process
(libraries loading their kernels, the fused Triton kernels compiling: `worker/warmup.py`, 4-5 s).

A spare runs `python -m comfyui_xdit_hunyuan.worker.main --spare --device D ...`: it imports what a worker
imports, makes its CUDA context, warms up (GPU spares), then waits on stdin for the worker's command line
(one JSON line) and the pool's control key, and goes on as any worker started with that command line. Its
output goes to a file in the spares' private folder until then, and to the pool client after.

    >>> spares = Spares()
    >>> spares.take("python", "cuda:0#0", {}) is None        # none started: the client spawns a fresh worker
    True

Spares are kept by slot: the device, and which worker of the pool on that device ("cuda:0#0"; "cpu#0" and
"cpu#1" for a pool of two CPU workers). Which spare fits: one made with the same interpreter, for the same slot,
with the same environment
(`protocol.worker_env`: the compile caches' folders among it); any other is dismissed and a fresh worker
started. A pool takes its spares when it starts and, after its first job, has new ones started for its
devices (`replenish`), so the next pool (a restart, another dtype) finds them too. One spare per device at
most. They die with this process (Linux), are killed by `close()` and by the registry at exit.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from . import protocol as P
from .processes import kill_group, own_process_group, private_dir, spawn

SPARE_FLAG = "--spare"
WORKER_MODULE = __package__ + ".main"
log = logging.getLogger("comfyui_xdit_hunyuan.pool")


@dataclass(eq=False)
class _Spare:
    python: str
    slot: str
    env: dict
    proc: subprocess.Popen
    log_path: Path
    started: float


class Spares:
    def __init__(self):
        self._lock = threading.Lock()
        self._spares: dict[str, _Spare] = {}      # by slot
        self._dir: str | None = None

    def running(self) -> dict[str, int]:
        """{slot: pid} of the spares alive now."""
        with self._lock:
            return {d: s.proc.pid for d, s in self._spares.items() if s.proc.poll() is None}

    def start(self, python: str, envs: Mapping[str, Mapping[str, str]]) -> list[str]:
        """Start a spare for each slot of `envs` ({slot: environment}) that has none alive; returns the
        slots started. GPU spares warm up (worker/warmup.py)."""
        started = []
        with self._lock:
            for slot, env in envs.items():
                old = self._spares.get(slot)
                if old is not None and old.proc.poll() is None and old.python == python and old.env == dict(env):
                    continue
                if old is not None:
                    self._dismiss(old)
                spare = self._spawn(python, slot, dict(env))
                if spare is not None:
                    self._spares[slot] = spare
                    started.append(slot)
        return started

    def take(self, python: str, slot: str, env: Mapping[str, str]) -> subprocess.Popen | None:
        """The spare for `slot` if it fits (same interpreter and environment, alive), now the caller's;
        else None (a spare that does not fit is dismissed)."""
        with self._lock:
            spare = self._spares.pop(slot, None)
        if spare is None:
            return None
        if spare.proc.poll() is None and spare.python == python and spare.env == dict(env):
            log.info("xDiT pool: %s takes the spare worker pid %d (started %.1f s ago)", slot, spare.proc.pid,
                     time.monotonic() - spare.started)
            return spare.proc
        if spare.proc.poll() is not None:
            log.warning("xDiT pool: the spare worker for %s exited with code %s; a fresh worker starts instead. "
                        "Its output:\n%s", slot, spare.proc.returncode, _tail(spare.log_path))
        else:
            changed = sorted(k for k in set(spare.env) | set(env) if spare.env.get(k) != env.get(k))
            log.info("xDiT pool: the spare worker for %s does not fit (%s); a fresh worker starts instead", slot,
                     "another interpreter" if spare.python != python else "environment changed: " + ", ".join(changed))
        self._dismiss(spare)
        return None

    def close(self) -> None:
        """Stop every spare (nothing is left running) and remove their folder."""
        with self._lock:
            spares, self._spares = list(self._spares.values()), {}
            folder, self._dir = self._dir, None
        for spare in spares:
            self._dismiss(spare)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    # ---------------------------------------------------------------- internals
    def _spawn(self, python: str, slot: str, env: dict) -> _Spare | None:
        if self._dir is None or not os.path.isdir(self._dir):
            self._dir = private_dir()
        device = slot.partition("#")[0]
        log_path = Path(self._dir, f"spare-{slot.replace(':', '').replace('#', '-')}-{time.monotonic_ns()}.log")
        cmd = [python, *P.ISOLATE_CWD, "-m", WORKER_MODULE, SPARE_FLAG, "--device", device,
               "--parent-pid", str(os.getpid()), "--log", str(log_path)]
        try:
            proc = spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         **own_process_group())
        except OSError as e:
            log.warning("xDiT pool: could not start a spare worker for %s (%s)", slot, e)
            return None
        return _Spare(python, slot, env, proc, log_path, time.monotonic())

    @staticmethod
    def _dismiss(spare: _Spare) -> None:
        try:
            spare.proc.stdin.close()      # a waiting spare exits at the end of its stdin
        except OSError:
            pass
        kill_group(spare.proc)
        try:
            spare.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if spare.proc.stdout is not None:
            spare.proc.stdout.close()


def assign(proc: subprocess.Popen, argv: list[str], authkey: bytes) -> None:
    """Give a spare its worker command line (without the program) and the pool's control key, on stdin."""
    proc.stdin.write(json.dumps(argv).encode() + b"\n" + authkey)
    proc.stdin.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


spares = Spares()           # the process's spares (the registry closes them at exit)
