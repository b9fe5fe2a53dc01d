"""Reward shaping (overlong, gates, penalties) and pass@k."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from policyflow.metrics import pass_at_k, pass_at_k_batch
from policyflow.rewards import count_penalty, format_gate, overlong_penalty

F64 = torch.float64


def test_overlong_penalty_piecewise():
    # max_len 10, cache 4: 0 up to 6, then (6 − |y|)/4 down to −1 at 10, −1 beyond
    lengths = torch.tensor([0, 6, 7, 8, 9, 10, 11, 100])
    out = overlong_penalty(lengths, max_len=10, cache_len=4)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]))
    assert out.dtype == torch.get_default_dtype()
    out64 = overlong_penalty(torch.tensor([7.0], dtype=F64), max_len=10, cache_len=4)
    assert out64.dtype == F64 and out64.item() == -0.25


def test_overlong_penalty_hard_cut_and_errors():
    out = overlong_penalty(torch.tensor([0, 10, 11]), max_len=10, cache_len=0)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -1.0]))
    # cache == max_len: a ramp over the whole range
    torch.testing.assert_close(overlong_penalty(torch.tensor([0, 5, 10]), 10, 10), torch.tensor([0.0, -0.5, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([1]), max_len=4, cache_len=5)


def test_format_gate_and_count_penalty():
    gated = format_gate(torch.tensor([1.0, 0.5, 1.0]), torch.tensor([True, False, True]), penalty=-1.0)
    torch.testing.assert_close(gated, torch.tensor([1.0, -1.0, 1.0]))
    torch.testing.assert_close(format_gate(torch.tensor([1, 1]), torch.tensor([0, 1])), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(count_penalty(torch.tensor([0, 1, 3]), 0.1), torch.tensor([0.0, -0.1, -0.3]))
    torch.testing.assert_close(count_penalty(torch.tensor([0, 1, 3]), 0.1, max_penalty=0.2), torch.tensor([0.0, -0.1, -0.2]))


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values_and_stability():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n − c < k → 1
    # n = 1000, c = 2, k = 10: 1 − (990·989)/(1000·999) computed without forming binomials
    assert pass_at_k(1000, 2, 10) == pytest.approx(1 - (990 * 989) / (1000 * 999), rel=1e-12)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_pass_at_k_batch_matches_scalar():
    n = [1, 4, 7, 7, 16, 200, 1000]
    c = [1, 0, 3, 7, 5, 17, 2]
    out = pass_at_k_batch(n, c, 1)
    torch.testing.assert_close(out, torch.tensor([ci / ni for ni, ci in zip(n, c)], dtype=F64))
    n, c = n[1:], c[1:]
    for k in (2, 4):
        out = pass_at_k_batch(torch.tensor(n), torch.tensor(c), k)
        expected = torch.tensor([pass_at_k(ni, ci, k) for ni, ci in zip(n, c)], dtype=F64)
        assert out.dtype == F64
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k_batch([2, 5], [1, 1], 3)


