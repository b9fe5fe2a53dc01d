"""Thread policy for torch on small shared CPUs.

With 2 cores, OpenMP threads contend badly when another process is busy (small matmuls were
measured 35x slower). policyflow therefore gives each process a fixed share: the cores this
process may use (its CPU affinity) divided by the number of processes that compute at once,
at least 1. `run.threads` overrides it; OMP_NUM_THREADS, when set, wins over the automatic share.
"""

from __future__ import annotations

import os

import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def thread_share(requested: int = 0, processes: int = 1) -> int:
    """Intra-op threads for one of `processes` computing processes (see the module docstring)."""
    if requested > 0:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(1, available_cores() // max(1, processes))


def configure_threads(requested: int = 0, processes: int = 1) -> int:
    """Set torch's intra-op threads to this process's share and return the number used."""
    n = thread_share(requested, processes)
    torch.set_num_threads(n)
    return n
