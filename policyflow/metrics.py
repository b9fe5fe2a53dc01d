"""Evaluation statistics: unbiased pass@k, avg@k and maj@k, each with a standard error over problems
(`evaluate` and its full report). Layer 0: stdlib and torch.

These run on the host, off the training hot path, and return Python floats (or a float64
tensor for the batched pass@k; the scalar form is the readable reference for it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    pass_P = torch.where(solvable_P, 1.0 - torch.exp(log_fail_P), 1.0)
    return torch.where(c_P == 0, 0.0, pass_P)  # exactly 0 with no correct sample (lgamma rounding leaves ~1e-16)


# -- estimates with standard errors (the full evaluation report: `evaluate/report.py`) -----------


@dataclass(frozen=True)
class Estimate:
    """A metric over P problems: the mean of per-problem values and its standard error.

    stderr = sd(x_P) / √P with the sample standard deviation (ddof 1): problems are the random
    unit (each problem's n samples are averaged into its x_p first, so the within-problem
    sampling noise is inside sd), as in Miller, "Adding Error Bars to Evals" (arXiv 2411.00640,
    the clustered standard error). None with fewer than 2 problems.
    """

    value: float
    stderr: float | None
    num_problems: int


def mean_estimate(values_P: Sequence[float]) -> Estimate:
    """The mean of per-problem values with its standard error (`Estimate`)."""
    values = [float(v) for v in values_P]
    count = len(values)
    if count == 0:
        return Estimate(0.0, None, 0)
    mean = sum(values) / count
    if count < 2:
        return Estimate(mean, None, count)
    variance = sum((v - mean) ** 2 for v in values) / (count - 1)
    return Estimate(mean, math.sqrt(variance / count), count)


def pass_at_k_estimate(n_P: Sequence[int], c_P: Sequence[int], k: int) -> Estimate:
    """Unbiased pass@k (`pass_at_k_batch`) averaged over problems, with its standard error."""
    return mean_estimate(pass_at_k_batch(n_P, c_P, k).tolist() if len(n_P) else [])


def avg_at_k_estimate(n_P: Sequence[int], c_P: Sequence[int]) -> Estimate:
    """avg@k: the expected fraction correct among k samples of a problem, averaged over problems.

        avg@k = mean_p c_p / n_p

    For any k ≤ n the fraction correct of a random k-subset has expectation c/n, so one number
    serves every k; it is reported as avg@n (our estimate uses all n samples), the mean over all
    samples, which is also the unbiased pass@1.
    """
    if any(n < 1 or not 0 <= c <= n for n, c in zip(n_P, c_P)):
        raise ValueError(f"avg@k needs 0 <= c <= n and n >= 1 for every problem, got n={list(n_P)}, c={list(c_P)}")
    return mean_estimate([c / n for n, c in zip(n_P, c_P)])


def maj_at_k(votes: Sequence[int], correct: Sequence[bool], n: int, k: int) -> float:
    """maj@k of one problem: the probability that the majority answer of k of its n samples,
    drawn without replacement, is correct (exact, no Monte Carlo).

    `votes[a]` samples gave distinct answer a (as the task extracts it), `correct[a]` says whether
    a is right (`Task.is_correct`); the other n − Σ votes samples gave no answer and never win.
    The majority is the most frequent answer among the k; a tie between t answers is broken
    uniformly at random (a tie with j correct answers scores j/t); k samples with no answer score
    0. The expectation over the C(n, k) subsets is summed by dynamic programming over answers,
    with the hypergeometric weight Π_a C(votes_a, x_a) · C(no-answers, k − Σx) / C(n, k).
    With k = n it is plain majority voting over all samples.
    """
    if len(votes) != len(correct):
        raise ValueError(f"maj@k needs one correct flag per answer, got {len(votes)} answers and {len(correct)} flags")
    if any(v < 1 for v in votes) or sum(votes) > n or not 1 <= k <= n:
        raise ValueError(f"maj@k needs votes >= 1 summing to at most n and 1 <= k <= n, got votes={list(votes)}, n={n}, k={k}")
    # state: (samples drawn, top count, wrong answers tied at the top, correct ones tied) -> ways
    states: dict[tuple[int, int, int, int], int] = {(0, 0, 0, 0): 1}
    for count, right in zip(votes, correct):
        grown: dict[tuple[int, int, int, int], int] = {}
        for (drawn, top, wrong_tied, right_tied), ways in states.items():
            for x in range(0, min(count, k - drawn) + 1):
                if x == 0 or x < top:
                    key = (drawn + x, top, wrong_tied, right_tied)
                elif x == top:
                    key = (drawn + x, top, wrong_tied + (not right), right_tied + right)
                else:
                    key = (drawn + x, x, int(not right), int(right))
                grown[key] = grown.get(key, 0) + ways * math.comb(count, x)
        states = grown
    unanswered = n - sum(votes)
    total = 0.0
    for (drawn, top, wrong_tied, right_tied), ways in states.items():
        if top > 0 and right_tied:
            total += ways * math.comb(unanswered, k - drawn) * right_tied / (wrong_tied + right_tied)
    return total / math.comb(n, k)


def maj_at_k_estimate(problems: Sequence[tuple[Sequence[int], Sequence[bool], int]], k: int) -> Estimate:
    """maj@k (`maj_at_k`) averaged over problems given as (votes, correct, n), with its standard error."""
    return mean_estimate([maj_at_k(votes, correct, n, k) for votes, correct, n in problems])
