"""Held-out evaluation: greedy and sampled accuracy, and tokens spent per answer.

Each held-out problem is one episode on the same engine and episode runner as training
rollouts (so multi-turn tasks are evaluated as they are trained); accuracy is the mean of the
episodes' `correct` reward part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from policyflow.agent.episode import EpisodeRunner
from policyflow.rollout import rollout_groups
from policyflow.tasks.base import Problem, Task


@dataclass(frozen=True)
class EvalResult:
    accuracy_greedy: float
    accuracy_sampled: float
    mean_tokens_greedy: float
    mean_tokens_sampled: float
    num_prompts: int

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()}


def accuracy(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], generator: torch.Generator | None = None) -> tuple[float, float]:
    """Fraction of problems answered correctly (one episode each, with the runner's sampling), and mean generated tokens."""
    groups, _ = rollout_groups(runner, task, problems, 1, generator)
    episodes = [g.trajectories[0] for g in groups]
    n = max(1, len(problems))
    return sum(t.reward_parts.get("correct", 0.0) for t in episodes) / n, sum(t.num_gen_tokens for t in episodes) / n


def evaluate(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], *, temperature: float, seed: int = 0) -> EvalResult:
    """Greedy accuracy and accuracy of one sample at `temperature` (with a fixed sampling seed); other sampling settings are the runner's."""
    greedy = runner.with_params(temperature=0.0)
    sampled = runner.with_params(temperature=temperature, top_p=1.0)
    acc_g, len_g = accuracy(greedy, task, problems)
    acc_s, len_s = accuracy(sampled, task, problems, torch.Generator(runner.engine.device).manual_seed(seed))
    return EvalResult(acc_g, acc_s, len_g, len_s, len(problems))
