"""The virtual-clock scheduling simulation of benchmarks/async_speedup.py, on tiny configurations.

The buffer's own property tests (tests/test_buffer.py) drive random operation sequences; these
drive the buffer through the simulated engine and trainer instead: version tags, drain and
continue swaps, tool calls and continuous batching.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from benchmarks.async_sim import Mode, SimConfig, Workload, predicted_ratio, simulate

SINGLE = Workload("single", mean_turn_tokens=8, sigma=0.8, max_turn_tokens=64)
MULTI = Workload("multi", mean_turn_tokens=4, sigma=0.8, max_turn_tokens=32, max_turns=3, tool_median_s=0.05, tool_sigma=1.0)
SMALL = SimConfig(batch_groups=3, group_size=2, slots=6, step_base_s=0.01, step_per_seq_s=0.001,
                  train_step_s=0.05, swap_s=0.01, steps=8, warmup_steps=0)
SYNC = Mode("sync", 0, "drain", None)


@pytest.mark.parametrize("workload", [SINGLE, MULTI], ids=lambda w: w.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_eta_zero_is_synchronous(workload, seed):
    """η = 0: batch k holds exactly the k-th B groups admitted, every trained token is of the
    version being trained, and the engine never decodes while the trainer trains."""
    result = simulate(replace(SMALL, seed=seed), SYNC, workload)
    B = SMALL.batch_groups
    ids = result.trained_task_ids
    assert len(ids) == SMALL.steps * B
    for k in range(SMALL.steps):
        assert set(ids[k * B:(k + 1) * B]) == {f"task{i}" for i in range(k * B, (k + 1) * B)}
    s = result.stats
    assert s.staleness_max == 0 and s.dropped_tokens == 0
    assert result.overlap_total_s == 0 and s.overlap_fraction == 0
    assert 0 < s.trainer_idle_fraction < 1 and 0 < s.engine_busy_fraction < 1


def test_async_is_faster_than_sync_on_long_tails():
    cfg = SimConfig(batch_groups=4, group_size=2, slots=8, step_base_s=0.01, step_per_seq_s=0.0,
                    train_step_s=0.1, swap_s=0.0, steps=30, warmup_steps=5, seed=3)
    sync = simulate(cfg, SYNC, SINGLE).stats
    fast = simulate(cfg, Mode("async", 4, "continue", None), SINGLE).stats
    assert fast.trajectories_per_s > 1.5 * sync.trajectories_per_s
    assert fast.overlap_fraction > 0.5 and sync.overlap_fraction == 0


def test_predicted_ratio_formula():
    # (E[max] + t + s) / (max(B·E[T]/C, t) + s): C = B, t = E[T], s = 0 gives 1 + E[max]/E[T]
    assert predicted_ratio(max_T_s=5.0, mean_T_s=1.0, train_s=1.0, swap_s=0.0, slots=64, batch_trajs=64) == 6.0
    assert predicted_ratio(max_T_s=5.0, mean_T_s=1.0, train_s=0.5, swap_s=0.5, slots=32, batch_trajs=64) == 6.0 / 2.5


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000), B=st.integers(1, 3), G=st.integers(1, 3), slots=st.integers(1, 8),
    eta=st.integers(0, 3), swap=st.sampled_from(["continue", "drain"]), eta_hard=st.one_of(st.none(), st.integers(0, 3)),
    multi=st.booleans(), swap_s=st.sampled_from([0.0, 0.02]), max_lag=st.integers(0, 1),
)
def test_random_schedules_train_each_task_once_within_the_cutoff(seed, B, G, slots, eta, swap, eta_hard, multi, swap_s, max_lag):
    assume(eta_hard is None or eta_hard >= max_lag)
    cfg = SimConfig(batch_groups=B, group_size=G, slots=slots, step_base_s=0.01, step_per_seq_s=0.002,
                    train_step_s=0.04, swap_s=swap_s, max_lag=max_lag, steps=6, warmup_steps=1, seed=seed)
    workload = MULTI if multi else SINGLE
    result = simulate(cfg, Mode("m", eta, swap, eta_hard), workload)
    ids, ledger = result.trained_task_ids, result.ledger
    assert len(ids) == len(set(ids)) == cfg.steps * B  # nothing trained twice, every step full
    assert set(ids) == ledger.trained
    assert not (ledger.filtered | ledger.requeued)
    assert ledger.issued == ledger.trained | ledger.stale | ledger.buffered | ledger.running
    s = result.stats
    if eta_hard is not None:
        assert s.staleness_max <= eta_hard
    if swap == "drain" and max_lag == 0:
        # A drain swaps only once every admitted group is done (queued members and tool calls
        # included), so each group is sampled by one version, groups finish in version order,
        # and admission alone keeps staleness within η.
        assert s.staleness_max <= eta
        assert s.dropped_groups == 0 or eta_hard < eta
    assert 0 <= s.trainer_idle_fraction <= 1 and 0 <= s.slot_utilisation <= 1 + 1e-9


def test_a_cutoff_below_the_engine_lag_is_refused():
    with pytest.raises(ValueError, match="raise eta_hard or lower max_lag"):
        simulate(replace(SMALL, max_lag=1), Mode("m", 1, "continue", 0), SINGLE)
