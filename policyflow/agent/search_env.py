"""The search agent's environment: questions answered by calling a local BM25 search tool.

Each turn the model writes one action (`agent/parse.py`): a search (in the Hermes format, one
or more parallel searches), which the env runs through the shared `ToolPool` and answers with
the passages as the next observation (one per call, in order), or an answer,
which ends the episode with MMSearch-R1's reward (`rewards.search_penalty_reward`): 1 for a
correct answer, β less if the episode searched, plus γ when every turn was well formed. A
malformed turn, or a search that fails, is answered with an error observation and counted;
the episode goes on (until `agent.max_turns`). Nothing the model writes makes `step` raise: the
parser is total (`agent/parse.py`), the tool pool turns every failure into an observation
(`tools/base.py`), and an answer the task's check cannot read (one it raises on) is wrong.

Observations are returned unwrapped: the env takes the task's `observation_wrap`
(`<info>`…`</info>` in the tag format, none in the Hermes format, where chat models get the
template's tool-role markers), and the episode runner adds it around the cut content.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from policyflow.agent.env import Env, EnvGroupBuilder, StepResult
from policyflow.agent.parse import MAX_ECHO_CHARS, FinalAnswer, Malformed, ToolCalls, parse_turn, stop_strings
from policyflow.rewards import search_penalty_reward
from policyflow.tasks.base import Problem
from policyflow.tasks.search_qa import SearchQATask, SearchSettings
from policyflow.tools.base import Tool, ToolPool, tool_stats


class SearchEnv(Env):
    """One search episode for `problem`; `task` provides the prompt and the answer check."""

    def __init__(self, task: SearchQATask, problem: Problem, pool: ToolPool, settings: SearchSettings) -> None:
        self.task, self.problem, self.pool, self.settings = task, problem, pool, settings
        self.searches = 0  # search calls made (each of parallel calls), failed ones included
        self.malformed = 0  # turns that were not one well-formed action
        self.stop = stop_strings(settings.tool_format, list(pool.tools.values()))
        self.tools = pool.schemas() if settings.tool_format == "hermes" else None
        self.observation_wrap = task.observation_wrap

    async def initial_observation(self) -> str:
        return self.task.render_prompt(self.problem)

    async def step(self, action: str) -> StepResult:
        tools: list[Tool] = list(self.pool.tools.values())
        parsed = parse_turn(self.settings.tool_format, action, tools)
        info: dict[str, Any] = {"state": parsed.state} if parsed.state is not None else {}
        turn = parsed.action
        if isinstance(turn, Malformed):
            self.malformed += 1
            info["malformed"] = turn.reason
            return StepResult(observation=f"error: {turn.reason}", tools=tool_stats([], malformed=1), info=info)
        if isinstance(turn, ToolCalls):  # several (Hermes parallel calls) run at once through the pool, answered in order
            self.searches += len(turn.calls)
            results = await asyncio.gather(*(self.pool.call(c.name, c.arguments) for c in turn.calls))
            info["calls"] = [{"tool": c.name, "arguments": c.arguments, "error": r.error} for c, r in zip(turn.calls, results)]
            observations = tuple(r.text for r in results)
            return StepResult(observation=observations[0] if len(observations) == 1 else observations, tools=tool_stats(results), info=info)
        assert isinstance(turn, FinalAnswer)
        correct = self._is_correct(turn.text, info)
        parts = search_penalty_reward(
            torch.tensor(float(correct), dtype=torch.float64), torch.tensor(self.searches), torch.tensor(self.malformed == 0),
            penalty=self.settings.penalty, format_weight=self.settings.format_weight,
        )
        reward_parts = {name: float(value) for name, value in parts.items()}
        return StepResult(done=True, reward=sum(reward_parts.values()), reward_parts=reward_parts, info=info | {"answer": turn.text})

    def _is_correct(self, answer: str, info: dict[str, Any]) -> bool:
        """The task's verdict on `answer`; False, noted in `info["answer_error"]`, when the check
        raises on it (model text the check did not foresee must not end the run)."""
        try:
            return bool(self.task.is_correct(self.problem, answer))
        except Exception as err:  # deliberate containment: the answer is model output
            info["answer_error"] = f"{type(err).__name__}: {err}"[:MAX_ECHO_CHARS]
            return False


class SearchGroupBuilder(EnvGroupBuilder):
    """The G search episodes of one problem, sharing the task's tool pool."""

    def __init__(self, task: SearchQATask, problem: Problem, pool: ToolPool, settings: SearchSettings):
        self.task, self.problem, self.pool, self.settings = task, problem, pool, settings

    async def make_envs(self, n: int) -> list[Env]:
        return [SearchEnv(self.task, self.problem, self.pool, self.settings) for _ in range(n)]
