"""The records tasks and environments share: a `Problem` and the `Score` of completions.

They live below both `tasks/` and `agent/` so the two depend one way: a task builds its envs
(`Task.group_builder`) and imports `agent/`; `agent/` never imports `tasks/` (DESIGN.md §6,
checked by tests/test_layering.py). `tasks.base` re-exports both, so `from policyflow.tasks.base
import Problem` keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
