"""The worker pool of one command: started (optionally in the background while the parent encodes text),
a one-step warm-up job that loads the weights, the timed job with one line per step, closed at the end
whatever happens; `run_guarded` turns the pool's failures into exit codes.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .printout import plural, say
from .usage import EXIT_FAILED, EXIT_INTERRUPTED, in_option_words


def pool_module():
    """The worker pool's client module (imported when a command needs it: it brings torch's start-up cost)."""
    from comfyui_xdit_hunyuan.worker import client
    return client


@dataclass
class RunResult:
    latent: Any
    step_seconds: list[float]
    sampling_seconds: float
    start_seconds: float
    load_seconds: float


class PoolSession:
    """The pool of one command (worker.client's pool for `pool_config`) and the resolved plan its jobs run
    with; verbose shows the workers' own output on stderr."""

    def __init__(self, pool_config, plan, *, verbose: bool = False):
        client = pool_module()
        log = logging.getLogger("comfyui_xdit_hunyuan.pool")
        log.setLevel(logging.INFO if verbose else logging.CRITICAL)
        if verbose and not log.handlers:          # the workers' own output, as it comes
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(handler)
        self.plan = plan
        self.pool = client.get_pool(pool_config)
        self.start_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, *, background: bool = False) -> None:
        say(f"starting {plural(len(self.pool.devices), 'worker process', 'worker processes')} ...")
        if not background:
            self._start()
            self._report_started()
            return
        self._thread = threading.Thread(target=self._start, name="xdit-cli-pool-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        t0 = time.perf_counter()
        try:
            self.pool.start()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by wait_started()
            self._error = e
        self.start_seconds = time.perf_counter() - t0

    def _report_started(self) -> None:
        if self._error is not None:
            raise self._error
        say(f"workers ready in {self.start_seconds:.1f} s (pids {', '.join(map(str, self.pool.pids))})")

    def wait_started(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._report_started()

    def run(self, job, *, on_preview: Callable[[int, Any], None] | None = None) -> RunResult:
        """Load the weights with a one-step warm-up job (not timed as sampling), then run `job` timed."""
        from dataclasses import replace

        import torch

        self.wait_started()
        t0 = time.perf_counter()
        warm = replace(job, sigmas=torch.stack([job.sigmas[0], job.sigmas[-1]]), sampler="euler",
                       sampler_options={}, step_noises=None, preview_every=0, job_id=f"{job.job_id}-warmup")
        self.pool.run(warm, self.plan)
        load_seconds = time.perf_counter() - t0
        say(f"weights loaded + 1 warm-up step in {load_seconds:.2f} s", f"sampling {plural(job.steps, 'step')}:")

        steps: list[float] = []
        width = len(str(job.steps))
        t_start = last = time.perf_counter()

        def on_progress(step: int, total: int, preview) -> None:
            nonlocal last
            now = time.perf_counter()
            steps.append(now - last)
            last = now
            say(f"  step {step:>{width}}/{total}  {steps[-1]:8.3f} s   (elapsed {now - t_start:7.2f} s)")
            if preview is not None and on_preview is not None:
                on_preview(step, preview)

        latent = self.pool.run(job, self.plan, on_progress=on_progress)
        total = time.perf_counter() - t_start
        say(f"sampling time: {total:.2f} s for {plural(job.steps, 'step')} ({total / job.steps:.3f} s/step, "
            f"{self.plan.describe()} on {plural(len(self.pool.devices), 'worker')})")
        return RunResult(latent, steps, total, self.start_seconds, load_seconds)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
        self.pool.close()


def run_guarded(body: Callable[[], int]) -> int:
    """Run the part that uses workers: their failures exit 1, Ctrl+C exits 130 (workers are stopped)."""
    from comfyui_xdit_hunyuan.job import JobCancelled, JobError, PoolError
    from comfyui_xdit_hunyuan.plan import PlanError

    try:
        return body()
    except KeyboardInterrupt:
        print("\ninterrupted: the workers were stopped", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except JobCancelled as e:
        print(f"cancelled: {e}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (JobError, PlanError) as e:
        print(f"error: the workers rejected the job: {in_option_words(e)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_FAILED
