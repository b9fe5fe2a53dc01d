"""Single-turn rollouts: sample G completions per problem, score them, and package Groups."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from policyflow.engine import Sampler, SamplingParams
from policyflow.tasks.base import Problem, Task
from policyflow.tokens import render_prompt
from policyflow.types import Call, Group, Segment, Trajectory


def encode_prompts(tokenizer, task: Task, problems: Sequence[Problem], chat_template: bool) -> list[list[int]]:
    return [render_prompt(tokenizer, task.render_prompt(p), chat_template) for p in problems]


def rollout_groups(
    sampler: Sampler,
    task: Task,
    problems: Sequence[Problem],
    prompt_ids: Sequence[list[int]],
    group_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> tuple[list[Group], int]:
    """G samples per problem, scored by the task. Returns the groups and the reward-error count."""
    start = time.perf_counter()
    flat_prompts = [ids for ids in prompt_ids for _ in range(group_size)]
    samples = sampler.generate(flat_prompts, params, generator=generator)
    gen_seconds = time.perf_counter() - start
    flat_problems = [p for p in problems for _ in range(group_size)]
    score = task.score(flat_problems, [s.text for s in samples])
    groups = []
    for i, problem in enumerate(problems):
        trajectories = []
        for j in range(group_size):
            k = i * group_size + j
            s = samples[k]
            segments = [
                Segment("prompt", tuple(s.prompt_ids)),
                Segment("gen", tuple(s.token_ids), tuple(s.logprobs), tuple(s.versions)),
            ]
            versions = s.versions or (sampler.version,)
            traj = Trajectory(
                id=f"{problem.id}/{j}",
                task_id=problem.id,
                group_id=problem.id,
                segments=segments,
                calls=[Call(context=(0,), produced=1)],
                reward=score.rewards[k],
                reward_parts={"correct": float(score.correct[k])} | {name: vals[k] for name, vals in score.parts.items()},
                completion_text=s.text,
                start_version=min(versions),
                end_version=max(versions),
                status="truncated" if s.finish_reason == "length" else "complete",
                finish_reason=s.finish_reason,
            )
            traj.timings.generation_s = gen_seconds / len(samples)
            trajectories.append(traj)
        groups.append(Group(id=problem.id, task_id=problem.id, prompt=problem.prompt, answer=problem.answer, trajectories=trajectories))
    return groups, score.errors
