"""Compiling in the background, the client's side: a cold GPU pool's first jobs run eager while a helper
process (worker/compile_helper.py) compiles the same code into the compile cache; the workers compile, from
the cache, at the first job after the helper is done. A first image then costs eager steps instead of a
compilation (PoolConfig.background_compile; on with compile, GPU workers and a cache_dir).

Per pool, one `BackgroundCompile`; per job, `eager(job, plan, arch)` says whether the workers run it eager:

- the workers compiled already (an earlier job), or the cache is known to hold this model and plan (a marker
  file the client writes when a helper or the workers compiled them): no, they compile (from the cache);
- else, no helper yet: start one (this job's shapes, rank 0's share of its plan), yes;
- the helper still running: yes; done: no (and the marker is written); failed: no (the workers compile on
  their own, as without this option, and the helper's log is in the pool's log).

The marker is a file named by a hash of what the compiled code depends on (the pool's config key, the
architecture, the plan's degrees, the per-rank batch, the latent size when sizes are not symbolic) in
`<compile cache>/warm/`; deleting the cache deletes it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

from ..config import PoolConfig
from . import protocol as P
from .processes import kill_group, own_process_group, spawn

HELPER_MODULE = __package__ + ".compile_helper"


class BackgroundCompile:
    def __init__(self, config: PoolConfig, devices: list[str], cache_folder: Path | None, workdir: str,
                 python: str, env: dict[str, str], log: logging.Logger):
        self.config, self.devices, self.cache_folder, self.workdir = config, devices, cache_folder, workdir
        self.python, self.env, self.log = python, env, log
        self.enabled = bool(config.compile and config.background_compile and cache_folder is not None
                            and devices and devices[0].startswith("cuda"))
        self.compiled = False             # the workers compiled (set by the client after a compiled job)
        self.helper: subprocess.Popen | None = None
        self._marker: Path | None = None
        self._log_path = Path(workdir, "compile-helper.log")

    def eager(self, job, plan, arch) -> bool:
        """Whether the workers run `job` eager (see the module docstring); starts the helper when needed."""
        if not self.enabled or self.compiled:
            return False
        marker = self._marker_for(job, plan, arch)
        if marker.exists():
            return False
        if self.helper is None:
            self._start(job, plan, arch, marker)
            return self.helper is not None
        code = self.helper.poll()
        if code is None:
            return True
        if code == 0:
            self._write_marker()
        else:
            self.log.warning("xDiT pool: the compile helper failed (exit %s); the workers compile on their own. "
                             "Its output:\n%s", code, self._tail())
            self.enabled = False
        return False

    def workers_compiled(self, job, plan, arch) -> None:
        """The workers ran a compiled job: the cache holds its code (marked once, so that a restarted pool
        compiles at once)."""
        if self.compiled:
            return
        self.compiled = True
        if self.enabled:
            self._marker = self._marker_for(job, plan, arch)
            self._write_marker()

    def close(self) -> None:
        """Stop the helper if it still runs (nothing is left running when the pool closes)."""
        helper, self.helper = self.helper, None
        if helper is not None and helper.poll() is None:
            kill_group(helper)
            try:
                helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.compiled = False

    # ---------------------------------------------------------------- internals
    def _marker_for(self, job, plan, arch) -> Path:
        what = {"pool": [str(v) for v in self.config.key()], "arch": asdict(arch), "degrees": plan.mesh_degrees,
                "patches": plan.num_pipeline_patch,
                "batch": int(job.latent.shape[0]) * (2 if job.uses_uncond() else 1) // plan.cfg_degree,
                "size": None if self.config.compile_any_size else list(job.latent.shape[2:])}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.cache_folder / "warm" / f"{digest}.json"

    def _start(self, job, plan, arch, marker: Path) -> None:
        spec = Path(self.workdir, "compile-helper-job.pkl")
        with open(spec, "wb") as f:
            pickle.dump({"job": replace(job, weights=None), "plan": plan, "arch": arch}, f)
        cmd = [self.python, *P.ISOLATE_CWD, "-m", HELPER_MODULE, "--config", json.dumps(self.config.to_dict()),
               "--device", self.devices[0], "--job", str(spec), "--parent-pid", str(os.getpid())]
        try:
            out = open(self._log_path, "wb")
            self.helper = spawn(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=P.worker_env(os.environ, self.devices[0], 1, self.env), **own_process_group())
            out.close()
        except OSError as e:
            self.log.warning("xDiT pool: could not start the compile helper (%s); the workers compile on their own", e)
            self.enabled = False
            return
        self._marker = marker
        self.log.info("xDiT pool: first jobs run eager while a helper compiles in the background (pid %d)",
                      self.helper.pid)

    def _write_marker(self) -> None:
        if self._marker is None:
            return
        try:
            self._marker.parent.mkdir(parents=True, exist_ok=True)
            self._marker.write_text(json.dumps({"written": "by the pool client after a compile"}))
        except OSError as e:
            self.log.warning("xDiT pool: could not write %s (%s)", self._marker, e)

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no output)"
