"""From samples to a TrainBatch: groups of scored trajectories, reward shaping, advantages, collation.

`make_group` turns the G samples of one problem into a scored `Group` (rollout workers call it
as each group finishes); `rollout_groups` is the one-shot version for a list of problems;
`build_batch` computes advantages and pads the batch the trainer consumes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from policyflow.advantages import ADVANTAGES, has_signal
from policyflow.config import Config
from policyflow.engine import Sampler, SamplingParams
from policyflow.rewards import overlong_penalty
from policyflow.tasks.base import Problem, Task
from policyflow.tokens import collate, render_prompt
from policyflow.types import Call, Group, Sample, Segment, TrainBatch, Trajectory


def encode_prompts(tokenizer, task: Task, problems: Sequence[Problem], chat_template: bool) -> list[list[int]]:
    return [render_prompt(tokenizer, task.render_prompt(p), chat_template) for p in problems]


def make_group(task: Task, problem: Problem, samples: Sequence[Sample], *, task_id: str | None = None, gen_seconds: float = 0.0) -> tuple[Group, int]:
    """Score the G samples of one problem and package them; returns the group and the reward-error count."""
    score = task.score([problem] * len(samples), [s.text for s in samples])
    task_id = task_id or problem.id
    trajectories = []
    for j, s in enumerate(samples):
        segments = [Segment("prompt", tuple(s.prompt_ids)), Segment("gen", tuple(s.token_ids), tuple(s.logprobs), tuple(s.versions))]
        traj = Trajectory(
            id=f"{task_id}/{j}",
            task_id=task_id,
            group_id=task_id,
            segments=segments,
            calls=[Call(context=(0,), produced=1)],
            reward=score.rewards[j],
            reward_parts={"correct": float(score.correct[j])} | {name: vals[j] for name, vals in score.parts.items()},
            completion_text=s.text,
            start_version=min(s.versions, default=0),
            end_version=max(s.versions, default=0),
            status="truncated" if s.finish_reason == "length" else "complete",
            finish_reason=s.finish_reason,
        )
        traj.timings.generation_s = gen_seconds
        trajectories.append(traj)
    return Group(id=task_id, task_id=task_id, prompt=problem.prompt, answer=problem.answer, trajectories=trajectories), score.errors


def rollout_groups(
    sampler: Sampler,
    task: Task,
    problems: Sequence[Problem],
    prompt_ids: Sequence[list[int]],
    group_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> tuple[list[Group], int]:
    """G samples per problem in one engine batch, scored. Returns the groups and the reward-error count."""
    start = time.perf_counter()
    samples = sampler.generate([ids for ids in prompt_ids for _ in range(group_size)], params, generator=generator)
    per_sample = (time.perf_counter() - start) / max(1, len(samples))
    groups, errors = [], 0
    for i, problem in enumerate(problems):
        group, n = make_group(task, problem, samples[i * group_size:(i + 1) * group_size], gen_seconds=per_sample)
        groups.append(group)
        errors += n
    return groups, errors


def shape_overlong(groups: Sequence[Group], max_len: int, cache_len: int) -> None:
    """Add DAPO's soft overlong penalty to each trajectory's reward (kept as reward part `overlong`)."""
    trajectories = [t for g in groups for t in g.trajectories]
    lengths_B = torch.tensor([t.num_gen_tokens for t in trajectories])
    for t, penalty in zip(trajectories, overlong_penalty(lengths_B, max_len, cache_len).tolist()):
        t.reward += penalty
        t.reward_parts["overlong"] = penalty


def build_batch(groups: list[Group], cfg: Config, pad_id: int) -> tuple[TrainBatch | None, dict[str, float]]:
    """Advantages per group, zero-variance groups left out (counted), padded into a TrainBatch.

    With `train.mask_truncated`, truncated samples take no part: they are out of their group's
    baseline (mean, std, ranking) and out of the batch. Rows the estimator does not keep (GFPO's
    filtered responses) are out of the batch too, so no loss denominator counts them. A group
    is skipped (`train.skip_zero_variance`) by the one zero-variance rule of `advantages.py`,
    applied to its included members.
    """
    stats = {"rollout/groups_zero_variance": 0.0}
    included = [[not (cfg.train.mask_truncated and t.status == "truncated") for t in g.trajectories] for g in groups]
    if cfg.train.skip_zero_variance:
        signal = [has_signal([t.reward for t, inc in zip(g.trajectories, flags) if inc]) for g, flags in zip(groups, included)]
        stats["rollout/groups_zero_variance"] = float(len(groups) - sum(signal))
        groups = [g for g, ok in zip(groups, signal) if ok]
        included = [flags for flags, ok in zip(included, signal) if ok]
    if not groups:
        return None, stats
    trajectories = [t for g in groups for t in g.trajectories]
    rewards_B = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
    group_ids_B = torch.tensor([i for i, g in enumerate(groups) for _ in g.trajectories])
    lengths_B = torch.tensor([t.num_gen_tokens for t in trajectories], dtype=torch.float64)
    include_B = torch.tensor([flag for flags in included for flag in flags], dtype=torch.bool)
    a = cfg.advantage
    hyper = {"k": a.gfpo_k, "metric": a.gfpo_metric} if a.name == "gfpo" else {}
    advantages_B, keep_B = ADVANTAGES[a.name](rewards_B, group_ids_B, lengths_B, include_B, **hyper)
    stats["rollout/gfpo_kept_fraction"] = float(keep_B.float().mean())
    if not bool(keep_B.any()):
        return None, stats
    rows = keep_B.nonzero().squeeze(-1).tolist()
    return collate([trajectories[b] for b in rows], advantages_B[keep_B], group_ids_B[keep_B], pad_id), stats


def rollout_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """Reward, correctness, length and truncation of the trajectories in `groups` (`rollout/…`)."""
    trajectories = [t for g in groups for t in g.trajectories]
    n = max(1, len(trajectories))
    return {
        "rollout/reward_mean": sum(t.reward for t in trajectories) / n,
        "rollout/correct_mean": sum(t.reward_parts.get("correct", 0.0) for t in trajectories) / n,
        "rollout/response_tokens_mean": sum(t.num_gen_tokens for t in trajectories) / n,
        "rollout/truncated_fraction": sum(t.status == "truncated" for t in trajectories) / n,
    }
