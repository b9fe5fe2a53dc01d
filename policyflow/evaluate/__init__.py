"""Held-out evaluation: greedy and sampled accuracy, pass@k, avg@k, maj@k, and thinking efficiency.

Each held-out problem is one episode (n for the sampled metrics) on the same episode runner as
training rollouts, so multi-turn tasks are evaluated as they are trained; an episode is correct
when its `correct` reward part is 1. The runner's generator may be the local engine or a remote
endpoint (`engine.remote.RemoteGenerator`): the code is the same.

    evaluate(runner, task, problems, ...)          -> EvalResult: the headline (training, summary.json)
    full_evaluation(runner, task, problems, ...)   -> Evaluation: the headline and the full report
    write_report(root, evaluation, ...)            -> runs/<name>/eval/<NNN>-<time>/ (report.json, report.png, episodes.jsonl)

Modules: `episodes.py` (per-request seeds, budgets, answers), `headline.py` (EvalResult),
`budget.py` (accuracy against a token budget), `report.py` (every statistic with its standard
error, the trivial set), `output.py` (the report folder and its plot).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from policyflow.agent.episode import EpisodeRunner
from policyflow.evaluate.episodes import is_correct, request_seed, run_sets
from policyflow.evaluate.headline import EvalResult, headline, pass_at_ks
from policyflow.evaluate.report import EvalReport, Evaluation, full_evaluation, trivial_set
from policyflow.evaluate.output import new_report_folder, write_report
from policyflow.rollout import rollout_groups
from policyflow.tasks.base import Problem, Task

__all__ = [
    "EvalReport", "EvalResult", "Evaluation", "accuracy", "eval_seed", "evaluate", "full_evaluation",
    "new_report_folder", "pass_at_ks", "request_seed", "trivial_set", "write_report",
]


def accuracy(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], generator: torch.Generator | None = None) -> tuple[float, float]:
    """Fraction of problems answered correctly (one episode each, with the runner's sampling, drawing
    from `generator`: None, the engine's), and mean generated tokens. Greedy checks (the SFT
    stopping rule) and benchmarks; `evaluate` seeds every request instead."""
    groups, _ = rollout_groups(runner, task, problems, 1, generator)
    episodes = [t for g in groups for t in g.trajectories]
    return sum(map(is_correct, episodes)) / max(1, len(problems)), sum(t.num_gen_tokens for t in episodes) / max(1, len(episodes))


def eval_seed(seed: int) -> int:
    """A sampling seed of its own for run seed `seed`, for code that samples an evaluation from one
    shared `torch.Generator` (benchmarks through `accuracy`).

    Rollout worker i samples from `torch.Generator().manual_seed(seed + 1000·i)`; seeding with
    `seed` itself would make the draws the very uniforms of worker 0's first rollout batch. This
    hashes (seed, "eval") instead, stable across processes. (`evaluate` seeds each request on its
    own: `episodes.request_seed`.)
    """
    digest = hashlib.sha256(f"{seed}/eval".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def evaluate(runner: EpisodeRunner, task: Task, problems: Sequence[Problem], *, temperature: float, seed: int = 0, samples_per_prompt: int = 1) -> EvalResult:
    """Greedy accuracy, and `samples_per_prompt` episodes per problem at `temperature` (top_p 1,
    top_k 0; other settings are the runner's), each request seeded from (seed, problem index,
    sample index, call index) (`episodes.request_seed`): the result does not depend on how the
    problems are batched, and an endpoint that honours seeds reproduces it. See `headline` for
    what is reported."""
    greedy, sampled = runner.with_params(temperature=0.0), runner.with_params(temperature=temperature, top_p=1.0, top_k=0)
    greedy_P, sampled_P = run_sets(((greedy, task, problems, 1), dict(run_seed=None)), ((sampled, task, problems, samples_per_prompt), dict(run_seed=seed)))
    return headline(task, problems, greedy_P, sampled_P)
