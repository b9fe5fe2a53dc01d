"""The task interface: problems with a prompt, a reference answer, a verifiable reward, and
the envs its episodes run in (`Task.group_builder`).

This is the interface a user's own task implements (`task.name=my_package.my_module:MyTask`,
`tasks/registry.py`; a complete one is `examples/my_task.py`): subclass `Task`, implement the
abstract methods, and for multi-turn episodes return an env group builder from
`group_builder` (a `agent.tool_env.ToolGroupBuilder` for tools, or your own `EnvGroupBuilder`).
Tasks import `agent/`; `agent/` never imports `tasks/` (the records both use are in
`policyflow/problems.py`, re-exported here).
"""

from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from policyflow.agent.env import EnvGroupBuilder, SingleTurnGroupBuilder, WorkerResources
from policyflow.problems import Problem, Score

if TYPE_CHECKING:
    from policyflow.tasks.length import PromptFit

T = TypeVar("T")
logger = logging.getLogger(__name__)
# A long preparation (drawing held-out problems, reading and fitting a task's rows) logs how far it
# is this often; a quick one says nothing.
PROGRESS_EVERY_S = 10.0


class TaskError(ValueError):
    """A task cannot be built or used as configured; the message says what to change."""


class Task(ABC):
    """A source of problems with a reward. Synthetic tasks are seeded; train and held-out are disjoint."""

    name: str = "task"
    # Strings that end a completion (in addition to the EOS token).
    stop: tuple[str, ...] = ()
    # The text a plain (non-chat) model sees before and after each observation (tool result),
    # e.g. ("<info>", "</info>"). Declared here once: the task's envs expose it to the episode
    # runner (`Env.observation_wrap`) and SFT demonstrations read it from here; either way
    # `tokens.render_observation` adds it around the cut content. Chat models ignore it.
    observation_wrap: tuple[str, str] = ("", "")
    # What the rollout worker running this task holds (its engine, frozen models, tool pools),
    # given by `attach` before the first `group_builder` call; None outside a rollout worker.
    resources: WorkerResources | None = None

    @abstractmethod
    def train_problem(self, index: int) -> Problem:
        """The index-th training problem; deterministic given the task's seed. Never a held-out one."""

    @abstractmethod
    def eval_problems(self) -> Sequence[Problem]:
        """The fixed held-out set."""

    def eval_split(self, problem: Problem) -> str | None:
        """The held-out split `problem` belongs to, for a per-split accuracy (`EvalResult`); None: no splits."""
        return None

    def render_prompt(self, problem: Problem) -> str:
        """The text the model is conditioned on (the user message, for chat models)."""
        return problem.prompt

    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools a chat template shows with every prompt of this task (their function
        schemas, `Tool.schema()`, passed as `tools=`); None: no tools are rendered (plain tasks,
        and tag-format tools, which the prompt text describes).

        Every stage renders a problem's prompt from `render_prompt` and this list with one
        function (`tokens.task_prompt_ids`: SFT rows, prompt fitting; the episode runner renders
        its env's `initial_observation()` and `tools`, which the task's envs take from here), so
        the warm-start trains on the prompts RL samples from."""
        return None

    def group_builder(self, problem: Problem) -> EnvGroupBuilder:
        """The builder of `problem`'s G envs (a GRPO group); one call per group.

        By default single-turn episodes: the prompt, one completion, scored by `score` for the
        whole group at once (`agent.env.SingleTurnGroupBuilder`). A multi-turn task returns its
        own: `agent.tool_env.ToolGroupBuilder` runs parse → tools → observe → answer for any
        tools, answer check and reward parts (search_qa is one such configuration), or any
        `EnvGroupBuilder` of yours (`agent/env.py` documents the `Env` interface).

        In a rollout worker, `self.resources` holds what the worker holds (`attach`): a builder
        whose reward comes from a model takes it from there."""
        return SingleTurnGroupBuilder(self, problem)

    def attach(self, resources: WorkerResources) -> None:
        """Called once by the rollout worker that runs this task, before its first `group_builder`
        call, with what the worker holds (`agent.env.WorkerResources`: its generator by role, frozen
        models, tool pools); kept as `self.resources`. Override it to set up from them (call super)."""
        self.resources = resources

    def sft_completion(self, problem: Problem) -> str:
        """The reference completion used for the supervised warm-start."""
        return problem.answer

    def explanation(self, problem: Problem) -> str | None:
        """A short worked explanation that leads from `problem`'s prompt to its answer (not the answer
        itself), or None when the task has none (the default). RLT's teacher is warm-started on these
        and its student reads them (`selfplay/teacher.py`); arithmetic writes a column-addition trace."""
        return None

    def sft_problem(self, index: int) -> Problem:
        """The index-th warm-start problem; by default the index-th training problem (`sft.py`
        asks from index `SFT_PROBLEM_OFFSET` on, so RL starts on problems SFT never showed)."""
        return self.train_problem(index)

    def sft_turns(self, problem: Problem) -> list[tuple[str, str]]:
        """The warm-start demonstration after the prompt as (kind, text) turns: 'gen' turns are
        trained on, 'obs' turns (tool results, unwrapped, as the env returns them) are context
        only. One 'gen' turn by default. A gen turn is what the model writes in one turn: one
        that ends with one of `stop` ended on that stop string; any other ended with the
        end-of-turn (EOS) token, which it is trained to write (Hermes tool calls), as the
        last turn always is (`sft.demonstration_rows`)."""
        return [("gen", self.sft_completion(problem))]

    @abstractmethod
    def extract_answer(self, completion: str) -> str | None:
        """The answer in a completion, or None if there is none."""

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        """Whether `answer` is a right answer to `problem`: the one correctness contract.

        `answer` is an answer as `extract_answer` returns it from a completion (None: the
        completion has none, never correct); tool episodes pass the text of the final answer
        (`agent.tool_env.ToolSetup.check`). A pure function of (problem, answer), so that
        `score(...).correct[i] == is_correct(problems[i], extract_answer(completions[i]))` and
        evaluation can judge answers on their own: maj@k votes over extracted answers and judges
        the winner with this. By default the stripped answer equals the stripped reference;
        override it when other answers are right too (countdown: any valid expression).
        """
        return answer is not None and answer.strip() == problem.answer.strip()

    def read_problem(self, text: str) -> Problem | None:
        """A problem of this task written by a model (R-Zero's challenger: `selfplay/challenger.py`), read
        from `text`: a Problem with an empty answer, or None when `text` is not a well-formed problem of
        this task, or is one of its held-out problems (a run must never train on them). The default reads
        none, so the task cannot be a challenger's: override it to make it one (arithmetic does)."""
        return None

    def true_answer(self, problem: Problem) -> str | None:
        """The right answer of a problem made at run time, where the task can compute it (arithmetic:
        the sum); None where it cannot (the default). Read only to measure how often pseudo-labels are
        right (R-Zero's log); never by training."""
        return None

    def trivial_problems(self) -> Sequence[Problem]:
        """Problems the model should answer at once ("1+1="): evaluation measures the tokens spent
        on them against the tokens spent on the held-out set (over-thinking; Nous Research, "The
        Missing Benchmark"). () when the task has none; `eval.trivial_path` gives a file instead."""
        return ()

    @abstractmethod
    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """Rewards and correctness for completions[i] answering problems[i] (`Score.correct`
        agrees with `is_correct` on the extracted answers)."""

    def limit_prompts(self, fit: PromptFit) -> None:
        """Make every prompt fit the model's context (tasks/length.py), or raise.

        Generated tasks have prompts of bounded length: their held-out set and first 64
        training problems are checked and any that does not fit is refused (their prompts are
        not truncated or skipped). Tasks that hold their rows (jsonl) fit every row.
        """
        strict = replace(fit, on_long="error")
        for problem in [*self.eval_problems(), *(self.train_problem(i) for i in range(64))]:
            strict.fit(problem, self.render_prompt)


def last_tagged(text: str, tag: str) -> str | None:
    """The content of the last complete `<tag>…</tag>` in `text` (the first closing tag after
    each opening one, pairs taken left to right), or None. One pass: a regex `<tag>(.*?)</tag>`
    with findall is quadratic on text repeating the opening tag, which a model can write."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    last, pos = None, 0
    while (start := text.find(opening, pos)) >= 0:
        end = text.find(closing, start + len(opening))
        if end < 0:
            break
        last, pos = text[start + len(opening):end], end + len(closing)
    return last


def tagged_answer(completion: str) -> str | None:
    """The content of the completion's last `<answer>…</answer>`, stripped, or None."""
    found = last_tagged(completion, "answer")
    return None if found is None else found.strip()


def same_integer(answer: str, reference: str) -> bool:
    """Whether `answer` is ASCII digits naming the integer `reference` (leading zeros ignored).
    Compared as text, so no answer a model writes is too long to convert (int() stops at 4300 digits)."""
    digits = answer.strip()
    return digits.isascii() and digits.isdigit() and digits.lstrip("0") == reference.lstrip("0")


def check_batch(problems: Sequence[Problem], completions: Sequence[str]) -> None:
    """Raise ValueError unless there is exactly one completion per problem."""
    if len(problems) != len(completions):
        raise ValueError(f"score() got {len(problems)} problems but {len(completions)} completions; pass one completion per problem")


def seeded_rng(seed: int, *labels: object) -> random.Random:
    """A generator determined by (seed, *labels) alone, stable across processes and runs.

    Python seeds `random.Random` from a string through SHA-512, so this does not depend on
    PYTHONHASHSEED.
    """
    return random.Random("/".join(str(part) for part in (seed, *labels)))


class Progress:
    """Notes on how far a long preparation is: one log line every PROGRESS_EVERY_S seconds, none for a quick one."""

    def __init__(self, what: str, total: int | None = None):
        self.what, self.total = what, total
        self._next = time.monotonic() + PROGRESS_EVERY_S

    def __call__(self, done: int) -> None:
        if time.monotonic() >= self._next:
            self._next = time.monotonic() + PROGRESS_EVERY_S
            logger.warning("note: %s: %s%s done so far", self.what, f"{done:,}", f" of {self.total:,}" if self.total else "")


def sample_distinct(draw: Callable[[random.Random], T], key: Callable[[T], Hashable], count: int, rng: random.Random, what: str) -> list[T]:
    """`count` draws with pairwise different keys (the held-out set of a synthetic task)."""
    chosen: list[T] = []
    seen: set[Hashable] = set()
    progress = Progress(f"drawing {count:,} distinct held-out {what} (task.num_eval)", count)
    for _ in range(100 * count + 1000):
        if len(chosen) == count:
            return chosen
        progress(len(chosen))
        item = draw(rng)
        if key(item) not in seen:
            seen.add(key(item))
            chosen.append(item)
    if len(chosen) == count:
        return chosen
    raise TaskError(f"could not draw {count} distinct held-out {what} (got {len(chosen)}); lower task.num_eval or widen the problem space")


def sample_excluding(draw: Callable[[random.Random], T], key: Callable[[T], Hashable], excluded: frozenset[Hashable] | set[Hashable], rng: random.Random, what: str) -> T:
    """One draw whose key is not in `excluded` (a training problem is never a held-out one)."""
    for _ in range(10_000):
        item = draw(rng)
        if key(item) not in excluded:
            return item
    raise TaskError(f"could not draw a training {what} outside the held-out set; lower task.num_eval or widen the problem space")
