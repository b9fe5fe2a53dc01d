"""Held-out evaluation: greedy and sampled accuracy, and tokens spent per answer."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from policyflow.engine import Sampler, SamplingParams
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


def accuracy(
    sampler: Sampler, task: Task, problems: Sequence[Problem], prompt_ids: Sequence[list[int]], params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Fraction of problems answered correctly, and mean completion tokens."""
    samples = sampler.generate(list(prompt_ids), params, generator=generator)
    score = task.score(problems, [s.text for s in samples])
    n = max(1, len(problems))
    return sum(score.correct) / n, sum(len(s.token_ids) for s in samples) / n


def eval_seed(seed: int) -> int:
    """The sampling seed of the evaluation for run seed `seed`: a stream of its own.

    Rollout worker i samples from `torch.Generator().manual_seed(seed + 1000·i)`; seeding the
    evaluation with `seed` itself would make its draws the very uniforms of worker 0's first
    rollout batch (correlated noise between a score and the data it trains on). This hashes
    (seed, "eval") instead, stable across processes.
    """
    digest = hashlib.sha256(f"{seed}/eval".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def evaluate(
    sampler: Sampler,
    task: Task,
    problems: Sequence[Problem],
    prompt_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    stop: tuple[str, ...] = (),
    seed: int = 0,
) -> EvalResult:
    """Greedy accuracy and accuracy of one sample at `temperature`, sampled from the fixed stream `eval_seed(seed)`."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=stop)
    sampled = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop=stop)
    acc_g, len_g = accuracy(sampler, task, problems, prompt_ids, greedy)
    generator = torch.Generator().manual_seed(eval_seed(seed))
    acc_s, len_s = accuracy(sampler, task, problems, prompt_ids, sampled, generator)
    return EvalResult(acc_g, acc_s, len_g, len_s, len(problems))
