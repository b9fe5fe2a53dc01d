"""Tasks with verifiable rewards: prompts, reference answers, answer extraction and scoring."""

from __future__ import annotations

import inspect
from typing import Any

from policyflow.tasks.arithmetic import ArithmeticTask
from policyflow.tasks.base import Problem, Score, Task, TaskError
from policyflow.tasks.countdown import CountdownTask
from policyflow.tasks.jsonl import JsonlTask
from policyflow.tasks.search_qa import SearchQATask

TASKS: dict[str, type[Task]] = {"arithmetic": ArithmeticTask, "countdown": CountdownTask, "jsonl": JsonlTask, "search_qa": SearchQATask}


def make_task(name: str, **kwargs: Any) -> Task:
    """Build the task registered as `name` with its constructor arguments."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    cls = TASKS[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        accepted = list(inspect.signature(cls).parameters)
        raise ValueError(f"task {name!r} does not take arguments {sorted(kwargs)} ({err}); it accepts {accepted}") from err
    return cls(**kwargs)


__all__ = ["TASKS", "ArithmeticTask", "CountdownTask", "JsonlTask", "Problem", "Score", "SearchQATask", "Task", "TaskError", "make_task"]
