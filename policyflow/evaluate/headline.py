"""The headline numbers of an evaluation (`EvalResult`): what training logs, summary.json keeps and
`policyflow eval` prints, computed from the greedy and sampled episodes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from policyflow.evaluate.episodes import is_correct
from policyflow.metrics import pass_at_k_batch
from policyflow.tasks.base import Problem, Task
from policyflow.types import Trajectory


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


def k_ladder(n: int) -> list[int]:
    """The default k for n samples per prompt: 1, 2, 4, ... below n, and n."""
    return sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n})


def pass_at_ks(n: int) -> list[int]:
    """The k of the training headline's pass@k: the ladder without 1 (pass@1 is accuracy_sampled)."""
    return [k for k in k_ladder(n) if k > 1]


def correct_counts(groups_P: Sequence[Sequence[Trajectory]]) -> list[int]:
    """Correct episodes per problem."""
    return [sum(is_correct(t) for t in g) for g in groups_P]


def mean_of(groups_P: Sequence[Sequence[Trajectory]], attribute: str) -> float:
    """The mean of a trajectory attribute over every episode."""
    episodes = [t for g in groups_P for t in g]
    return sum(getattr(t, attribute) for t in episodes) / max(1, len(episodes))


def headline(task: Task, problems: Sequence[Problem], greedy_P: Sequence[Sequence[Trajectory]], sampled_P: Sequence[Sequence[Trajectory]]) -> EvalResult:
    """Greedy accuracy (one episode per problem), and from n sampled episodes per problem the
    accuracy (the mean over all samples: the unbiased pass@1), the unbiased pass@k (Chen et al.
    2107.03374, `metrics.pass_at_k_batch`) for k = 2, 4, ... and n, and the sampled accuracy of
    each held-out split the task names (`Task.eval_split`)."""
    n = len(sampled_P[0]) if sampled_P else 1
    correct_P = correct_counts(sampled_P)
    pass_at = {}
    if problems and n > 1:
        pass_at = {f"pass@{k}": float(pass_at_k_batch([n] * len(problems), correct_P, k).mean()) for k in pass_at_ks(n)}
    splits: dict[str, list[int]] = {}
    for problem, correct in zip(problems, correct_P):
        if (split := task.eval_split(problem)) is not None:
            splits.setdefault(split, []).append(correct)
    return EvalResult(
        sum(correct_counts(greedy_P)) / max(1, len(problems)), sum(correct_P) / max(1, n * len(problems)),
        mean_of(greedy_P, "num_gen_tokens"), mean_of(sampled_P, "num_gen_tokens"), len(problems), n, pass_at,
        mean_turns_sampled=mean_of(sampled_P, "num_turns"), mean_tool_calls_sampled=mean_of(sampled_P, "num_tool_calls"),
        accuracy_sampled_by_split={k: sum(v) / (n * len(v)) for k, v in sorted(splits.items())},
    )
