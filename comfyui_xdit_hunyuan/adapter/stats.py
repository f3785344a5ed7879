"""The pool's statistics after a job, as one log line."""
from __future__ import annotations

from collections.abc import Mapping


def format_pool_stats(stats: Mapping) -> str:
    """One log line from PoolClient.last_stats: time per step, weight loads, what the weights' transfer
    sent, and each rank's GPU memory (allocated / reserved / peak; resident memory for CPU ranks)."""
    if not isinstance(stats, Mapping) or not stats:
        return "no statistics"
    parts = []
    if isinstance(stats.get("job_seconds"), (int, float)):
        parts.append(f"job {stats['job_seconds']:.2f} s")
    steps = stats.get("step_seconds")
    if isinstance(steps, (list, tuple)) and steps:
        parts.append(f"{len(steps)} steps, {sum(steps) / len(steps):.3f} s/step")
    if stats.get("loads") is not None:
        parts.append(f"weight loads {stats['loads']}")
    w = stats.get("weights")
    if isinstance(w, Mapping) and w:
        parts.append(f"weights {'loaded whole' if w.get('whole') else 'updated'}: {w.get('sent', 0)} tensors sent "
                     f"({_gib(w.get('sent_bytes', 0))}), {w.get('restored', 0)} restored, "
                     f"{w.get('unchanged', 0)} unchanged")
    for i, r in enumerate(stats.get("ranks") or []):
        if not isinstance(r, Mapping):
            continue
        mem = [f"{label} {_gib(r[key])}" for key, label in (("gpu_allocated_bytes", "allocated"),
                                                            ("gpu_reserved_bytes", "reserved"),
                                                            ("gpu_peak_allocated_bytes", "peak"))
               if isinstance(r.get(key), (int, float))]
        if not mem and isinstance(r.get("rss_bytes"), (int, float)):
            mem = [f"RSS {_gib(r['rss_bytes'])}"]
        parts.append(f"rank {i} ({r.get('device', '?')}): {', '.join(mem) or 'no memory figures'}")
    return "; ".join(parts) or "no statistics"


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"
