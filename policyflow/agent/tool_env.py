"""One generic tool environment: parse → call tools → observe → answer, for any set of tools.

A task hands `ToolEnv` what makes its episodes its own, and nothing else::

    setup = ToolSetup(
        pool=ToolPool([search_tool(index)]),          # any tools: search, code, both, yours
        tool_format="tags",                           # or "hermes" (<tool_call>{json}</tool_call>)
        check=lambda problem, answer: answer == problem.answer,
        rewards=(tool_penalty(0.1), format_bonus(0.1)),
        observation_wrap=("<info>", "</info>"),       # the task's `Task.observation_wrap`
    )
    builder = ToolGroupBuilder(problem, task.render_prompt(problem), setup)

Each turn the model writes one action (`agent/parse.py`): tool calls (in the Hermes format one
or more parallel calls), which the env runs through the pool at once and answers with their
results as the next observation (one per call, in order), or an answer, which ends the episode.
The answer is judged by `check` (the `correct` part, 0/1: the verdict accuracy counts) and the
reward is `correct` plus the task's reward parts, each a function of the episode's `Outcome`
(how many tool calls it made, by tool; how many malformed turns; ...), logged by name
(`reward/<name>`). Search is one configuration (search_qa: MMSearch-R1's `tool_penalty` and
`format_bonus`); code is another; a task with both tools needs no new env class.

A malformed turn, or a tool call that fails, is answered with an error observation and counted
(`agent/tool_errors`; every call counts in `agent/tool_calls_mean`); the episode goes on
(until `agent.max_turns`). Nothing the model writes makes `step` raise: the parser is total
(`agent/parse.py`), the pool turns every failure into an observation (`tools/base.py`), and an
answer the check cannot read (one it raises on) is wrong, noted in the step's info.

Observations are returned unwrapped: the env exposes the task's `observation_wrap` and the
episode runner adds it around the cut content (chat models get the template's tool-role
markers instead). Stop strings (`</tool>`, `</answer>` in the tag format; none in Hermes, whose
turns end at the end-of-turn token) and the chat template's `tools=` come from the pool and the
format (`ToolSetup.stop`, `ToolSetup.prompt_tools`): a task declares the same as its
`Task.stop` and returns `setup.prompt_tools` from `Task.prompt_tools`, so SFT and prompt
fitting render what the runner renders.

Per-episode tools (one stateful interpreter per episode, say) are a per-episode pool: a builder
of your own makes each `ToolEnv` with `dataclasses.replace(setup, pool=its_pool)` and an
`on_close` that releases what the episode holds (the runner calls `Env.close` however the
episode ended).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policyflow.agent.env import Env, EnvGroupBuilder, StepResult
from policyflow.agent.parse import MAX_ECHO_CHARS, TOOL_FORMATS, FinalAnswer, Malformed, ToolCalls, parse_turn, stop_strings
from policyflow.problems import Problem
from policyflow.tools.base import Tool, ToolPool, tool_stats


@dataclass(frozen=True)
class Outcome:
    """What one finished episode did: the input of its reward parts.

    correct: the answer check's verdict (False when it raised; `ToolEnv` notes why in info).
    answer: the final answer's text.
    tool_calls: tool calls made (each of a turn's parallel calls; failed ones included).
    calls_by_tool: the same, per tool name (a call of an unknown tool is a malformed turn).
    tool_errors: calls that failed (bad arguments, raised, timed out, ...).
    malformed: turns that were not one well-formed action.
    turns: model turns, the answering one included.
    """

    correct: bool
    answer: str
    tool_calls: int
    calls_by_tool: Mapping[str, int]
    tool_errors: int
    malformed: int
    turns: int


@dataclass(frozen=True)
class RewardPart:
    """A named part of an episode's reward: `fn(outcome)` is added to `correct` (0/1) and logged
    as `reward/<name>`. `correct` is the env's own part: no other may take that name."""

    name: str
    fn: Callable[[Outcome], float]

    def __post_init__(self) -> None:
        if self.name == "correct":
            raise ValueError("a reward part cannot be named 'correct': that is the answer check's part, which ToolEnv sets itself")


def tool_penalty(penalty: float, *, tools: Sequence[str] | None = None, name: str = "search_penalty") -> RewardPart:
    """MMSearch-R1's search penalty (arXiv 2506.20670 §3; `rewards.search_penalty_reward`):
    −β for a correct answer reached with at least one call of `tools` (None: any tool);
    β = `penalty` in [0, 1]. A correct answer with tool use earns 1 − β, one without 1."""
    if not 0.0 <= penalty <= 1.0:
        raise ValueError(f"search penalty must be in [0, 1], got {penalty}")
    names = None if tools is None else frozenset(tools)

    def part(o: Outcome) -> float:
        used = o.tool_calls if names is None else sum(n for tool, n in o.calls_by_tool.items() if tool in names)
        return -penalty * float(o.correct) * float(used > 0)

    return RewardPart(name, part)


def format_bonus(weight: float, *, name: str = "format") -> RewardPart:
    """γ when every turn of the episode was one well-formed action (MMSearch-R1's format term,
    `rewards.search_penalty_reward`), else 0; γ = `weight` ≥ 0."""
    if weight < 0.0:
        raise ValueError(f"format_weight must be >= 0, got {weight}")
    return RewardPart(name, lambda o: weight * float(o.malformed == 0))


AnswerCheck = Callable[[Problem, str], bool]


@dataclass(frozen=True)
class ToolSetup:
    """What a task's tool episodes share: the tools, how they are called, judged and rewarded.

    pool: the tools, run with a concurrency limit and timeouts (`tools.base.ToolPool`).
    tool_format: 'tags' (`<name>arg</name>`, `<answer>…</answer>`: tiny models; each tool takes
        one required string argument) or 'hermes' (`<tool_call>{json}</tool_call>`: chat models).
    check: `check(problem, answer_text) -> bool`, the task's verdict on a final answer.
    rewards: the reward parts added to `correct`, in order (`tool_penalty`, `format_bonus`, yours).
    observation_wrap: the task's `Task.observation_wrap` (plain models see each observation inside it).
    """

    pool: ToolPool
    tool_format: str
    check: AnswerCheck
    rewards: tuple[RewardPart, ...] = ()
    observation_wrap: tuple[str, str] = ("", "")
    stop: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.tool_format not in TOOL_FORMATS:
            raise ValueError(f"unknown tool format {self.tool_format!r}; choose one of {list(TOOL_FORMATS)}")
        names = [part.name for part in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward part names must be unique, got {names}")
        object.__setattr__(self, "rewards", tuple(self.rewards))
        object.__setattr__(self, "stop", stop_strings(self.tool_format, self.tools))  # also checks tag-format tools

    @property
    def tools(self) -> list[Tool]:
        return list(self.pool.tools.values())

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The schemas a chat template shows (`tools=`): the pool's in the Hermes format, none in
        the tag format (the prompt text describes the tags)."""
        return self.pool.schemas() if self.tool_format == "hermes" else None


class ToolEnv(Env):
    """One episode of `problem` with `prompt` (the task's `render_prompt(problem)`) and `setup`'s tools.

    `on_close` (optional) runs once when the episode ends, however it ended: release what the
    episode alone holds (a per-episode sandbox or interpreter).
    """

    def __init__(self, problem: Problem, prompt: str, setup: ToolSetup, *, on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.problem, self.prompt, self.setup, self._on_close = problem, prompt, setup, on_close
        self.stop, self.tools, self.observation_wrap = setup.stop, setup.prompt_tools, setup.observation_wrap
        self.calls: Counter[str] = Counter()  # tool calls made, per tool (failed ones included)
        self.tool_errors = 0  # calls that failed
        self.malformed = 0  # turns that were not one well-formed action
        self.turns = 0

    @property
    def tool_calls(self) -> int:
        return sum(self.calls.values())

    async def initial_observation(self) -> str:
        return self.prompt

    async def step(self, action: str) -> StepResult:
        self.turns += 1
        parsed = parse_turn(self.setup.tool_format, action, self.setup.tools)
        info: dict[str, Any] = {"state": parsed.state} if parsed.state is not None else {}
        turn = parsed.action
        if isinstance(turn, Malformed):
            self.malformed += 1
            info["malformed"] = turn.reason
            return StepResult(observation=f"error: {turn.reason}", tools=tool_stats([], malformed=1), info=info)
        if isinstance(turn, ToolCalls):  # several (Hermes parallel calls) run at once through the pool, answered in order
            self.calls.update(c.name for c in turn.calls)
            results = await asyncio.gather(*(self.setup.pool.call(c.name, c.arguments) for c in turn.calls))
            self.tool_errors += sum(not r.ok for r in results)
            info["calls"] = [{"tool": c.name, "arguments": c.arguments, "error": r.error} for c, r in zip(turn.calls, results)]
            observations = tuple(r.text for r in results)
            return StepResult(observation=observations[0] if len(observations) == 1 else observations, tools=tool_stats(results), info=info)
        assert isinstance(turn, FinalAnswer)
        outcome = Outcome(
            correct=self._is_correct(turn.text, info), answer=turn.text, tool_calls=self.tool_calls, calls_by_tool=dict(self.calls),
            tool_errors=self.tool_errors, malformed=self.malformed, turns=self.turns,
        )
        parts = {"correct": float(outcome.correct)} | {part.name: float(part.fn(outcome)) for part in self.setup.rewards}
        return StepResult(done=True, reward=sum(parts.values()), reward_parts=parts, info=info | {"answer": turn.text})

    def _is_correct(self, answer: str, info: dict[str, Any]) -> bool:
        """The task's verdict on `answer`; False, noted in `info["answer_error"]`, when the check
        raises on it (model text the check did not foresee must not end the run)."""
        try:
            return bool(self.setup.check(self.problem, answer))
        except Exception as err:  # deliberate containment: the answer is model output
            info["answer_error"] = f"{type(err).__name__}: {err}"[:MAX_ECHO_CHARS]
            return False

    async def close(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            await on_close()


class ToolGroupBuilder(EnvGroupBuilder):
    """The G tool episodes of one problem, sharing `setup` (its pool: one per process)."""

    def __init__(self, problem: Problem, prompt: str, setup: ToolSetup) -> None:
        self.problem, self.prompt, self.setup = problem, prompt, setup

    async def make_envs(self, n: int) -> list[Env]:
        return [ToolEnv(self.problem, self.prompt, self.setup) for _ in range(n)]


class PerEpisodeToolGroupBuilder(EnvGroupBuilder):
    """The G tool episodes of one problem, each with a pool of its own from `make_pool()` (tools
    that hold per-episode state, e.g. a stateful code notebook); otherwise as `setup`."""

    def __init__(self, problem: Problem, prompt: str, setup: ToolSetup, make_pool: Callable[[], ToolPool]) -> None:
        self.problem, self.prompt, self.setup, self.make_pool = problem, prompt, setup, make_pool

    async def make_envs(self, n: int) -> list[Env]:
        return [ToolEnv(self.problem, self.prompt, dataclasses.replace(self.setup, pool=self.make_pool())) for _ in range(n)]
