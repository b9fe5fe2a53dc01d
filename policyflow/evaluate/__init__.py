"""Held-out evaluation: greedy and sampled accuracy, pass@k, and tokens spent per answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from policyflow.engine import Sampler, SamplingParams
from policyflow.metrics import pass_at_k_batch
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

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        scalars = {f"{prefix}{k}": float(v) for k, v in asdict(self).items() if k != "pass_at"}
        return scalars | {f"{prefix}{k}": float(v) for k, v in self.pass_at.items()}


def accuracy(
    sampler: Sampler, task: Task, problems: Sequence[Problem], prompt_ids: Sequence[list[int]], params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Fraction of problems answered correctly, and mean completion tokens."""
    correct_P, tokens = _sample_and_score(sampler, task, problems, prompt_ids, params, 1, generator)
    n = max(1, len(problems))
    return sum(correct_P) / n, tokens / n


def _sample_and_score(
    sampler: Sampler, task: Task, problems: Sequence[Problem], prompt_ids: Sequence[list[int]], params: SamplingParams, n: int, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Correct samples per problem out of `n` each, and the completion tokens of all samples."""
    samples = sampler.generate([ids for ids in prompt_ids for _ in range(n)], params, generator=generator)
    score = task.score([p for p in problems for _ in range(n)], [s.text for s in samples])
    correct_P = [sum(score.correct[i * n:(i + 1) * n]) for i in range(len(problems))]
    return correct_P, sum(len(s.token_ids) for s in samples)


def pass_at_ks(n: int) -> list[int]:
    """The k reported for n samples per prompt: powers of two below n, and n."""
    return sorted({2**i for i in range(1, n.bit_length()) if 2**i < n} | {n}) if n > 1 else []


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
    samples_per_prompt: int = 1,
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Greedy accuracy, and `samples_per_prompt` samples per problem at `temperature` with a fixed seed.

    The sampled accuracy is the mean over all samples (the unbiased pass@1); with n > 1 samples
    `pass_at` holds the unbiased pass@k (Chen et al. 2107.03374, `metrics.pass_at_k_batch`) for
    k = 2, 4, ... and n. The seeded generator lives on `device`, the model's (a CPU generator
    cannot draw on CUDA).
    """
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=stop)
    sampled = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, stop=stop)
    acc_g, len_g = accuracy(sampler, task, problems, prompt_ids, greedy)
    generator = torch.Generator(device=device).manual_seed(seed)
    n, P = samples_per_prompt, max(1, len(problems))
    correct_P, tokens = _sample_and_score(sampler, task, problems, prompt_ids, sampled, n, generator)
    pass_at = {}
    if problems and n > 1:
        pass_at = {f"pass@{k}": float(pass_at_k_batch([n] * len(problems), correct_P, k).mean()) for k in pass_at_ks(n)}
    return EvalResult(acc_g, sum(correct_P) / (n * P), len_g, tokens / (n * P), len(problems), n, pass_at)
