"""The operating-system side of the pool: starting worker processes so that they die with their
parent (and, in the child, dying with it), killing them as a group, describing how they ended, and removing what
a killed client left."""
from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

DIR_PREFIX = "xdit-pool-"
EXIT_PARENT_GONE = 3             # a worker's (or helper's, or spare's) exit status when its client is gone
SHM = "/dev/shm"                 # memory-backed files (Linux): staged weights never touch a disk


def _memory_root() -> str | None:
    return SHM if os.path.isdir(SHM) and os.access(SHM, os.W_OK | os.X_OK) else None


def private_dir(memory: bool = False) -> str:
    """A new folder only this user can enter (mode 0700), marked with this process's pid so that a later pool
    can remove it if this process dies without doing so. memory: in /dev/shm where there is one."""
    folder = tempfile.mkdtemp(prefix=DIR_PREFIX, dir=_memory_root() if memory else None)
    Path(folder, "owner").write_text(str(os.getpid()))
    return folder


class _Spawner:
    """Starts worker processes from one thread that lives as long as this process. On Linux a
    worker's PR_SET_PDEATHSIG fires when the *thread* that forked it exits, so forking from the
    caller's thread (a short-lived one, say) would kill the workers with it."""

    def __init__(self):
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="xdit-pool-spawner", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._requests.put((done, args, kwargs))
        return done.result()

    def _serve(self) -> None:
        while True:
            done, args, kwargs = self._requests.get()
            try:
                done.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)


_spawner = _Spawner()


def spawn(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(*args, **kwargs), run on the spawner thread."""
    return _spawner.popen(*args, **kwargs)


def exit_with_parent(parent_pid: int) -> None:
    """In a child (worker, spare, compile helper): Linux makes the kernel kill this process when its parent dies
    (the client forks from a thread that lives as long as its process, since the signal follows the forking
    thread); the control-connection watchdog covers every OS. If the parent is already gone, leave now."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent_gone(parent_pid):
        print("the pool client exited before this process started; exiting", file=sys.stderr)
        sys.exit(EXIT_PARENT_GONE)


def parent_gone(parent_pid: int) -> bool:
    """POSIX: an orphan is re-parented, so its parent pid changes. (Not on Windows, where a venv's
    launcher process may sit between the client and this process.)"""
    return os.name == "posix" and os.getppid() != parent_pid


def own_process_group() -> dict:
    """Each worker leads its own process group (killed as a whole) and does not get the terminal's
    Ctrl+C; the parent decides when workers stop."""
    if os.name == "posix":
        return {"start_new_session": True}
    return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker's whole process group (POSIX; each worker leads its own), then the worker."""
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except OSError:
        pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is running"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def sweep_stale_dirs(root: str | None = None) -> list[str]:
    """Remove the folders of pools whose client process is gone (in `root`, default the temporary folder and
    /dev/shm): a client killed outright (SIGKILL) cannot delete its own. POSIX only (on Windows os.kill
    would terminate the process it asks about)."""
    removed = []
    if os.name != "posix":
        return removed
    roots = [root] if root else [tempfile.gettempdir(), *filter(None, [_memory_root()])]
    for folder in (f for r in roots for f in Path(r).glob(DIR_PREFIX + "*")):
        try:
            owner = int((folder / "owner").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
        except (OSError, ValueError):
            pass                      # not ours, still starting, or its owner is alive
    return removed
