"""The learning-speed benchmark's interpolation and the evaluation's own sampling stream."""

import sys
from pathlib import Path

import pytest
import torch

from policyflow.evaluate import eval_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.learning_speed import crossing  # noqa: E402


def test_crossing_interpolates_linearly_between_measurements() -> None:
    points = [(0.0, 0.30), (10.0, 0.35), (20.0, 0.45)]
    assert crossing(points, 0.40) == pytest.approx(15.0)  # halfway from 0.35 to 0.45
    assert crossing(points, 0.35) == pytest.approx(10.0)
    assert crossing(points, 0.30) == 0.0
    assert crossing(points, 0.46) is None  # never reached


def test_evaluation_does_not_reuse_a_rollout_stream() -> None:
    """Worker i of run seed s samples from manual_seed(s + 1000·i (+ 1_000_003·restarts)); the evaluation must not."""
    for seed in range(4):
        worker_seeds = {seed + 1000 * i + 1_000_003 * g for i in range(4) for g in range(3)}
        assert eval_seed(seed) not in worker_seeds
        first_eval = torch.rand(256, generator=torch.Generator().manual_seed(eval_seed(seed)))
        first_rollout = torch.rand(256, generator=torch.Generator().manual_seed(seed))
        assert not torch.equal(first_eval, first_rollout)
    assert eval_seed(0) == eval_seed(0) and eval_seed(0) != eval_seed(1)  # fixed per run seed
