"""The full evaluation report: pass@k, avg@k and maj@k with standard errors, and thinking efficiency.

Estimators (`metrics.py` has the formulas). Over P held-out problems with n sampled episodes
each (c_p correct):

* pass@k: the unbiased estimator 1 − C(n−c, k)/C(n, k) per problem (Chen et al. 2107.03374);
* avg@n: c_p/n per problem, the expected accuracy of one sample (= pass@1);
* maj@k: the probability that the most frequent answer (as `Task.extract_answer` reads it, or
  the tool env's final answer; answers compared as stripped strings; no-answer samples never
  win) among k of the n samples drawn without replacement is right by `Task.is_correct`,
  computed exactly over all C(n, k) subsets; ties broken uniformly at random;
* each reported as the mean over problems with its standard error sd/√P (problems are the
  sampling unit: Miller, arXiv 2411.00640), None below two problems.

Thinking efficiency (Nous Research, "Measuring Thinking Efficiency in Reasoning Models: The
Missing Benchmark"):

* tokens per episode (every turn's generated tokens), and their means over correct and over
  wrong episodes;
* accuracy against a token budget (`budget.py`: the method);
* the trivial set (`Task.trivial_problems`, or `eval.trivial_path`): the same greedy and sampled
  evaluation, and the ratio of its mean tokens per episode to the held-out set's (> 1: the model
  spends more on `1+1=` than on the real problems);
* agent tasks: turns and tool calls per episode (means and histograms).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from policyflow.agent.episode import EpisodeRunner
from policyflow.evaluate.budget import BudgetPoint, accuracy_by_budget
from policyflow.evaluate.episodes import episode_answer, is_correct, run_sets
from policyflow.evaluate.headline import EvalResult, correct_counts, headline, k_ladder
from policyflow.metrics import Estimate, avg_at_k_estimate, maj_at_k_estimate, mean_estimate, pass_at_k_estimate
from policyflow.tasks.base import Problem, Task, TaskError
from policyflow.tasks.jsonl import RowFormat, read_rows
from policyflow.types import Trajectory

METHODS = {
    "pass@k": "unbiased 1 - C(n-c,k)/C(n,k) per problem (Chen et al. 2107.03374), mean over problems",
    "avg@n": "fraction correct of the n samples per problem (= pass@1), mean over problems",
    "maj@k": "P(the most frequent extracted answer of k of the n samples, drawn without replacement, is correct by Task.is_correct); exact over all k-subsets, ties split evenly, no-answer samples never win",
    "stderr": "sd of the per-problem values / sqrt(problems) (problems are the sampling unit; Miller 2411.00640); null below 2 problems",
    "seeds": "each sampled request is seeded from (run seed, problem set, problem index, sample index, call index): independent of batching, reproducible by an endpoint that honours seeds",
    "budgets": "greedy re-runs with at most `budget` generated tokens per episode, all turns together (each call's max_new_tokens cut to what is left; nothing forces an answer)",
    "tokens": "generated tokens per episode, every turn together",
    "trivial_token_ratio": "mean tokens per episode on the trivial set / on the held-out set",
}


@dataclass(frozen=True)
class TokenStats:
    """Generated tokens per episode."""

    mean: float
    correct_mean: float | None  # None: no correct episode
    wrong_mean: float | None  # None: no wrong episode
    counts: tuple[int, ...]  # every episode's, in problem order (histograms)
    correct: tuple[bool, ...]  # whether each of those episodes was correct


@dataclass(frozen=True)
class EpisodeStats:
    """One set of episodes (greedy or sampled; held-out or trivial)."""

    episodes: int
    accuracy: Estimate  # per-problem fraction correct, mean over problems
    tokens: TokenStats
    turns_mean: float
    tool_calls_mean: float
    turns: dict[int, int]  # engine calls per episode -> episodes
    tool_calls: dict[int, int]  # tool calls per episode -> episodes
    truncated_fraction: float


@dataclass(frozen=True)
class TrivialStats:
    source: str  # "task" (`Task.trivial_problems`) or the eval.trivial_path file
    num_problems: int
    greedy: EpisodeStats
    sampled: EpisodeStats
    token_ratio_greedy: float | None  # trivial tokens per episode / held-out tokens per episode; None when the held-out mean is 0
    token_ratio_sampled: float | None


@dataclass(frozen=True)
class EvalReport:
    task: str
    model_version: int
    num_problems: int
    samples_per_prompt: int
    temperature: float
    seed: int
    greedy: EpisodeStats
    sampled: EpisodeStats
    pass_at: dict[str, Estimate]  # "pass@k"
    avg_at: dict[str, Estimate]  # "avg@n"
    maj_at: dict[str, Estimate]  # "maj@k"
    accuracy_sampled_by_split: dict[str, Estimate]
    budgets: list[BudgetPoint]
    trivial: TrivialStats | None
    methods: dict[str, str]


@dataclass(frozen=True)
class Evaluation:
    """A full evaluation: the headline, the report, and the episodes it was computed from."""

    result: EvalResult
    report: EvalReport
    greedy_P: list[list[Trajectory]]
    sampled_P: list[list[Trajectory]]
    problems: list[Problem]
    trivial_problems: list[Problem]
    trivial_greedy_P: list[list[Trajectory]]
    trivial_sampled_P: list[list[Trajectory]]


def report_ks(n: int, asked: Sequence[int] = ()) -> list[int]:
    """The k of pass@k and maj@k: `asked` (each at most n), else 1, 2, 4, ... below n, and n."""
    if bad := [k for k in asked if not 1 <= k <= n]:
        raise ValueError(f"eval.pass_k={list(asked)}: k={bad[0]} needs 1 <= k <= eval.samples_per_prompt={n}; raise eval.samples_per_prompt or drop it")
    return sorted(set(asked)) if asked else k_ladder(n)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def episode_stats(groups_P: Sequence[Sequence[Trajectory]]) -> EpisodeStats:
    """Accuracy, tokens, turns and tool calls of a set of episodes, `groups_P[p]` those of problem p."""
    episodes = [t for g in groups_P for t in g]
    counts, correct = tuple(t.num_gen_tokens for t in episodes), tuple(map(is_correct, episodes))
    tokens = TokenStats(
        _mean(counts) or 0.0, _mean([c for c, ok in zip(counts, correct) if ok]), _mean([c for c, ok in zip(counts, correct) if not ok]), counts, correct,
    )
    return EpisodeStats(
        len(episodes), avg_at_k_estimate([max(1, len(g)) for g in groups_P], correct_counts(groups_P)), tokens,
        _mean([t.num_turns for t in episodes]) or 0.0, _mean([t.num_tool_calls for t in episodes]) or 0.0,
        dict(sorted(Counter(t.num_turns for t in episodes).items())), dict(sorted(Counter(t.num_tool_calls for t in episodes).items())),
        _mean([float(t.status == "truncated") for t in episodes]) or 0.0,
    )


def _judged(task: Task, problem: Problem, answer: str) -> bool:
    try:
        return bool(task.is_correct(problem, answer))
    except Exception:  # deliberate containment: the answer is model output, the check may be a user's
        return False


def votes(task: Task, problem: Problem, episodes: Sequence[Trajectory]) -> tuple[list[int], list[bool], int]:
    """The answers of one problem's episodes as (votes per distinct answer, its correctness, n)."""
    answers = Counter(a.strip() for t in episodes if (a := episode_answer(task, t)) is not None and a.strip())
    return list(answers.values()), [_judged(task, problem, a) for a in answers], len(episodes)


def trivial_set(task: Task, path: str | None, row_format: RowFormat | None = None) -> tuple[list[Problem], str]:
    """The trivial problems and where they come from: the .jsonl file at `path` (rows as the jsonl
    task reads them, in `row_format`; default columns prompt and answer, exact match), else the
    task's own (`Task.trivial_problems`); ([], "none") when neither has any."""
    if path:
        if not Path(path).is_file():
            raise TaskError(f"eval.trivial_path={path!r} is not a file; give a .jsonl file with one trivial problem per line, e.g. {{\"prompt\": \"1+1=\", \"answer\": \"2\"}}")
        rows = read_rows(Path(path), row_format or RowFormat("prompt", "answer"), "error", "trivial (eval.trivial_path)")
        return [dataclasses.replace(p, id=f"trivial:{p.id}") for p in rows.problems], str(path)
    problems = list(task.trivial_problems())
    return problems, "task" if problems else "none"


def full_evaluation(
    runner: EpisodeRunner, task: Task, problems: Sequence[Problem], *, temperature: float, seed: int, samples_per_prompt: int,
    pass_k: Sequence[int] = (), budgets: Sequence[int] = (), trivial: Sequence[Problem] = (), trivial_source: str = "task",
) -> Evaluation:
    """Greedy and sampled episodes of the held-out problems (as `evaluate`), the budget ladder, the
    trivial set; every statistic of the module docstring."""
    if not problems:
        raise TaskError("evaluation needs at least one held-out problem; raise eval.num_prompts or task.num_eval")
    n, problems, trivial = samples_per_prompt, list(problems), list(trivial)
    ks = report_ks(n, pass_k)
    greedy, sampled = runner.with_params(temperature=0.0), runner.with_params(temperature=temperature, top_p=1.0, top_k=0)
    greedy_P, sampled_P, trivial_greedy_P, trivial_sampled_P = run_sets(  # one batch on the engine
        ((greedy, task, problems, 1), dict(run_seed=None)), ((sampled, task, problems, n), dict(run_seed=seed)),
        ((greedy, task, trivial, 1), dict(run_seed=None, problem_set="trivial")), ((sampled, task, trivial, n), dict(run_seed=seed, problem_set="trivial")),
    )
    counts_P = correct_counts(sampled_P)
    by_split: dict[str, list[int]] = {}
    for i, problem in enumerate(problems):
        if (split := task.eval_split(problem)) is not None:
            by_split.setdefault(split, []).append(i)
    voted = [votes(task, p, g) for p, g in zip(problems, sampled_P)]
    greedy_stats, sampled_stats = episode_stats(greedy_P), episode_stats(sampled_P)
    trivial_stats = None
    if trivial:
        t_greedy, t_sampled = episode_stats(trivial_greedy_P), episode_stats(trivial_sampled_P)
        ratio = lambda a, b: a / b if b > 0 else None  # noqa: E731
        trivial_stats = TrivialStats(trivial_source, len(trivial), t_greedy, t_sampled, ratio(t_greedy.tokens.mean, greedy_stats.tokens.mean), ratio(t_sampled.tokens.mean, sampled_stats.tokens.mean))
    report = EvalReport(
        task=task.name, model_version=runner.generator.version, num_problems=len(problems), samples_per_prompt=n, temperature=temperature, seed=seed,
        greedy=greedy_stats, sampled=sampled_stats,
        pass_at={f"pass@{k}": pass_at_k_estimate([n] * len(problems), counts_P, k) for k in ks},
        avg_at={f"avg@{n}": avg_at_k_estimate([n] * len(problems), counts_P)},
        maj_at={f"maj@{k}": maj_at_k_estimate(voted, k) for k in ks},
        accuracy_sampled_by_split={s: mean_estimate([counts_P[i] / n for i in idx]) for s, idx in sorted(by_split.items())},
        budgets=accuracy_by_budget(greedy, task, problems, [g[0] for g in greedy_P], budgets),
        trivial=trivial_stats, methods=METHODS,
    )
    return Evaluation(headline(task, problems, greedy_P, sampled_P), report, greedy_P, sampled_P, problems, trivial, trivial_greedy_P, trivial_sampled_P)
