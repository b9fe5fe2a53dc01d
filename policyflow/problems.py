"""The records tasks and environments share: a `Problem` and the `Score` of completions; and
where a run's training problems come from (`ProblemSource`: a task's index-based training set,
or problems made at run time and recorded by a `RecordedSource`).

They live below both `tasks/` and `agent/` so the two depend one way: a task builds its envs
(`Task.group_builder`) and imports `agent/`; `agent/` never imports `tasks/` (DESIGN.md §6,
checked by tests/test_layering.py). `tasks.base` re-exports both, so `from policyflow.tasks.base
import Problem` keeps working.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Problem:
    """One task instance. `columns` carries any extra data a reward function may read."""

    id: str
    prompt: str
    answer: str
    columns: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """Rewards for a batch of completions, with the task's own correctness verdict.

    `correct[i]` is the task's answer check (used for accuracy); `rewards[i]` is what RL
    optimises. `errors` counts samples whose reward function raised or timed out (they get
    reward 0.0 and are logged, never dropped). `parts` are further named reward parts, one
    value per completion (logged as `reward/<name>`).
    """

    rewards: list[float]
    correct: list[bool]
    errors: int = 0
    parts: dict[str, list[float]] = field(default_factory=dict)


# -- where a run's training problems come from -------------------------------------------------


@runtime_checkable
class ProblemSource(Protocol):
    """The training problems of one policy, by issue index (`pool.RolloutPool` asks for 0, 1, 2, ...
    in order, each index once per run, from `LoopState.next_problem` on after a resume).

    `problem` is async so that a problem may be made at run time (self-play: a challenger model
    writes it). A source whose problems are made at run time is wrapped in a `RecordedSource`,
    which writes each one down as it is made, so that a resume replays them exactly."""

    async def problem(self, index: int) -> Problem: ...


class IndexedSource:
    """Problems that are a pure function of their index: a task's `train_problem(i)` (the default
    of every run). Nothing needs recording: a resume asks for the same indices and gets the same
    problems."""

    def __init__(self, problem: Callable[[int], Problem]) -> None:
        self._problem = problem

    async def problem(self, index: int) -> Problem:
        return self._problem(index)


PROBLEMS_FILE = "problems.jsonl"  # <policy folder>/problems.jsonl: the problems a RecordedSource made


class RecordedSource:
    """A source whose problems are made at run time, recorded as they are made.

    Each problem `source` makes is appended (one JSON line, flushed and fsynced before the problem
    is issued) to `path` (`<policy folder>/problems.jsonl`): task id, index, problem id, prompt,
    answer and metadata (`Problem.columns`, which must be JSON). Opened over an existing file (a
    resumed run), it replays the recorded problems by index exactly, and asks `source` only for
    indices it has not recorded. A source whose state depends on what it made (a counter, a
    generator) may define `replayed(problems)`: it is called once here with the recorded problems
    in index order, so it can catch up before making new ones.

    A line cut short by a crash mid-write (the file's last line, with no newline) is removed.
    """

    def __init__(self, source: ProblemSource, path: Path | str, *, task_id: Callable[[int], str] = lambda i: f"train-{i}") -> None:
        self.source, self.path, self.task_id = source, Path(path), task_id
        self._recorded: dict[int, Problem] = read_problems(self.path, repair=True)
        self._lock = asyncio.Lock()
        replayed = getattr(source, "replayed", None)
        if self._recorded and replayed is not None:
            replayed([self._recorded[i] for i in sorted(self._recorded)])

    @property
    def recorded(self) -> int:
        """How many problems the file holds."""
        return len(self._recorded)

    async def problem(self, index: int) -> Problem:
        async with self._lock:  # one maker at a time: the file's lines stay whole and in making order
            if index in self._recorded:
                return self._recorded[index]
            problem = self._append(index, await self.source.problem(index))
            self._recorded[index] = problem
            return problem

    def _append(self, index: int, problem: Problem) -> Problem:
        """Write `problem` down; returns it as read back from its line, which is what a resume
        replays (JSON turns tuples into lists), so both runs train the very same problem."""
        record = {"task_id": self.task_id(index), "index": index, "id": problem.id, "prompt": problem.prompt,
                  "answer": problem.answer, "metadata": dict(problem.columns)}
        try:
            line = json.dumps(record, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"problem {problem.id!r} (index {index}) cannot be recorded in {self.path}: its columns must be JSON ({err})") from None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return _problem(json.loads(line))


def read_problems(path: Path | str, *, repair: bool = False) -> dict[int, Problem]:
    """The problems recorded in a `problems.jsonl` (`RecordedSource`), by index ({} when there is
    no file). `repair`: cut off a last line left incomplete by a crash (no newline) instead of
    failing on it."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if not repair:
            raise ValueError(f"{path}: the last line is incomplete")
        with path.open("r+b") as f:
            f.truncate(end)
        data = data[:end]
    problems: dict[int, Problem] = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            index, problem = int(record["index"]), _problem(record)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a recorded problem ({type(err).__name__}: {err})") from None
        if index in problems:
            raise ValueError(f"{path}:{number}: problem index {index} is recorded twice")
        problems[index] = problem
    return problems


def _problem(record: Mapping[str, Any]) -> Problem:
    return Problem(str(record["id"]), record["prompt"], record["answer"], record.get("metadata") or {})
