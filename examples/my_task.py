"""A user's own multi-turn task, with a tool and a reward of its own, loaded with no fork.

The model multiplies two numbers by calling a calculator tool and copying its result::

    Q: 37*48
    <calc>37*48</calc><result>1776</result><answer>1776</answer>

Train it from the repository root (the `policyflow` command does not add the current folder to
`sys.path`, so put this folder on PYTHONPATH)::

    PYTHONPATH=examples policyflow train task.name=my_task:CalculatorTask \\
        task.options='{max_value: 99}' sampling.max_new_tokens=24 agent.max_turns=3

Everything below is the documented interface (`policyflow/tasks/base.py`): subclass `Task`,
implement `train_problem`, `eval_problems`, `extract_answer` and `score`, and return the envs of
a problem from `group_builder`. The episodes are the library's generic tool env
(`policyflow.agent.tool_env.ToolEnv`) configured with this task's tool, answer check and reward
parts; a task that needs other episodes returns any `EnvGroupBuilder` of its own. `task.options`
are this class's constructor arguments. The class is pickled to rollout worker processes, so it
builds its tool pool lazily, once per process, and leaves it out of its pickled state.
"""

from __future__ import annotations

import ast
import json
import operator
from collections.abc import Sequence

from policyflow.agent.tool_env import RewardPart, ToolGroupBuilder, ToolSetup, format_bonus
from policyflow.tasks import Problem, Score, Task, TaskError
from policyflow.tasks.base import seeded_rng, tagged_answer
from policyflow.tools import Tool, ToolPool

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
CALC_SCHEMA = {
    "type": "object",
    "properties": {"expression": {"type": "string", "maxLength": 64, "description": "Integers joined by +, - and *."}},
    "required": ["expression"],
    "additionalProperties": False,
}


def calculate(expression: str) -> int:
    """The value of integers joined by + - * (and parentheses); ValueError for anything else. Never `eval`."""
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) < 10**9:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("only integers joined by + - * are allowed")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise ValueError(f"cannot read {expression[:32]!r}") from None
    return value(tree.body)


async def calc(expression: str) -> str:
    """The calculator tool: the result as text (an exception becomes the pool's error observation)."""
    return str(calculate(expression))


class CalculatorTask(Task):
    """Products of two numbers in [2, max_value], answered with a calculator tool.

    Reward: `correct` (1 for the right product), plus `extra_calls`: −`extra_call_cost` for each
    calculator call after the first, plus `format` (`format_weight` when every turn was one
    well-formed action).
    """

    name = "calculator"
    observation_wrap = ("<result>", "</result>")  # what a plain model sees around each tool result

    def __init__(self, seed: int = 0, max_value: int = 99, num_eval: int = 50, tool_format: str = "tags",
                 extra_call_cost: float = 0.05, format_weight: float = 0.1) -> None:
        if max_value < 3 or num_eval < 1 or extra_call_cost < 0:
            raise TaskError(f"calculator needs max_value >= 3, num_eval >= 1 and extra_call_cost >= 0; got {max_value}, {num_eval}, {extra_call_cost}")
        self.seed, self.max_value, self.tool_format = seed, max_value, tool_format
        self.extra_call_cost, self.format_weight = extra_call_cost, format_weight
        self.stop = ("</calc>", "</answer>") if tool_format == "tags" else ()  # the same as the env's (ToolSetup.stop)
        self._eval = [self._problem(seeded_rng(seed, "calculator", "eval", i), f"calculator:eval:{i}") for i in range(num_eval)]
        self._held_out = {p.prompt for p in self._eval}
        self._setup: ToolSetup | None = None  # built once per process (tools do not travel between processes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_setup": None}

    def _problem(self, rng, problem_id: str) -> Problem:
        a, b = rng.randint(2, self.max_value), rng.randint(2, self.max_value)
        return Problem(problem_id, f"{a}*{b}", str(a * b))

    def train_problem(self, index: int) -> Problem:
        rng = seeded_rng(self.seed, "calculator", "train", index)
        while True:  # never a held-out question
            problem = self._problem(rng, f"calculator:train:{index}")
            if problem.prompt not in self._held_out:
                return problem

    def eval_problems(self) -> Sequence[Problem]:
        return self._eval

    def render_prompt(self, problem: Problem) -> str:
        return f"Q: {problem.prompt}\n"

    def extract_answer(self, completion: str) -> str | None:
        return tagged_answer(completion)

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        return answer is not None and answer.strip() == problem.answer

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """Single-turn scoring of whole completions (the episodes are scored by their env)."""
        correct = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(ok) for ok in correct], correct=correct)

    # -- the multi-turn part: one tool, an answer check, reward parts ---------------------------

    def tool_setup(self) -> ToolSetup:
        if self._setup is None:
            tool = Tool("calc", "Evaluate integers joined by +, - and *.", CALC_SCHEMA, calc)
            cost = self.extra_call_cost
            extra_calls = RewardPart("extra_calls", lambda o: -cost * max(0, o.calls_by_tool.get("calc", 0) - 1))
            rewards = (extra_calls, format_bonus(self.format_weight))
            self._setup = ToolSetup(ToolPool([tool], max_concurrency=8, timeout_s=5.0), self.tool_format, self.is_correct, rewards, self.observation_wrap)
        return self._setup

    def prompt_tools(self) -> list[dict] | None:
        return self.tool_setup().prompt_tools  # the calculator's schema for chat templates (hermes); None with tags

    def group_builder(self, problem: Problem) -> ToolGroupBuilder:
        return ToolGroupBuilder(problem, self.render_prompt(problem), self.tool_setup())

    def sft_turns(self, problem: Problem) -> list[tuple[str, str]]:
        """A demonstration for the warm-start: call the calculator, copy its result."""
        call = (f"<calc>{problem.prompt}</calc>" if self.tool_format == "tags"
                else f"<tool_call>{json.dumps({'name': 'calc', 'arguments': {'expression': problem.prompt}})}</tool_call>")
        return [("gen", call), ("obs", problem.answer), ("gen", f"<answer>{problem.answer}</answer>")]
