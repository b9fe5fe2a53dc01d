"""Evaluation statistics: unbiased pass@k (used by `evaluate` for eval/pass@k). Layer 0: stdlib and torch.

These run on the host, off the training hot path, and return Python floats (or a float64
tensor for the batched pass@k; the scalar form is the readable reference for it).
"""

from __future__ import annotations

from collections.abc import Sequence

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
