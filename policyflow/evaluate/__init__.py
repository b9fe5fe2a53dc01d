"""Held-out evaluation: greedy and sampled accuracy, pass@k, and tokens spent per answer.

Each held-out problem is one episode (n for pass@k) on the same engine and episode runner as
training rollouts, so multi-turn tasks are evaluated as they are trained; a sample is correct
when its episode's `correct` reward part is 1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from policyflow.agent.episode import EpisodeRunner
from policyflow.metrics import pass_at_k_batch
from policyflow.rollout import rollout_groups
from policyflow.tasks.base import Problem, Task


@dataclass(frozen=True)
class EvalResult:
    accuracy_greedy: float
    accuracy_sampled: float  # mean over every sample: the unbiased pass@1
    mean_tokens_greedy: float
    mean_tokens_sampled: float
    num_prompts: int
    samples_per_prompt: int = 1
    pass_at: dict[str, float] = field(default_factory=dict)  # "pass@k" -> value, for k = 2, 4, ... and n (n > 1)
    mean_turns_sampled: float = 1.0  # engine calls per sampled episode (agents)
    mean_tool_calls_sampled: float = 0.0  # tool calls (e.g. searches) per sampled episode
    accuracy_sampled_by_split: dict[str, float] = field(default_factory=dict)  # `Task.eval_split` -> accuracy_sampled on its problems

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        nested = ("pass_at", "accuracy_sampled_by_split")
        scalars = {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if k not in nested}
        splits = {f"{prefix}accuracy_sampled/{k}": float(v) for k, v in self.accuracy_sampled_by_split.items()}
        return scalars | {f"{prefix}{k}": float(v) for k, v in self.pass_at.items()} | splits


def accuracy(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], generator: torch.Generator | None = None) -> tuple[float, float]:
    """Fraction of problems answered correctly (one episode each, with the runner's sampling), and mean generated tokens."""
    scored = _sample_and_score(runner, task, problems, 1, generator)
    return sum(scored.correct_P) / max(1, len(problems)), scored.mean("num_gen_tokens")


@dataclass(frozen=True)
class _Scored:
    correct_P: list[int]  # correct episodes per problem
    episodes: list  # every Trajectory

    def mean(self, attribute: str) -> float:
        return sum(getattr(t, attribute) for t in self.episodes) / max(1, len(self.episodes))


def _sample_and_score(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], n: int, generator: torch.Generator | None) -> _Scored:
    """`n` episodes per problem: how many of each problem's were correct, and the episodes themselves."""
    groups, _ = rollout_groups(runner, task, problems, n, generator)
    correct_P = [sum(int(t.reward_parts.get("correct", 0.0) >= 1.0) for t in g.trajectories) for g in groups]
    return _Scored(correct_P, [t for g in groups for t in g.trajectories])


def eval_seed(seed: int) -> int:
    """The sampling seed of the evaluation for run seed `seed`: a stream of its own.

    Rollout worker i samples from `torch.Generator().manual_seed(seed + 1000·i)`; seeding the
    evaluation with `seed` itself would make its draws the very uniforms of worker 0's first
    rollout batch (correlated noise between a score and the data it trains on). This hashes
    (seed, "eval") instead, stable across processes.
    """
    digest = hashlib.sha256(f"{seed}/eval".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pass_at_ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: powers of two below n, and n."""
    return sorted({2**i for i in range(1, n.bit_length()) if 2**i < n} | {n}) if n > 1 else []


def evaluate(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], *, temperature: float, seed: int = 0, samples_per_prompt: int = 1) -> EvalResult:
    """Greedy accuracy, and `samples_per_prompt` episodes per problem at `temperature` with a fixed seed (`eval_seed`).

    Other sampling settings are the runner's. The sampled accuracy is the mean over all samples
    (the unbiased pass@1); with n > 1 samples `pass_at` holds the unbiased pass@k (Chen et al.
    2107.03374, `metrics.pass_at_k_batch`) for k = 2, 4, ... and n. The seeded generator lives
    on the engine's device (a CPU generator cannot draw on CUDA). Tasks that name splits of
    their held-out problems (`Task.eval_split`) also get the sampled accuracy of each.
    """
    acc_g, len_g = accuracy(runner.with_params(temperature=0.0), task, problems)
    sampled = runner.with_params(temperature=temperature, top_p=1.0, top_k=0)
    generator = torch.Generator(runner.engine.device).manual_seed(eval_seed(seed))
    n = samples_per_prompt
    scored = _sample_and_score(sampled, task, problems, n, generator)
    pass_at = {}
    if problems and n > 1:
        pass_at = {f"pass@{k}": float(pass_at_k_batch([n] * len(problems), scored.correct_P, k).mean()) for k in pass_at_ks(n)}
    splits: dict[str, list[int]] = {}
    for problem, correct in zip(problems, scored.correct_P):
        if (split := task.eval_split(problem)) is not None:
            splits.setdefault(split, []).append(correct)
    return EvalResult(
        acc_g, sum(scored.correct_P) / max(1, n * len(problems)), len_g, scored.mean("num_gen_tokens"), len(problems), n, pass_at,
        mean_turns_sampled=scored.mean("num_turns"), mean_tool_calls_sampled=scored.mean("num_tool_calls"),
        accuracy_sampled_by_split={k: sum(v) / (n * len(v)) for k, v in sorted(splits.items())},
    )
