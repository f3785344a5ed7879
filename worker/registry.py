"""The process's pools: the current one by config (`current_or_new`, behind client.get_pool; GPUs are
exclusive, so a new config closes the old pool first), and every client of the process, closed at exit
(atexit) and on SIGTERM once `close_pools_on_sigterm()` was called, with the spare workers (worker/spares.py),
so that no worker or private folder outlives the process."""
from __future__ import annotations

import atexit
import os
import signal
import threading
import weakref
from typing import TYPE_CHECKING, Callable

from ..config import PoolConfig
from .spares import spares

if TYPE_CHECKING:
    from .client import PoolClient

_clients: "weakref.WeakSet[PoolClient]" = weakref.WeakSet()   # every client adds itself
_registry_lock = threading.RLock()   # re-entered by a SIGTERM handler on the main thread
_current: PoolClient | None = None


def current_or_new(config: PoolConfig, make: Callable[[], "PoolClient"]) -> "PoolClient":
    """The current pool when its config.key() matches `config`'s; otherwise the current pool is closed first
    (GPUs are exclusive) and `make()` becomes the current one (client.get_pool)."""
    global _current
    with _registry_lock:
        if _current is not None and _current.config.key() == config.key():
            return _current
        if _current is not None:
            _current.close()
        _current = make()
        return _current


def close_pools() -> None:
    """Close every pool of this process; spare workers stay (a pool started next takes them)."""
    global _current
    with _registry_lock:
        _current = None
    for client in list(_clients):
        client.close()


def shutdown_all() -> None:
    """Close every pool and stop every spare worker of this process: nothing of the pack is left running
    (registered with atexit, and run on SIGTERM once close_pools_on_sigterm() was called)."""
    try:
        close_pools()
    finally:
        spares.close()


atexit.register(shutdown_all)

_chained: dict = {}


def _close_then_terminate(signum, frame) -> None:
    """SIGTERM: close every pool (workers stopped, private folders removed), then do what the signal did
    before: the previous Python handler, or the default action (the process ends with the signal)."""
    try:
        shutdown_all()
    finally:
        previous = _chained.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def close_pools_on_sigterm() -> bool:
    """Make SIGTERM (systemd, `docker stop`, `kill`) close the pools first. Python's default SIGTERM ends the
    process without atexit: the workers would still die with it, but their private folder (owner file,
    logs, staged weights) would stay until the next pool start sweeps it. Only the main thread may set
    handlers; a process that ignores SIGTERM keeps ignoring it. True when installed."""
    if not hasattr(signal, "SIGTERM") or threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(signal.SIGTERM)
    if previous is _close_then_terminate:
        return True
    if previous == signal.SIG_IGN:
        return False
    _chained[signal.SIGTERM] = signal.SIG_DFL if previous is None else previous
    signal.signal(signal.SIGTERM, _close_then_terminate)
    return True
