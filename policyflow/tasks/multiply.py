"""Multiplying 3–4 digit numbers with the code tool (the CPU code-agent demo, `configs/code.yaml`).

A tiny model cannot multiply 1234*567 in its head, but it can copy the operands into code, run
it, and copy the printed product into its answer::

    Q: 1234*567
    <code>print(1234*567)</code><out>699678</out><answer>699678</answer>

The code runs in the sandbox (`tools/python_tool.py`, `tools/code.py`), never in this process.
Held-out questions are operand pairs never trained on (in either order). Episodes are the
generic tool env (`agent/tool_env.py`) with the code tool, an exact integer check, and
MMSearch-R1's reward parts (`tool_penalty` as `code_penalty`, default 0, and `format_bonus`).
Warm-start demonstrations (`sft_turns`) run code, or, for a share 1 − `demo_code_fraction` of
them, answer at once (a guess, wrong for the model): the warm-start then runs code in only some
sampled episodes, and RL learns that running code pays.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from policyflow.agent.parse import TOOL_FORMATS
from policyflow.agent.tool_env import PerEpisodeToolGroupBuilder, RewardPart, ToolGroupBuilder, ToolSetup, format_bonus, tool_penalty
from policyflow.tasks.base import Problem, Score, Task, TaskError, check_batch, same_integer, seeded_rng, tagged_answer
from policyflow.tools.base import ToolPool
from policyflow.tools.code import SandboxUnavailable
from policyflow.tools.python_tool import CODE_TOOL_NAMES, CodeSettings, Notebook, check_sandbox, code_tool


# The trivial set (`Task.trivial_problems`): products a model should answer at once.
TRIVIAL_PRODUCTS = ((1, 1), (2, 3), (2, 2), (1, 5), (3, 3), (4, 2), (1, 9), (2, 4))


class MultiplyTask(Task):
    """a*b for a, b of `min_digits`–`max_digits` digits, answered with the code tool."""

    name = "multiply"

    def __init__(
        self,
        seed: int = 0,
        min_digits: int = 3,
        max_digits: int = 4,
        num_eval: int = 200,
        tool_format: str = "tags",
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        packages: Sequence[str] = (),
        isolation: str = "namespaces",
        stateful: bool = False,
        concurrency: int = 16,
        demo_code_fraction: float = 1.0,
        code_penalty: float = 0.0,
        format_weight: float = 0.1,
    ) -> None:
        if not 1 <= min_digits <= max_digits <= 9:
            raise TaskError(f"multiply needs 1 <= min_digits <= max_digits <= 9, got {min_digits} and {max_digits}")
        if tool_format not in TOOL_FORMATS:
            raise TaskError(f"multiply: unknown tool_format {tool_format!r}; choose one of {list(TOOL_FORMATS)}")
        if not 0.0 <= demo_code_fraction <= 1.0:
            raise TaskError(f"multiply needs 0 <= demo_code_fraction <= 1, got {demo_code_fraction}")
        pairs = sum(9 * 10 ** (d - 1) for d in range(min_digits, max_digits + 1)) ** 2
        if num_eval > pairs // 4:
            raise TaskError(f"task.num_eval={num_eval} is too many held-out pairs for {min_digits}-{max_digits} digit operands; lower it")
        self.seed, self.min_digits, self.max_digits = seed, min_digits, max_digits
        self.tool_format, self.stateful, self.concurrency = tool_format, stateful, concurrency
        self.demo_code_fraction, self.code_penalty, self.format_weight = demo_code_fraction, code_penalty, format_weight
        self.settings = CodeSettings(timeout_s=timeout_s, memory_mb=memory_mb, packages=tuple(packages), isolation=isolation)  # type: ignore[arg-type]
        self.tool_name = CODE_TOOL_NAMES[tool_format]
        self.stop = (f"</{self.tool_name}>", "</answer>") if tool_format == "tags" else ()  # hermes: a turn ends at EOS
        self.observation_wrap = ("<out>", "</out>") if tool_format == "tags" else ("", "")  # hermes: the chat template's markers
        try:
            self.reward_parts()
        except ValueError as err:
            raise TaskError(f"multiply: {err}") from None
        rng = seeded_rng(seed, "multiply", "eval")
        seen: set[tuple[int, int]] = set()
        self._eval: list[Problem] = []
        while len(self._eval) < num_eval:
            a, b = self._operands(rng)
            if (a, b) not in seen:
                seen.update({(a, b), (b, a)})
                self._eval.append(self._problem(a, b, f"multiply:eval:{len(self._eval)}"))
        self._held_out = frozenset(seen)
        self._setup: ToolSetup | None = None  # built on first use, in the process that runs episodes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_setup": None}  # a tool pool belongs to one process

    def _operands(self, rng: random.Random) -> tuple[int, int]:
        def number() -> int:
            digits = rng.randint(self.min_digits, self.max_digits)
            return rng.randint(10 ** (digits - 1), 10**digits - 1)

        return number(), number()

    @staticmethod
    def _problem(a: int, b: int, problem_id: str) -> Problem:
        return Problem(problem_id, f"{a}*{b}", str(a * b), {"a": a, "b": b})

    def train_problem(self, index: int) -> Problem:
        """Deterministic in (seed, index); never a held-out pair (in either order)."""
        if index < 0:
            raise IndexError(f"train_problem index must be >= 0, got {index}")
        rng = seeded_rng(self.seed, "multiply", "train", index)
        while True:
            a, b = self._operands(rng)
            if (a, b) not in self._held_out:
                return self._problem(a, b, f"multiply:train:{index}")

    def eval_problems(self) -> Sequence[Problem]:
        return self._eval

    def render_prompt(self, problem: Problem) -> str:
        return f"Q: {problem.prompt}\n"

    def extract_answer(self, completion: str) -> str | None:
        return tagged_answer(completion)

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        """The answer as ASCII digits equal to the product (compared as text: no length limit)."""
        return answer is not None and same_integer(answer, problem.answer)

    def trivial_problems(self) -> Sequence[Problem]:
        """One-digit products (`2*3`): answerable without the code tool."""
        return tuple(self._problem(a, b, f"multiply:trivial:{j}") for j, (a, b) in enumerate(TRIVIAL_PRODUCTS))

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """1.0 for a correct `<answer>` in the completion (episodes are scored by their env)."""
        check_batch(problems, completions)
        correct = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(ok) for ok in correct], correct=correct)

    # -- episodes: the code tool, an answer check, reward parts ---------------------------------

    def reward_parts(self) -> tuple[RewardPart, ...]:
        return (tool_penalty(self.code_penalty, name="code_penalty"), format_bonus(self.format_weight))

    def _pool(self, notebook: Notebook | None = None) -> ToolPool:
        tool = code_tool(self.settings, name=self.tool_name, notebook=notebook)
        return ToolPool([tool], max_concurrency=self.concurrency, timeout_s=self.settings.timeout_s + 10.0)  # the sandbox enforces timeout_s itself

    def tool_setup(self) -> ToolSetup:
        """The process's code tool (the sandbox probed once: a machine that cannot build it stops here, in one line)."""
        if self._setup is None:
            try:
                check_sandbox(self.settings)
            except SandboxUnavailable as err:
                raise TaskError(f"multiply: {str(err).splitlines()[0]}") from None
            self._setup = ToolSetup(self._pool(), self.tool_format, self.is_correct, self.reward_parts(), self.observation_wrap)
        return self._setup

    def prompt_tools(self) -> list[dict] | None:
        return self.tool_setup().prompt_tools if self.tool_format == "hermes" else None

    def group_builder(self, problem: Problem) -> ToolGroupBuilder | PerEpisodeToolGroupBuilder:
        """Code episodes of `problem`; with `stateful`, each episode has its own notebook (and pool)."""
        setup = self.tool_setup()
        if self.stateful:
            return PerEpisodeToolGroupBuilder(problem, self.render_prompt(problem), setup, lambda: self._pool(Notebook()))
        return ToolGroupBuilder(problem, self.render_prompt(problem), setup)

    def sft_turns(self, problem: Problem) -> list[tuple[str, str]]:
        """Run `print(a*b)`, copy the printed product; or (a share 1 − `demo_code_fraction`,
        drawn from the problem's id) answer at once."""
        if seeded_rng(self.seed, "multiply", "demo", problem.id).random() >= self.demo_code_fraction:
            return [("gen", f"<answer>{problem.answer}</answer>")]
        code = f"print({problem.prompt})"
        call = (f"<{self.tool_name}>{code}</{self.tool_name}>" if self.tool_format == "tags"
                else f"<tool_call>{json.dumps({'name': self.tool_name, 'arguments': {'code': code}})}</tool_call>")
        return [("gen", call), ("obs", problem.answer), ("gen", f"<answer>{problem.answer}</answer>")]

