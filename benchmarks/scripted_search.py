"""A scripted search policy on the real engine, env and tool (benchmarks of agent episodes).

The engine has no forced decoding, so the script sits between the model and the env: the model
samples its turn as usual (the tokens, log-probs and timing are real, and so is what the context
policy keeps of them), and `ScriptedSearchEnv` hands the real `ToolEnv` a scripted action in
place of the model's text: `<state>k</state><search>NAME_k</search>` at turn k (place k of the
corpus), then, after `searches` searches, `<answer>…</answer>` (correct when it searched at all).
With `searches=None` it never answers. The BM25 tool, its pool, its latency, the observation
wrapping and the reward are the library's.

`ScriptedSearchWorker` is the rollout worker with that policy (for `coordinator.run_rl(...,
worker_cls=...)`): every episode of a group draws its number of searches uniformly from
0..agent.max_turns − 1 (so its turns from 1..max_turns, as `async_sim.Workload` draws them), and
every turn is exactly sampling.max_new_tokens tokens (no EOS, no stop strings). Its last turn is
therefore cut at max_new_tokens; the env still judges it (the per-turn limit only cuts an
action), so an answered episode ends `complete` and one stopped by agent.max_turns `truncated`.
"""

from __future__ import annotations

import random

from policyflow.agent.env import Env, EnvGroupBuilder, StepResult
from policyflow.tasks.base import Problem
from policyflow.tasks.search_qa import SearchQATask
from policyflow.workers import RolloutWorker


class ScriptedSearchEnv(Env):
    """`inner` (search_qa's `ToolEnv`) driven by the script above, whatever the model wrote."""

    stop = ()  # the model writes its full max_new_tokens every turn

    def __init__(self, task: SearchQATask, inner: Env, searches: int | None = None) -> None:
        self.task, self.inner, self.searches, self.turn = task, inner, searches, 0
        self.observation_wrap = inner.observation_wrap  # the runner wraps the inner env's observations as it would

    async def initial_observation(self) -> str:
        return await self.inner.initial_observation()

    async def step(self, action: str) -> StepResult:
        if self.searches is not None and self.turn >= self.searches:
            answer = self.inner.problem.answer if self.searches else "?"
            return await self.inner.step(f"<answer>{answer}</answer>")
        place = self.task.entities[self.turn % len(self.task.entities)]
        self.turn += 1
        result = await self.inner.step(f"<state>{self.turn}</state><search>{place.name}</search>")
        if result.tools.calls != 1 or result.tools.errors:
            raise RuntimeError(f"the scripted search failed at turn {self.turn}: {result.info}")
        return result


class ScriptedGroupBuilder(EnvGroupBuilder):
    """The task's own search envs, each scripted with 0..max_searches searches (seeded by the problem)."""

    def __init__(self, task: SearchQATask, problem: Problem, max_searches: int) -> None:
        self.task, self.problem, self.max_searches = task, problem, max_searches

    async def make_envs(self, n: int) -> list[Env]:
        envs = await self.task.group_builder(self.problem).make_envs(n)
        rng = random.Random(self.problem.id)
        return [ScriptedSearchEnv(self.task, env, rng.randint(0, self.max_searches)) for env in envs]


class ScriptedSearchTask:
    """`task` with scripted episodes (`group_builder`); everything else is the task's."""

    def __init__(self, task: SearchQATask, max_searches: int) -> None:
        self.task, self.max_searches = task, max_searches

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def group_builder(self, problem: Problem) -> EnvGroupBuilder:
        return ScriptedGroupBuilder(self.task, problem, self.max_searches)


class ScriptedSearchWorker(RolloutWorker):
    """A rollout worker whose episodes follow the script (needs task.name=search_qa)."""

    def __init__(self, spec, store, *, seed: int, engine_slots: int, rng=None) -> None:
        super().__init__(spec, store, seed=seed, engine_slots=engine_slots, rng=rng)
        if not isinstance(self.task, SearchQATask):
            raise ValueError(f"ScriptedSearchWorker needs task.name=search_qa, got {spec.task.name!r}")
        self.task = ScriptedSearchTask(self.task, spec.agent.max_turns - 1)
        self.runner = self.runner.with_params(ignore_eos=True, stop=())
