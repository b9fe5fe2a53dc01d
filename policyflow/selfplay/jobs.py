"""What a policy does with its task (`PolicySpec.job`), as a plain dict: each job wraps the
configured task into the one the policy trains on, for its trainer (warm-start, evaluation) and
its rollout workers alike (`session.build_task`).

    solve      the task itself (every one-policy run; R-Zero's solver; RLT's student)
    challenge  write the task's problems (R-Zero's challenger: `challenger.ChallengerTask`)
    teach      explain the task's solutions, seeing them (RLT's teacher: `teacher.TeacherTask`)
    study      solve it, writing the task's explanation before the answer (RLT's student: `teacher.StudentTask`)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from policyflow.tasks.base import Task

if TYPE_CHECKING:
    from policyflow.policy import PolicySpec


def _teacher(inner: Task, spec: PolicySpec) -> Task:
    from policyflow.selfplay.teacher import TeacherTask  # written beside this job

    return TeacherTask(inner, spec)


def _student(inner: Task, spec: PolicySpec) -> Task:
    from policyflow.selfplay.teacher import StudentTask, reference_explanation

    return StudentTask(inner, explain=lambda problem: reference_explanation(inner, problem))


def _challenger(inner: Task, spec: PolicySpec) -> Task:
    from policyflow.selfplay.challenger import ChallengerTask

    return ChallengerTask(inner, spec)


JOBS: dict[str, Callable[[Task, PolicySpec], Task]] = {
    "solve": lambda task, spec: task,
    "challenge": _challenger,
    "teach": _teacher,
    "study": _student,
}


def job_task(task: Task, spec: PolicySpec) -> Task:
    """`task` as the policy of `spec` uses it (`JOBS[spec.job]`)."""
    if spec.job not in JOBS:
        raise ValueError(f"PolicySpec.job={spec.job!r} is not a job; jobs: {', '.join(JOBS)}")
    return JOBS[spec.job](task, spec)
