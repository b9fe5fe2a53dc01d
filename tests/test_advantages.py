"""Advantage estimators: hand examples, groups of one, non-contiguous ids, GFPO filtering."""

from __future__ import annotations

import math

import pytest
import torch

from policyflow.advantages import ADVANTAGES, gfpo_advantages, group_advantages, rloo_advantages

F64 = torch.float64
H = 1 / math.sqrt(2)  # (±0.5) / std of a two-member group {a, a+1}: std = √(0.5) → ±0.7071


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def ids(values):
    return torch.tensor(values, dtype=torch.long)


def test_group_advantages_hand_example_non_contiguous():
    # group 7 = rows 0,1: rewards {1, 0}: mean 0.5, Bessel std √((0.25+0.25)/1) = √0.5 → ±1/√2
    # group 3 = rows 2,4: rewards {1, 3}: mean 2, std √2 → ∓1/√2 ; group 9 = row 3 alone → 0
    adv = group_advantages(t([1.0, 0.0, 1.0, 5.0, 3.0]), ids([7, 7, 3, 9, 3]))
    torch.testing.assert_close(adv, t([H, -H, -H, 0.0, H]), atol=1e-5, rtol=0)
    # scale="none" (Dr.GRPO): r − mean only
    adv = group_advantages(t([1.0, 0.0, 1.0, 5.0, 3.0]), ids([7, 7, 3, 9, 3]), scale="none")
    torch.testing.assert_close(adv, t([0.5, -0.5, -1.0, 0.0, 1.0]))


def test_group_advantages_three_members_and_eps():
    # {0, 1, 2}: mean 1, std 1 → (r − 1) / (1 + eps)
    adv = group_advantages(t([0.0, 1.0, 2.0]), ids([4, 4, 4]), eps=0.25)
    torch.testing.assert_close(adv, t([-0.8, 0.0, 0.8]))
    # all-equal rewards → 0 (not NaN)
    assert (group_advantages(t([0.3, 0.3, 0.3]), ids([1, 1, 1])) == 0).all()


def test_group_advantages_match_a_loop_reference_and_permutation():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g, dtype=F64)
    group_ids = torch.randint(100, 106, (24,), generator=g)
    adv = group_advantages(rewards, group_ids)
    expected = torch.zeros_like(rewards)
    for gid in group_ids.unique():
        rows = group_ids == gid
        if rows.sum() > 1:
            r = rewards[rows]
            expected[rows] = (r - r.mean()) / (r.std() + 1e-6)
    torch.testing.assert_close(adv, expected)
    perm = torch.randperm(24, generator=g)
    torch.testing.assert_close(group_advantages(rewards[perm], group_ids[perm]), adv[perm])


def test_group_advantages_dtypes_and_errors():
    assert group_advantages(t([1.0, 0.0]), ids([0, 0])).dtype == F64
    assert group_advantages(t([1.0, 0.0], torch.float32), ids([0, 0])).dtype == torch.float32
    int_adv = group_advantages(torch.tensor([1, 0]), ids([0, 0]))
    assert int_adv.is_floating_point()
    with pytest.raises(ValueError, match="allowed: group, none"):
        group_advantages(t([1.0, 0.0]), ids([0, 0]), scale="batch")
    with pytest.raises(ValueError, match="integer"):
        group_advantages(t([1.0, 0.0]), t([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(t([1.0, 0.0]), ids([0, 0, 1]))


def test_rloo_hand_example():
    # group 5 = rows 0,2,3 rewards {0, 1, 2}: baselines mean of the others = {1.5, 1, 0.5}
    #   → A = {−1.5, 0, 1.5}; group 8 = row 1 alone → 0
    adv = rloo_advantages(t([0.0, 7.0, 1.0, 2.0]), ids([5, 8, 5, 5]))
    torch.testing.assert_close(adv, t([-1.5, 0.0, 0.0, 1.5]))


def test_rloo_is_scaled_centering():
    # r_i − mean_{j≠i} r_j = n/(n−1) · (r_i − mean_g r)
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(12, generator=g, dtype=F64)
    group_ids = ids([0] * 4 + [1] * 3 + [2] * 5)
    n = t([4.0] * 4 + [3.0] * 3 + [5.0] * 5)
    centered = group_advantages(rewards, group_ids, scale="none")
    torch.testing.assert_close(rloo_advantages(rewards, group_ids), n / (n - 1) * centered)


def gfpo_example():
    # group 10 = rows 0,2,4,6 ; group 20 = rows 1,3,5 (interleaved)
    rewards = t([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    lengths = t([3.0, 4.0, 3.0, 2.0, 3.0, 8.0, 1.0])
    return rewards, lengths, ids([10, 20, 10, 20, 10, 20, 10])


def test_gfpo_length_keeps_shortest_ties_by_order():
    # k = 2. group 10 by length: row 6 (1), then rows 0, 2, 4 tie at 3 → row 0 (first) is kept.
    #   kept rewards {row6: 0, row0: 1} → row 0 +1/√2, row 6 −1/√2; rows 2, 4 → 0.
    # group 20: row 3 (2), row 1 (4) kept, row 5 (8) dropped: {row3: 1, row1: 0} → ±1/√2.
    rewards, lengths, group_ids = gfpo_example()
    adv, keep = gfpo_advantages(rewards, lengths, group_ids, 2)
    assert keep.tolist() == [True, True, False, True, False, False, True]
    torch.testing.assert_close(adv, t([H, -H, 0.0, H, 0.0, 0.0, -H]), atol=1e-5, rtol=0)


def test_gfpo_token_efficiency():
    # reward / length = [2/4, 1/1, 3/6, 1/2] = [0.5, 1, 0.5, 0.5] → keep row 1, then row 0 (tie at
    # 0.5 resolved by order) although row 2 has the largest reward. Kept {2, 1} → row 0 +, row 1 −.
    rewards, lengths = t([2.0, 1.0, 3.0, 1.0]), t([4.0, 1.0, 6.0, 2.0])
    adv, keep = gfpo_advantages(rewards, lengths, ids([0, 0, 0, 0]), 2, metric="token_efficiency")
    assert keep.tolist() == [True, True, False, False]
    torch.testing.assert_close(adv, t([H, -H, 0.0, 0.0]), atol=1e-5, rtol=0)
    # integer lengths work too
    adv2, _ = gfpo_advantages(rewards, torch.tensor([4, 1, 6, 2]), ids([0, 0, 0, 0]), 2, metric="token_efficiency")
    torch.testing.assert_close(adv2, adv)


def test_gfpo_edge_cases():
    rewards, lengths, group_ids = gfpo_example()
    # k at least the group size: everything kept, plain GRPO advantages
    adv, keep = gfpo_advantages(rewards, lengths, group_ids, 4)
    assert keep.all()
    torch.testing.assert_close(adv, group_advantages(rewards, group_ids))
    # k = 1: a kept subset of one has no baseline → all 0; one kept per group
    adv, keep = gfpo_advantages(rewards, lengths, group_ids, 1)
    assert (adv == 0).all() and keep.tolist() == [False, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="k >= 1"):
        gfpo_advantages(rewards, lengths, group_ids, 0)
    with pytest.raises(ValueError, match="allowed: length, token_efficiency"):
        gfpo_advantages(rewards, lengths, group_ids, 2, metric="reward")


def test_registry_calling_convention():
    rewards, lengths, group_ids = gfpo_example()
    for name, fn in ADVANTAGES.items():
        hyper = {"k": 2} if name == "gfpo" else {}
        adv, keep = fn(rewards, group_ids, lengths, **hyper)
        assert adv.shape == keep.shape == rewards.shape and keep.dtype == torch.bool, name
    torch.testing.assert_close(ADVANTAGES["grpo"](rewards, group_ids, lengths)[0], group_advantages(rewards, group_ids))
    torch.testing.assert_close(
        ADVANTAGES["dr_grpo"](rewards, group_ids, lengths)[0], group_advantages(rewards, group_ids, scale="none")
    )
    torch.testing.assert_close(ADVANTAGES["rloo"](rewards, group_ids, lengths)[0], rloo_advantages(rewards, group_ids))
    adv, keep = ADVANTAGES["gfpo"](rewards, group_ids, lengths, k=2, metric="length")
    assert keep.tolist() == [True, True, False, True, False, False, True]
    assert ADVANTAGES["grpo"](rewards, group_ids, lengths)[1].all()
    with pytest.raises(ValueError, match="k"):
        ADVANTAGES["gfpo"](rewards, group_ids, lengths)
