"""From groups to a TrainBatch: which samples enter the baseline, the batch and the loss
denominators, and the one zero-variance rule shared by the batch builder, the buffer and the
advantage estimators."""

import pytest
import torch

from policyflow.advantages import ZERO_VARIANCE_TOL, group_advantages, has_signal
from policyflow.buffer import FILTERS, RolloutBuffer
from policyflow.config import load_config
from policyflow.rollout import build_batch, shape_overlong
from policyflow.types import Call, Group, Segment, Trajectory


def trajectory(task_id: str, j: int, reward: float, *, length: int = 3, truncated: bool = False, correct: float | None = None) -> Trajectory:
    parts = {} if correct is None else {"correct": correct}
    return Trajectory(
        id=f"{task_id}/{j}", task_id=task_id,
        segments=[Segment("prompt", (5, 6)), Segment("gen", tuple(range(10, 10 + length)), (-0.5,) * length, (0,) * length)],
        calls=[Call(context=(0,), produced=1)], reward=reward, reward_parts=parts,
        status="truncated" if truncated else "complete", finish_reason="length" if truncated else "eos",
    )


def group(task_id: str, rewards, **per_member) -> Group:
    members = [trajectory(task_id, j, r, **{k: v[j] for k, v in per_member.items()}) for j, r in enumerate(rewards)]
    return Group(id=task_id, task_id=task_id, prompt="p", answer="a", trajectories=members)


def config(*overrides: str):
    return load_config(None, ["train.group_size=4", *overrides])


def batch_of(groups: list[Group], cfg):
    """`build_batch` with the config's train and advantage sections."""
    return build_batch(groups, cfg.train, cfg.advantage, pad_id=0)


def test_truncated_samples_stay_out_of_the_group_baseline_with_mask_truncated() -> None:
    g = group("a", [1.0, 0.0, 0.0, 5.0], truncated=[False, False, False, True])
    batch, _ = batch_of([g], config("train.mask_truncated=true"))
    expected = group_advantages(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.long))
    assert batch.num_sequences == 3  # the truncated sample is not trained
    torch.testing.assert_close(batch.advantages_B, expected.float())
    # without the option it is an ordinary member of the group
    batch, _ = batch_of([g], config())
    assert batch.num_sequences == 4 and batch.advantages_B[3] > 1.0


def test_a_group_whose_untruncated_members_agree_has_no_signal() -> None:
    g = group("a", [1.0, 1.0, 1.0, 0.0], truncated=[False, False, False, True])
    batch, stats = batch_of([g, group("b", [0.0, 1.0, 0.0, 1.0])], config("train.mask_truncated=true"))
    assert stats["rollout/groups_zero_variance"] == 1 and batch.num_sequences == 4


def test_gfpo_filtered_responses_are_not_in_the_batch_nor_its_denominators() -> None:
    lengths = [2, 5, 3, 4]
    groups = [group("a", [1.0, 0.0, 0.5, 1.0], length=lengths), group("b", [0.0, 1.0, 1.0, 0.0], length=lengths)]
    batch, stats = batch_of(groups, config("advantage.name=gfpo", "advantage.gfpo_k=2"))
    assert stats["rollout/gfpo_kept_fraction"] == 0.5
    assert batch.num_sequences == 4  # the two shortest of each group
    assert batch.loss_mask_BT.sum(-1).tolist() == [2.0, 3.0, 2.0, 3.0]  # only kept tokens are counted
    assert (batch.advantages_B.abs() > 0.5).all()


def test_dynamic_sampling_filters_on_correctness_not_the_shaped_reward() -> None:
    keep = FILTERS["dynamic_sampling"]
    # all wrong, but the overlong penalty makes the rewards differ: no signal about correctness
    all_wrong = group("a", [0.0, -0.3, -1.0, 0.0], correct=[0.0, 0.0, 0.0, 0.0])
    all_right = group("b", [1.0, 0.8, 1.0, 0.2], correct=[1.0, 1.0, 1.0, 1.0])
    mixed = group("c", [0.0, 0.0, 1.0, 0.0], correct=[0.0, 0.0, 1.0, 0.0])
    assert not keep(all_wrong) and not keep(all_right) and keep(mixed)
    buf = RolloutBuffer(batch_groups=1, eta=0, filters=["dynamic_sampling"])
    buf.try_admit("a")
    assert not buf.put(all_wrong) and buf.metrics()["async/filtered/dynamic_sampling"] == 1
    assert buf.capacity == 1  # the slot is given back for a refill


def test_one_zero_variance_rule_everywhere() -> None:
    nearly = [0.5, 0.5 + ZERO_VARIANCE_TOL / 2, 0.5, 0.5]
    apart = [0.5, 0.5 + 2 * ZERO_VARIANCE_TOL, 0.5, 0.5]
    assert not has_signal(nearly) and has_signal(apart) and not has_signal([3.0])
    # the batch builder skips it
    _, stats = batch_of([group("a", nearly), group("b", [0.0, 1.0, 0.0, 1.0])], config())
    assert stats["rollout/groups_zero_variance"] == 1
    _, stats = batch_of([group("a", apart), group("b", [0.0, 1.0, 0.0, 1.0])], config())
    assert stats["rollout/groups_zero_variance"] == 0
    # the buffer's zero-variance filter rejects it
    assert not FILTERS["zero_variance"](group("a", nearly)) and FILTERS["zero_variance"](group("a", apart))
    # every advantage estimator gives it 0 (instead of a tiny difference divided by eps)
    nearly_B, ids_B = torch.tensor(nearly, dtype=torch.float64), torch.zeros(4, dtype=torch.long)
    for batch_cfg in (config(), config("advantage.name=dr_grpo"), config("advantage.name=rloo"), config("advantage.name=gfpo", "advantage.gfpo_k=3")):
        batch, _ = build_batch([group("a", nearly)], batch_cfg.train.model_copy(update={"skip_zero_variance": False}), batch_cfg.advantage, pad_id=0)
        assert (batch.advantages_B == 0).all(), batch_cfg.advantage.name
    assert (group_advantages(nearly_B, ids_B) == 0).all()
    # just above the tolerance: (3d/4) / (std + eps) with d = 2·TOL, std = d/2 = eps → 0.75
    assert group_advantages(torch.tensor(apart, dtype=torch.float64), ids_B)[1] == pytest.approx(0.75, abs=1e-6)


def test_overlong_penalty_measures_an_episode_by_its_longest_call() -> None:
    """max_new_tokens is one call's budget: three 3-token turns (9 in all) are not 'overlong' at L = 4."""
    gen = lambda n: Segment("gen", (1,) * n, (0.0,) * n, (0,) * n)  # noqa: E731
    segments = [Segment("prompt", (5, 6)), gen(3), Segment("obs", (7,)), gen(3), Segment("obs", (7,)), gen(3)]
    calls = [Call((0,), 1), Call((0, 1, 2), 3), Call((0, 1, 2, 3, 4), 5)]
    episode = Trajectory("t/0", "t", segments, calls, reward=1.0)
    single = Trajectory("u/0", "u", [Segment("prompt", (5,)), gen(4)], [Call((0,), 1)], reward=1.0)
    shape_overlong([Group("t", "t", "", "", [episode, single])], max_len=4, cache_len=2)
    assert episode.reward_parts["overlong"] == pytest.approx(-0.5)  # longest call 3: ((4 − 2) − 3) / 2
    assert single.reward_parts["overlong"] == pytest.approx(-1.0) and single.reward == pytest.approx(0.0)
