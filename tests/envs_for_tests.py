"""Scripted environments for episode tests: fixed observations and a controllable "tool"."""

from __future__ import annotations

import asyncio
from policyflow.agent.env import Env, EnvGroupBuilder, StepResult
from policyflow.tasks.base import Problem
from policyflow.types import ToolStats


class ScriptedEnv(Env):
    """`turns` model turns: after each of the first turns-1 an observation "[obs k]", then done with reward = its index.

    With `gate`, every step first waits for the event (a slow tool the test releases);
    `waiting` counts the episodes currently inside such a step.
    """

    def __init__(self, prompt: str, turns: int, reward: float = 0.0, gate: asyncio.Event | None = None, waiting: list[int] | None = None, obs: str = "[obs {k}]") -> None:
        self.prompt, self.turns, self.reward, self.gate, self.waiting, self.obs = prompt, turns, reward, gate, waiting, obs
        self.actions: list[str] = []
        self.closed = False

    async def initial_observation(self) -> str:
        return self.prompt

    async def step(self, action: str) -> StepResult:
        self.actions.append(action)
        if self.gate is not None:
            self.waiting[0] += 1
            await self.gate.wait()
            self.waiting[0] -= 1
        k = len(self.actions)
        if k >= self.turns:
            return StepResult(done=True, reward=self.reward, reward_parts={"correct": float(self.reward > 0)})
        return StepResult(observation=self.obs.format(k=k), tools=ToolStats(calls=1, errors=int(k == 2), timeouts=int(k == 2), seconds=0.25))

    async def close(self) -> None:
        self.closed = True


class ScriptedBuilder(EnvGroupBuilder):
    """G scripted envs; member j earns reward j (so groups have reward variance)."""

    def __init__(self, problem: Problem, turns: int, **env_kw) -> None:
        self.problem, self.turns, self.env_kw = problem, turns, env_kw
        self.envs: list[ScriptedEnv] = []

    async def make_envs(self, n: int) -> list[Env]:
        self.envs = [ScriptedEnv(self.problem.prompt, self.turns, reward=float(j), **self.env_kw) for j in range(n)]
        return list(self.envs)
