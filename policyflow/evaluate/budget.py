"""Accuracy against a thinking budget: the same held-out problems, evaluated again under several caps.

Method. A budget b caps the tokens an episode generates, all its engine calls together: each
call's `max_new_tokens` is cut to what the episode has left (`episodes.SeededCalls`), and once
b tokens are spent the episode cannot act any more (its later calls return nothing) and ends at
its own limits. Nothing forces an answer: a completion cut at b is judged by the env as it
stands, so the curve shows what the model answers within b tokens, not what it would answer if
made to stop thinking. Runs are greedy (one episode per problem, temperature 0), so the only
difference between two budgets is the cap: for a single-turn task the episode at budget b is
the unbudgeted greedy completion cut after b tokens.

Default budgets (`eval.budgets` empty): powers of two below the longest unbudgeted greedy
episode (those within 25% of it left out), which is itself the last point (a cap it never reaches changes nothing, so it is not
run again). Every budget b below the longest episode re-runs all problems, each episode for at
most min(b, its unbudgeted length) tokens: the ladder (powers of two) costs under 2·L_max tokens
per problem, L_max the longest episode's length, which is up to 2·L_max / (mean length) times
the unbudgeted run, not twice it, when most episodes are much shorter than the longest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policyflow.agent.episode import EpisodeRunner
from policyflow.evaluate.episodes import is_correct, run_sets
from policyflow.metrics import Estimate, mean_estimate
from policyflow.tasks.base import Problem, Task
from policyflow.types import Trajectory

MAX_DEFAULT_POINTS = 12


@dataclass(frozen=True)
class BudgetPoint:
    """Greedy accuracy with at most `budget` generated tokens per episode."""

    budget: int
    accuracy: Estimate
    mean_tokens: float  # generated tokens per episode (≤ budget)
    cut_fraction: float  # episodes whose last call finished "length" (cut by the budget, or by sampling.max_new_tokens)


def default_budgets(longest: int) -> list[int]:
    """Powers of two p with 1.25·p < `longest` (a cap that close to the longest episode says little;
    at most MAX_DEFAULT_POINTS − 1 of them, the largest kept), then `longest`."""
    powers = [2**i for i in range(max(0, longest - 1).bit_length()) if 1.25 * 2**i < longest]
    return powers[-(MAX_DEFAULT_POINTS - 1):] + [max(1, longest)]


def budget_point(budget: int, episodes_P: Sequence[Trajectory]) -> BudgetPoint:
    """The point of one budget from its greedy episodes (one per problem)."""
    count = max(1, len(episodes_P))
    return BudgetPoint(
        budget, mean_estimate([float(is_correct(t)) for t in episodes_P]),
        sum(t.num_gen_tokens for t in episodes_P) / count,
        sum(t.finish_reason == "length" for t in episodes_P) / count,
    )


def accuracy_by_budget(
    greedy: EpisodeRunner, task: Task, problems: Sequence[Problem], unbudgeted_P: Sequence[Trajectory], budgets: Sequence[int] = (),
) -> list[BudgetPoint]:
    """Greedy accuracy at each budget (`budgets`, else `default_budgets`), ascending; a budget at
    or above the longest unbudgeted episode reuses `unbudgeted_P` (the cap would not bind)."""
    longest = max((t.num_gen_tokens for t in unbudgeted_P), default=1)
    ladder = sorted(set(budgets or default_budgets(longest)))
    binding = [b for b in ladder if b < longest]
    runs = dict(zip(binding, run_sets(*(((greedy, task, problems, 1), dict(run_seed=None, budget=b)) for b in binding))))  # one batch
    return [budget_point(b, [g[0] for g in runs[b]] if b in runs else unbudgeted_P) for b in ladder]
