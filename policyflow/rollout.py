"""From episodes to a TrainBatch: groups of scored trajectories, reward shaping, advantages, collation.

Rollout workers run groups with `agent.episode.EpisodeRunner.run_group` as problems arrive;
`rollout_groups` is the same for a list of problems from synchronous code (the textbook loop
in tests and benchmarks); `build_batch` computes advantages and pads the batch the trainer
consumes (rows from each episode's calls: `tokens.episode_rows`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from policyflow.advantages import ADVANTAGES, has_signal
from policyflow.agent.env import group_builder
from policyflow.agent.episode import EpisodeRunner
from policyflow.config import AdvantageConfig, TrainConfig
from policyflow.engine import run_blocking, using_generator
from policyflow.rewards import overlong_penalty
from policyflow.tasks.base import Problem, Task
from policyflow.tokens import collate, row_tokens, task_prompt_ids
from policyflow.types import Group, ToolStats, TrainBatch, Trajectory


def encode_prompts(tokenizer, task: Task, problems: Sequence[Problem], chat_template: bool) -> list[list[int]]:
    """The problems' prompt ids exactly as RL renders them, the task's tools included (`tokens.task_prompt_ids`)."""
    return [task_prompt_ids(tokenizer, task, p, chat_template) for p in problems]


async def run_groups(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], group_size: int, task_ids: Sequence[str] | None = None) -> tuple[list[Group], int]:
    """`group_size` episodes of each problem, all in flight at once; the groups in order and the reward-error count."""
    task_ids = task_ids or [p.id for p in problems]
    done = await asyncio.gather(*(runner.run_group(group_builder(task, p), group_size, task_id=i) for p, i in zip(problems, task_ids)))
    return [g for g, _ in done], sum(e for _, e in done)


def rollout_groups(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], group_size: int, generator: torch.Generator | None = None) -> tuple[list[Group], int]:
    """`run_groups` from synchronous code, sampling with `generator` (None: the engine's)."""
    with using_generator(runner.generator, generator):
        return run_blocking(run_groups(runner, task, problems, group_size))


def episode_record(
    t: Trajectory, *, kind: str = "train", step: int = 0, version: int = 0, prompt: str | None = None, answer: str = "",
    advantage: float | None = None, tokenizer=None,
) -> dict:
    """A whole episode as one line of samples.jsonl (kind "train") or of an evaluation's episodes.jsonl
    (kind "eval"); the format is in docs/trackers.md.

    Per segment: its token ids, each token's own text (`tokenizer.decode([id])`; null without a
    `tokenizer`), its loss mask as training uses it (`segment_loss_masks`), and for gen segments
    the behaviour log-probs and policy versions. `version` is the policy version the step trained
    (its batch's π_θ before the update; eval: the model's), so a token's staleness is `version` −
    its version, as the buffer's async/staleness metrics count it. `advantage` is the
    episode's advantage in its step's batch (`ScoredEpisodes.advantage_by_episode`); None when
    the episode was not trained (zero-variance group, masked truncation, filtered, or eval).
    `prompt` defaults to the text of the first prompt segment."""
    masks = segment_loss_masks(t)
    first_prompt = next((s.text for s in t.segments if s.kind == "prompt"), "")
    return {
        "kind": kind, "step": step, "version": version, "episode_id": t.id, "task_id": t.task_id,
        "prompt": first_prompt if prompt is None else prompt, "answer": answer,
        "reward": t.reward, "reward_parts": dict(t.reward_parts), "advantage": advantage,
        "status": t.status, "finish_reason": t.finish_reason, "turns": t.num_turns, "tool_calls": t.num_tool_calls, "tool_errors": t.num_tool_errors,
        "segments": [
            {
                "kind": s.kind, "turn": s.turn, "text": s.text, "token_ids": list(s.token_ids),
                "token_texts": [tokenizer.decode([i]) for i in s.token_ids] if tokenizer is not None else None,
                "loss_mask": mask, "logprobs": list(s.logprobs) if s.logprobs is not None else None,
                "versions": list(s.versions) if s.versions is not None else None,
            }
            for s, mask in zip(t.segments, masks)
        ],
        "calls": [{"context": list(c.context), "produced": c.produced} for c in t.calls],
        "steps": t.step_info,
    }


def segment_loss_masks(t: Trajectory) -> list[list[int]]:
    """Each segment's loss mask as the episode's training rows hold it (`tokens.episode_rows`): a gen
    segment produced by a call (any gen segment when there are no calls) is trained once, in its
    call's row, with `tokens.row_tokens`'s mask (1, but 0 for greedy GRPO-ATS code tokens);
    prompt and observation tokens are 0."""
    trained = {c.produced for c in t.calls} if t.calls else None
    return [row_tokens(t.segments, [i], trained)[1] for i in range(len(t.segments))]


def shape_overlong(groups: Sequence[Group], max_len: int, cache_len: int) -> None:
    """Add DAPO's soft overlong penalty to each trajectory's reward (kept as reward part `overlong`).

    `max_len` is one engine call's budget (sampling.max_new_tokens), so an episode is measured
    by its longest completion, not by the sum over its turns (the same for single-turn tasks).
    """
    trajectories = [t for g in groups for t in g.trajectories]
    lengths_B = torch.tensor([max((len(s.token_ids) for s in t.segments if s.kind == "gen"), default=0) for t in trajectories])
    for t, penalty in zip(trajectories, overlong_penalty(lengths_B, max_len, cache_len).tolist()):
        t.reward += penalty
        t.reward_parts["overlong"] = penalty


@dataclass(frozen=True)
class ScoredEpisodes:
    """The episodes one step trains on, in batch order, with their advantages (what `collate`
    pads into the TrainBatch)."""

    trajectories: list[Trajectory]
    advantages_B: torch.Tensor

    def collate(self, pad_id: int) -> TrainBatch:
        return collate(self.trajectories, self.advantages_B, pad_id)

    def advantage_by_episode(self) -> dict[str, float]:
        """{episode id: advantage} of the trained episodes (samples.jsonl's `advantage`), in float32 as the batch holds it."""
        return {t.id: a for t, a in zip(self.trajectories, self.advantages_B.to(torch.float32).tolist())}


def build_batch(groups: list[Group], train: TrainConfig, advantage: AdvantageConfig, pad_id: int) -> tuple[TrainBatch | None, dict[str, float]]:
    """`score_groups`, padded into a TrainBatch (None when no episode is trained)."""
    scored, stats = score_groups(groups, train, advantage)
    return (scored.collate(pad_id) if scored is not None else None), stats


def score_groups(groups: list[Group], train: TrainConfig, advantage: AdvantageConfig) -> tuple[ScoredEpisodes | None, dict[str, float]]:
    """Advantages per group (estimator `advantage.name`), zero-variance groups left out (counted): the episodes a step trains on.

    With `train.mask_truncated`, truncated samples take no part: they are out of their group's
    baseline (mean, std, ranking) and out of the batch. Rows the estimator does not keep (GFPO's
    filtered responses) are out of the batch too, so no loss denominator counts them. A group
    is skipped (`train.skip_zero_variance`) by the one zero-variance rule of `advantages.py`,
    applied to its included members.
    """
    stats = {"rollout/groups_zero_variance": 0.0}
    included = [[not (train.mask_truncated and t.status == "truncated") for t in g.trajectories] for g in groups]
    if train.skip_zero_variance:
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
    a = advantage
    hyper = {"k": a.gfpo_k, "metric": a.gfpo_metric} if a.name == "gfpo" else {}
    advantages_B, keep_B = ADVANTAGES[a.name](rewards_B, group_ids_B, lengths_B, include_B, **hyper)
    stats["rollout/gfpo_kept_fraction"] = float(keep_B.float().mean())
    if not bool(keep_B.any()):
        return None, stats
    rows = keep_B.nonzero().squeeze(-1).tolist()
    return ScoredEpisodes([trajectories[b] for b in rows], advantages_B[keep_B]), stats


def rollout_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """Reward, correctness, length, truncation, greedy (GRPO-ATS code) tokens (`rollout/…`), turns, context and tools (`agent/…`,
    `perf/tool_seconds`: `ToolStats.metrics` of the episodes' summed tool counts) of the trajectories in `groups`.

    The trainer computes these from the groups of its batch, which carry every count with them
    (`Trajectory.tools`), so every runtime logs the same values for the same episodes."""
    trajectories = [t for g in groups for t in g.trajectories]
    n = max(1, len(trajectories))
    tools = ToolStats()
    for t in trajectories:
        tools.add(t.tools)
    return {
        "rollout/reward_mean": sum(t.reward for t in trajectories) / n,
        "rollout/correct_mean": sum(t.reward_parts.get("correct", 0.0) for t in trajectories) / n,
        "rollout/response_tokens_mean": sum(t.num_gen_tokens for t in trajectories) / n,
        "rollout/truncated_fraction": sum(t.status == "truncated" for t in trajectories) / n,
        "rollout/greedy_token_fraction": _greedy_tokens(trajectories) / max(1, sum(t.num_gen_tokens for t in trajectories)),
        "agent/turns_mean": sum(t.num_turns for t in trajectories) / n,
        "agent/context_tokens_max": float(max((t.context_tokens_max for t in trajectories), default=0)),
    } | tools.metrics(len(trajectories)) | reward_part_means(trajectories)


def _greedy_tokens(trajectories: Sequence[Trajectory]) -> int:
    """Generated tokens drawn greedily (GRPO-ATS code at `agent.code_temperature` 0): out of the loss, in the context."""
    return sum(p.temperature <= 0 for t in trajectories for s in t.segments if s.policies for p in s.policies)


def reward_part_means(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """The mean of every named reward part (`reward/correct`, `reward/search_penalty`, ...); a missing part counts 0."""
    names = sorted({name for t in trajectories for name in t.reward_parts})
    n = max(1, len(trajectories))
    return {f"reward/{name}": sum(t.reward_parts.get(name, 0.0) for t in trajectories) / n for name in names}
