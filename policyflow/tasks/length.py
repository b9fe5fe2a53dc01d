"""Prompts that fit the model's context, checked when the task loads (before any reaches an engine).

A prompt may take `limit = context − sampling.max_new_tokens` tokens (as rendered: the task's
wording and the chat template included). `task.on_long_prompt` decides what happens to a
longer one:

- `error` (default): refuse, naming the row, its token count and the limit;
- `truncate`: keep the prompt's last tokens (left truncation: the question usually ends a
  prompt, and a reward compares the answer, so the end matters most), cut at a token boundary;
- `skip`: drop the row, with a warning counting the dropped rows.

The check is cheap for huge rows: no token of a tokenizer stands for more than
`max_token_chars` characters, so a text of c characters has at least c / max_token_chars
tokens; a row whose character count alone proves it too long is refused or cut down by
characters before anything is tokenized (a 10 MB row is never tokenized whole).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from policyflow.tasks.base import Problem, Progress, TaskError

logger = logging.getLogger(__name__)
ON_LONG_PROMPT = ("error", "truncate", "skip")


class PromptTooLongError(TaskError):
    """A prompt does not fit the model's context (task.on_long_prompt=error)."""


@dataclass(frozen=True)
class PromptFit:
    """How to measure and cut prompts: `count(text)` renders and counts tokens; `cut(text, n)` drops the first n tokens."""

    count: Callable[[str], int]
    cut: Callable[[str, int], str]
    context: int
    max_new_tokens: int
    max_token_chars: int
    on_long: str = "error"
    call_cap: int | None = None  # agent.max_total_tokens: one call's context + completion

    @property
    def limit(self) -> int:
        room = self.context - self.max_new_tokens
        return room if self.call_cap is None else min(room, self.call_cap - 1)

    def _too_long(self, problem: Problem, size: str) -> PromptTooLongError:
        return PromptTooLongError(
            f"{problem.id}: the prompt is {size}, but the model's context of {self.context} tokens minus "
            f"sampling.max_new_tokens={self.max_new_tokens}{f' (and agent.max_total_tokens={self.call_cap})' if self.call_cap else ''} "
            f"leaves {self.limit}; shorten it, or set "
            f"task.on_long_prompt=truncate (keep its last tokens) or skip (drop such rows)"
        )

    def fit(self, problem: Problem, render: Callable[[Problem], str]) -> Problem | None:
        """The problem itself when it fits, else per on_long: an error, a left-truncated copy, or None (skip)."""
        chars = len(render(problem))
        if chars > self.limit * self.max_token_chars:  # too long without tokenizing
            if self.on_long == "error":
                raise self._too_long(problem, f"{chars:,} characters, so at least {chars // self.max_token_chars:,} tokens")
            if self.on_long == "skip":
                return None
            keep = self.limit * self.max_token_chars  # still at least `limit` tokens: cut precisely below
            problem = replace(problem, prompt=problem.prompt[len(problem.prompt) - min(keep, len(problem.prompt)):])
        tokens = self.count(render(problem))
        if tokens <= self.limit:
            return problem
        if self.on_long == "error":
            raise self._too_long(problem, f"{tokens} tokens")
        if self.on_long == "skip":
            return None
        for _ in range(8):  # cutting can merge tokens differently; a few rounds converge
            problem = replace(problem, prompt=self.cut(problem.prompt, tokens - self.limit))
            tokens = self.count(render(problem))
            if tokens <= self.limit:
                return problem
        raise TaskError(f"{problem.id}: could not truncate the prompt to {self.limit} tokens (the task's own wording may be longer); raise the context or lower sampling.max_new_tokens")

    def fit_all(self, problems: Sequence[Problem], render: Callable[[Problem], str], what: str) -> list[Problem]:
        """`fit` over a list; dropped and truncated rows are counted in a warning."""
        progress = Progress(f"fitting {what} to the context", len(problems))
        fitted: list[Problem | None] = []
        for problem in problems:
            progress(len(fitted))
            fitted.append(self.fit(problem, render))
        dropped = sum(1 for q in fitted if q is None)
        cut = sum(1 for p, q in zip(problems, fitted) if q is not None and q.prompt != p.prompt)
        if dropped or cut:
            action = "dropped (task.on_long_prompt=skip)" if dropped else "left-truncated (task.on_long_prompt=truncate)"
            logger.warning("%s: %d prompt(s) longer than %d tokens were %s", what, dropped or cut, self.limit, action)
        return [q for q in fitted if q is not None]
