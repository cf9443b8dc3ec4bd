"""Which CPU cores the engine process takes and which the server process keeps (CPU-only models).

With the model on the CPU, the engine thread is the whole server's bottleneck, and the server's
own work (HTTP, image decoding and preprocessing, streaming) runs beside it. Left to the OS, the
server's threads land on the engine's core now and then: the engine waits in the run queue and
comes back to caches full of someone else's pixels. Partitioned — the engine all cores but the
last, the server the last — each keeps its core warm. Measured on this project's 2-core CPU
machine (2026-11-26, docs/PERFORMANCE.md): 16 concurrent image requests, four runs each taken in
turn, 4.06x the naive baseline unpinned against 4.77x pinned on average (17.7-21.4 against
20.3-23.3 requests/s).
"""

from __future__ import annotations

import os
from typing import Iterable


def available() -> list[int]:
    """The cores this process may run on (a container's cpuset, taskset), or [] where the OS cannot say."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def split(cpus: Iterable[int], threads: int | None) -> tuple[list[int], list[int]] | None:
    """(the engine's cores, the server's cores): ``threads`` cores (default: all but one) for the
    engine and the rest for the server; None when none is left for the server — one core, or
    ``threads`` asking for them all, which it gets, shared as the OS sees fit."""
    cpus = sorted(cpus)
    take = threads or len(cpus) - 1
    if take >= len(cpus) or take < 1:
        return None
    return cpus[:take], cpus[take:]


def pin_process(cpus: Iterable[int]) -> None:
    """Run every thread of this process (and the threads they start later) on ``cpus`` (Linux)."""
    cpus = set(cpus)
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    try:
        tasks = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: the calling thread at least
        tasks = [0]
    for tid in tasks:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that ended meanwhile
            pass
