"""Evaluation episodes: per-request seeds, an optional generation budget, and the answer of each episode.

Every sampled request of an evaluation carries its own seed (`SamplingParams.seed`), derived
from (run seed, problem set, problem index, sample index, call index) by `request_seed`. The
engine draws a seeded request's token i from a hash of (seed, i), so an episode's tokens
depend only on the weights, its prompt and its seeds: never on how the problems were batched,
on what else was in flight, or on whether the model runs here or behind an endpoint that
honours OpenAI's `seed` (`policyflow serve` does). A shared `torch.Generator` gave none of that.

`SeededCalls` wraps any `Generator` (the local engine or `engine.remote.RemoteGenerator`) for
one episode: its k-th call gets the episode's k-th seed, and with a `budget` the episode's
calls together generate at most that many tokens (`budget.py` documents the method).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import AsyncIterator, Sequence

from policyflow.agent.env import group_builder
from policyflow.agent.episode import EpisodeRunner
from policyflow.engine import SamplingParams, run_blocking
from policyflow.engine.generator import Chunk
from policyflow.tasks.base import Problem, Task
from policyflow.types import Sample, Trajectory

SEED_BITS = 31  # request seeds fit a signed 32-bit integer, which every OpenAI-compatible server takes


def request_seed(run_seed: int, problem_set: str, problem_index: int, sample_index: int, call_index: int = 0) -> int:
    """The seed of one engine call of an evaluation episode: the first SEED_BITS bits of
    sha256("eval/{run_seed}/{problem_set}/{problem_index}/{sample_index}/{call_index}").

    Stable across processes and machines, and a stream of its own: no rollout worker draws from
    it (workers seed `torch.Generator().manual_seed(seed + 1000·i)`)."""
    text = f"eval/{run_seed}/{problem_set}/{problem_index}/{sample_index}/{call_index}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & ((1 << SEED_BITS) - 1)


class SeededCalls:
    """A `Generator` for one episode: its call k is sent with seed `request_seed(*episode_seed, k)`
    (episode_seed = (run seed, problem set, problem index, sample index); None: unseeded), and
    with `budget` its calls together generate at most `budget` tokens.

    Each call's `max_new_tokens` is cut to the budget left; once it is spent a call returns an
    empty sample (finish reason "length"; a stream: one final chunk with it) without asking the generator, so the episode can no
    longer act and ends at its own limits."""

    def __init__(self, inner, episode_seed: tuple[int, str, int, int] | None, budget: int | None = None) -> None:
        self.inner, self.episode_seed, self.budget = inner, episode_seed, budget
        self.calls, self.generated = 0, 0

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def max_positions(self) -> int | None:
        return self.inner.max_positions

    def _params(self, params: SamplingParams | None) -> SamplingParams | None:
        params = params or SamplingParams()
        seed = None if self.episode_seed is None else request_seed(*self.episode_seed, self.calls)
        self.calls += 1
        room = params.max_new_tokens if self.budget is None else min(params.max_new_tokens, self.budget - self.generated)
        return None if room < 1 else dataclasses.replace(params, seed=seed, max_new_tokens=room)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample:
        seeded = self._params(params)
        if seeded is None:
            return Sample(tuple(prompt_ids), (), (), (), "length", "", ())
        sample = await self.inner.generate(prompt_ids, seeded, request_id=request_id)
        self.generated += len(sample.token_ids)
        return sample

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> AsyncIterator:
        seeded = self._params(params)
        if seeded is None:  # the budget is spent: the one final chunk of an empty completion
            yield Chunk((), (), "", Sample(tuple(prompt_ids), (), (), (), "length", "", ()))
            return
        async for chunk in self.inner.stream(prompt_ids, seeded, request_id=request_id):
            self.generated += len(chunk.token_ids)
            yield chunk

    def cancel(self, request_id: str) -> bool:
        return self.inner.cancel(request_id)


def episode_runner_on(runner: EpisodeRunner, generator) -> EpisodeRunner:
    """`runner` (its tokenizer, sampling, limits, context policy) over another generator."""
    return EpisodeRunner(generator, runner.tokenizer, runner.params, runner.agent, chat_template=runner.chat_template, context=runner.context)


async def run_problem(runner: EpisodeRunner, task: Task, problem: Problem, n: int, *, seeds: Sequence[tuple[int, str, int, int] | None], budget: int | None, task_id: str) -> list[Trajectory]:
    """`n` episodes of `problem` as `EpisodeRunner.run_group` runs a group, episode j on its own
    `SeededCalls(seeds[j], budget)`."""
    runners = [episode_runner_on(runner, SeededCalls(runner.generator, seed, budget)) for seed in seeds]
    group, _ = await runner.run_group(group_builder(task, problem), n, task_id=task_id, runners=runners)
    return group.trajectories


async def run_set(
    runner: EpisodeRunner, task: Task, problems: Sequence[Problem], n: int, *,
    run_seed: int | None, problem_set: str = "heldout", budget: int | None = None,
) -> list[list[Trajectory]]:
    """`n` episodes of every problem, all in flight at once; episode j of problem i is seeded by
    (run_seed, problem_set, i, j) (`request_seed`; run_seed None: unseeded, for greedy runs), so
    its tokens depend neither on the other problems nor on what else runs meanwhile."""

    def seeds(i: int) -> list[tuple[int, str, int, int] | None]:
        return [None if run_seed is None else (run_seed, problem_set, i, j) for j in range(n)]

    return list(await asyncio.gather(*(
        run_problem(runner, task, p, n, seeds=seeds(i), budget=budget, task_id=f"{problem_set}-{i}") for i, p in enumerate(problems)
    )))


def run_problems(
    runner: EpisodeRunner, task: Task, problems: Sequence[Problem], n: int, *,
    run_seed: int | None, problem_set: str = "heldout", budget: int | None = None,
) -> list[list[Trajectory]]:
    """`run_set` from synchronous code."""
    return run_blocking(run_set(runner, task, problems, n, run_seed=run_seed, problem_set=problem_set, budget=budget))


def run_sets(*sets) -> list[list[list[Trajectory]]]:
    """Several `run_set(*args, **kwargs)` given as (args, kwargs), all in flight together (one batch
    on the engine), from synchronous code; their results in order."""

    async def run_all() -> list[list[list[Trajectory]]]:
        return list(await asyncio.gather(*(run_set(*args, **kwargs) for args, kwargs in sets)))

    return run_blocking(run_all())


def is_correct(t: Trajectory) -> bool:
    """An episode is correct when its `correct` reward part is 1 (the env's verdict)."""
    return t.reward_parts.get("correct", 0.0) >= 1.0


def episode_answer(task: Task, t: Trajectory) -> str | None:
    """The episode's final answer as the task reads it: the tool env's answer text (its last
    step's `info["answer"]`), else `task.extract_answer` of the completion; None: no answer."""
    if t.step_info and isinstance(t.step_info[-1].get("answer"), str):
        return t.step_info[-1]["answer"]
    try:
        return task.extract_answer(t.completion_text)
    except Exception:  # deliberate containment: the completion is model output
        return None
