"""Reward shaping (overlong, search penalty) and pass@k."""

from __future__ import annotations

import itertools

import pytest
import torch

from policyflow.metrics import pass_at_k, pass_at_k_batch
from policyflow.rewards import overlong_penalty, search_penalty_reward

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




def test_search_penalty_reward_closed_form():
    # β = 0.25, γ = 0.2: correct without search 1 + 0.2; with search 0.75 + 0.2; wrong with
    # format 0.2; wrong without format 0; correct with 3 searches like with 1, no format 0.75.
    correct = torch.tensor([1, 1, 0, 0, 1])
    searches = torch.tensor([0, 1, 2, 0, 3])
    fmt = torch.tensor([True, True, True, False, False])
    parts = search_penalty_reward(correct, searches, fmt, penalty=0.25, format_weight=0.2)
    assert set(parts) == {"correct", "search_penalty", "format"}
    torch.testing.assert_close(parts["correct"], torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(parts["search_penalty"], torch.tensor([0.0, -0.25, 0.0, 0.0, -0.25]))
    torch.testing.assert_close(parts["format"], torch.tensor([0.2, 0.2, 0.2, 0.0, 0.0]))
    torch.testing.assert_close(sum(parts.values()), torch.tensor([1.2, 0.95, 0.2, 0.0, 0.75]))
    # the paper's form (1 − α)·acc·P + α·fmt with α = γ/(1 + γ) is this reward times (1 − α)
    alpha = 0.2 / 1.2
    paper = (1 - alpha) * correct * torch.tensor([1.0, 0.75, 0.75, 1.0, 0.75]) + alpha * fmt
    torch.testing.assert_close(paper, (1 - alpha) * sum(parts.values()))
    # scalars work too (one episode), and β = 0 removes the penalty
    one = search_penalty_reward(torch.tensor(True), torch.tensor(4), torch.tensor(True), penalty=0.0, format_weight=0.0)
    assert sum(v.item() for v in one.values()) == 1.0
    with pytest.raises(ValueError, match="penalty"):
        search_penalty_reward(correct, searches, fmt, penalty=1.5)
    with pytest.raises(ValueError, match="format_weight"):
        search_penalty_reward(correct, searches, fmt, format_weight=-0.1)
