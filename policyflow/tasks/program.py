"""`task.name=agent_program`: train an existing agent program that only speaks the OpenAI API.

    policyflow train task.name=agent_program task.path=problems.jsonl \\
        task.options='{command: [python, examples/openai_agent.py], timeout_s: 60}'

The problems are a JSON-lines file read as `task.name=jsonl` reads it (`task.path`,
`task.prompt_column`, `task.answer_column`, `task.eval_path` or `task.eval_fraction`,
`task.on_bad_row`); every episode runs `command` once on one problem, against an OpenAI endpoint
of its own, and takes the reward the program prints (`agent/program_env.py` is the contract:
environment variables, the problem on stdin, the reward line). `task.reward` (exact or numeric)
only judges the answers programs report, for maj@k. The program is the user's own trusted
harness, run with the user's rights; it is not sandboxed (docs/agent_programs.md).

`task.options`: `command` (a list of strings, or one string split like a shell line), and
optionally `timeout_s` (seconds per episode, default 300), `env` (variables added to the
program's environment) and `cwd` (its working folder).
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from policyflow.agent.env import EnvGroupBuilder
from policyflow.agent.program_env import AgentProgram, ProgramGroupBuilder
from policyflow.tasks.base import Problem, TaskError
from policyflow.tasks.jsonl import JsonlTask


def agent_program(command: str | list[str], timeout_s: float, env: Mapping[str, Any] | None, cwd: str | None) -> AgentProgram:
    """The `AgentProgram` of the options; a TaskError naming the option when one is wrong or the
    command's executable cannot be found."""
    parts = shlex.split(command) if isinstance(command, str) else command
    try:
        program = AgentProgram(tuple(parts) if isinstance(parts, (list, tuple)) else (), float(timeout_s), {str(k): str(v) for k, v in dict(env or {}).items()}, cwd)
    except (TypeError, ValueError) as err:
        raise TaskError(f"task.name=agent_program: task.options: {err}") from None
    if cwd is not None and not Path(cwd).is_dir():
        raise TaskError(f"task.name=agent_program: task.options.cwd={cwd!r} is not a folder")
    exe = program.command[0]
    if "/" in exe:  # a path: relative to the program's working folder, where it runs
        found, where = (Path(cwd or ".") / exe).is_file(), f"in {cwd!r}" if cwd else "in the current folder"
    else:
        found, where = shutil.which(exe) is not None, "on PATH"
    if not found:
        raise TaskError(f"task.name=agent_program: the command's program {exe!r} was not found {where}; give its path in task.options.command")
    return program


class AgentProgramTask(JsonlTask):
    """Problems from a JSON-lines file; each episode is a run of the user's agent program."""

    name = "agent_program"

    def __init__(
        self, path: str | Path | None, command: str | list[str] | None = None, *, timeout_s: float = 300.0, env: Mapping[str, Any] | None = None,
        cwd: str | None = None, prompt_column: str = "prompt", answer_column: str = "answer", reward: str = "exact",
        eval_path: str | Path | None = None, eval_fraction: float = 0.1, seed: int = 0, on_bad_row: str = "error", chat_template: bool = False,
    ) -> None:
        if path is None:
            raise TaskError("task.name=agent_program needs task.path: a .jsonl file of problems (a prompt and an answer per line)")
        if command is None:
            raise TaskError("task.name=agent_program needs task.options.command: the program to run per episode, e.g. {command: [python, examples/openai_agent.py]}")
        self.program = agent_program(command, timeout_s, env, cwd)
        if reward not in ("exact", "numeric"):
            raise TaskError(f"task.name=agent_program: task.reward={reward!r}; the program reports the reward, and task.reward (exact or numeric) only judges its answers")
        super().__init__(path, prompt_column=prompt_column, answer_column=answer_column, reward=reward, eval_path=eval_path,
                         eval_fraction=eval_fraction, seed=seed, on_bad_row=on_bad_row, chat_template=chat_template)

    def group_builder(self, problem: Problem) -> EnvGroupBuilder:
        return ProgramGroupBuilder(problem, self.program)
