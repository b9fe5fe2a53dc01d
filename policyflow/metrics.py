"""Evaluation and bookkeeping statistics: pass@k, percentiles, summaries. Layer 0: stdlib and torch.

These run on the host, off the training hot path (evaluation, staleness accounting), and return
Python floats (or a float64 tensor for the batched pass@k).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

Tensor = torch.Tensor


def _check_pass_args(n: int, c: int, k: int) -> None:
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., arXiv 2107.03374):

        pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1}^{n} (1 − k/i)

    The product form never forms the (huge) binomials.
    """
    _check_pass_args(n, c, k)
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def pass_at_k_batch(n_P: Tensor | Sequence[int], c_P: Tensor | Sequence[int], k: int) -> Tensor:
    """pass@k for P problems at once (float64 [P]); each problem may have its own n.

    C(n−c, k)/C(n, k) = exp(lgamma(n−c+1) − lgamma(n−c−k+1) − lgamma(n+1) + lgamma(n−k+1)),
    which is accurate to ~1e-12 in float64 for n up to many thousands.
    """
    n_P = torch.as_tensor(n_P, dtype=torch.float64)
    c_P = torch.as_tensor(c_P, dtype=torch.float64)
    if n_P.shape != c_P.shape or n_P.dim() != 1:
        raise ValueError(f"n and c must both be [P], got {tuple(n_P.shape)} and {tuple(c_P.shape)}")
    if bool(((c_P < 0) | (c_P > n_P) | (n_P < k)).any()) or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n for every problem (k={k})")
    wrong_P = n_P - c_P
    solvable_P = wrong_P >= k  # otherwise every k-subset holds a correct sample
    safe_wrong_P = torch.where(solvable_P, wrong_P, float(k))
    log_fail_P = (torch.lgamma(safe_wrong_P + 1) - torch.lgamma(safe_wrong_P - k + 1)
                  - torch.lgamma(n_P + 1) + torch.lgamma(n_P - k + 1))
    return torch.where(solvable_P, 1.0 - torch.exp(log_fail_P), 1.0)


def _as_floats(values: Iterable[float] | Tensor) -> list[float]:
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().flatten().tolist()]
    return [float(v) for v in values]


def _sorted_percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    position = (len(ordered) - 1) * q / 100.0
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def percentile(values: Iterable[float] | Tensor, q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) with linear interpolation, like numpy.percentile."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(_as_floats(values))
    if not ordered:
        raise ValueError("percentile of an empty collection")
    return _sorted_percentile(ordered, q)


def summarize(values: Iterable[float] | Tensor) -> dict[str, float]:
    """count, mean, min, max, p50, p99 of the values; all 0.0 (count 0) when there are none."""
    ordered = sorted(_as_floats(values))
    if not ordered:
        return {"count": 0.0, "mean": 0.0, "min": 0.0, "max": 0.0, "p50": 0.0, "p99": 0.0}
    return {
        "count": float(len(ordered)),
        "mean": math.fsum(ordered) / len(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p50": _sorted_percentile(ordered, 50.0),
        "p99": _sorted_percentile(ordered, 99.0),
    }
