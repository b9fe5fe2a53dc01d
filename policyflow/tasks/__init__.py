"""Tasks with verifiable rewards: prompts, reference answers, answer extraction and scoring.

The registry (`tasks/registry.py`) names the built-in tasks; `task.name=package.module:Class`
loads a user's own `Task` subclass (`tasks/base.py` documents the interface).
"""

from __future__ import annotations

from policyflow.tasks.arithmetic import ArithmeticTask
from policyflow.tasks.base import Problem, Score, Task, TaskError
from policyflow.tasks.countdown import CountdownTask
from policyflow.tasks.jsonl import JsonlTask
from policyflow.tasks.registry import TASKS, TaskEntry, configured_task, load_task_class, make_task
from policyflow.tasks.search_qa import SearchQATask

__all__ = [
    "TASKS", "ArithmeticTask", "CountdownTask", "JsonlTask", "Problem", "Score", "SearchQATask", "Task", "TaskEntry", "TaskError",
    "configured_task", "load_task_class", "make_task",
]
