"""Problems made at run time (DESIGN.md §6): a `ProblemSource` feeds the rollout pool, and a
`RecordedSource` writes each problem down as it is made, so a resumed run trains exactly the
problems of the uninterrupted one. And builders get resources: the rollout worker hands its task
what it holds (`WorkerResources`), so a reward can come from a model."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from policyflow.agent.env import GroupScore, SingleTurnGroupBuilder, WorkerResources
from policyflow.buffer import RolloutBuffer
from policyflow.config import load_config
from policyflow.engine import SamplingParams
from policyflow.policy import PolicySpec
from policyflow.pool import RolloutPool, task_index
from policyflow.problems import PROBLEMS_FILE, IndexedSource, Problem, ProblemSource, RecordedSource, read_problems
from policyflow.runtime.inline import InlineRuntime
from policyflow.session import open_session
from policyflow.tasks.arithmetic import ArithmeticTask
from policyflow.types import Group, Trajectory
from policyflow.weights import SnapshotStore
from policyflow.workers import GroupSpec, RolloutWorker, WorkerReport
from tests.conftest import SMALL

# -- a source whose problems depend on run-time state ---------------------------------------------


class CounterSource:
    """Problems from a seeded generator and a counter of the problems made so far in this process:
    like a challenger model, what it makes depends on what it made before, not on the index asked.
    `replayed` catches it up on the problems a resumed run replays from the record."""

    def __init__(self, seed: int = 0) -> None:
        self.rng, self.made = random.Random(seed), 0

    def _draw(self) -> tuple[int, int]:
        return self.rng.randint(0, 999), self.rng.randint(0, 999)

    async def problem(self, index: int) -> Problem:
        await asyncio.sleep(0)  # made at run time: the pool awaits it
        a, b = self._draw()
        self.made += 1
        return Problem(f"made-{self.made - 1}", f"{a}+{b}=", str(a + b), {"made": self.made - 1, "pair": (a, b)})

    def replayed(self, problems: Sequence[Problem]) -> None:
        for _ in problems:
            self._draw()
            self.made += 1


class EchoWorker:
    """A rollout worker with no engine: each submitted group comes back at once, its prompt and answer the problem's."""

    def __init__(self, spec, store, *, seed: int, engine_slots: int, rng=None) -> None:
        self._done: list[Group] = []
        self._news = asyncio.Event()

    async def submit(self, specs: list[GroupSpec]) -> None:
        for s in specs:
            self._done.append(Group(s.task_id, s.task_id, s.problem.prompt, s.problem.answer, [Trajectory(f"{s.task_id}/0", s.task_id, [], [])]))
        self._news.set()

    async def poll(self) -> WorkerReport:
        while not self._done:
            self._news.clear()
            await self._news.wait()
        done, self._done = self._done, []
        return WorkerReport(done, {"version": 0.0})

    def held_version(self) -> int:
        return 0

    def rng_state(self) -> None:
        return None

    def close(self) -> None:
        pass


B = 2


async def _train(spec: PolicySpec, source: ProblemSource, *, steps: int, next_problem: int = 0, version: int = 0) -> tuple[list[tuple[str, str, str]], int]:
    """`steps` steps of the RL loop's shape (sync: η 0) against a real RolloutPool fed by `source`:
    the (task id, prompt, answer) of every trained group in order, and `next_problem` when it stopped
    (what `coordinator.save_policy_checkpoint` saves as `LoopState.next_problem`)."""
    cfg = load_config(None, [*SMALL, "pipeline.rollout_workers=2"])
    buffer = RolloutBuffer(B, eta=0, start_version=version)
    pool = RolloutPool(InlineRuntime(), spec, cfg.pipeline, store=None, buffer=buffer, next_index=next_problem, worker_cls=EchoWorker, source=source)
    trained = []
    await pool.start()
    try:
        for _ in range(steps):
            groups = await pool.guard(buffer.wait_for_batch(B, version))
            groups.sort(key=lambda g: task_index(g.task_id))
            trained += [(g.task_id, g.prompt, g.answer) for g in groups]
            version += 1
            next_problem = pool.next_index  # checkpointed here, before the admission window moves
            buffer.set_version(version)
            for _ in range(5):  # let the producer run ahead to the full buffer (and peek one more problem)
                await asyncio.sleep(0)
    finally:
        await pool.stop()
    return trained, next_problem


def test_a_resumed_run_trains_exactly_the_recorded_problems(tmp_path: Path) -> None:
    spec = PolicySpec.of(load_config(None, SMALL), run_dir=tmp_path / "run")
    whole, _ = asyncio.run(_train(spec, RecordedSource(CounterSource(), tmp_path / "whole" / PROBLEMS_FILE), steps=6))

    path = tmp_path / "run" / PROBLEMS_FILE
    first, next_problem = asyncio.run(_train(spec, RecordedSource(CounterSource(), path), steps=3))
    assert len(read_problems(path)) > next_problem  # the run made problems it never issued (the producer's look-ahead)
    rest, _ = asyncio.run(_train(spec, RecordedSource(CounterSource(), path), steps=3, next_problem=next_problem, version=3))
    assert first + rest == whole
    assert [t for t, _, _ in whole] == [f"train-{i}" for i in range(6 * B)]

    # the record has teeth: without it (or without the catch-up) the resumed run trains other problems
    fresh, _ = asyncio.run(_train(spec, CounterSource(), steps=3, next_problem=next_problem, version=3))
    assert fresh != rest


def test_the_record_holds_each_problem_as_made(tmp_path: Path) -> None:
    path = tmp_path / PROBLEMS_FILE
    source = RecordedSource(CounterSource(seed=3), path)

    async def make():
        return [await source.problem(i) for i in (0, 1, 2, 1)]  # index 1 again: replayed, not made again

    made = asyncio.run(make())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["task_id"], r["index"], r["id"]) for r in lines] == [("train-0", 0, "made-0"), ("train-1", 1, "made-1"), ("train-2", 2, "made-2")]
    assert lines[0]["prompt"] == made[0].prompt and lines[0]["answer"] == made[0].answer
    assert lines[0]["metadata"] == {"made": 0, "pair": list(made[0].columns["pair"])}
    assert made[1] is made[3]
    assert made[0] == read_problems(path)[0]  # the run trains the problem as read back (a tuple is a list in JSON)


def test_a_line_cut_by_a_crash_is_dropped_and_made_again(tmp_path: Path) -> None:
    path = tmp_path / PROBLEMS_FILE
    asyncio.run(RecordedSource(CounterSource(), path).problem(0))
    with path.open("a") as f:
        f.write('{"task_id": "train-1", "ind')  # the process died mid-write
    source = RecordedSource(CounterSource(), path)
    assert source.recorded == 1 and path.read_text().endswith("}\n")
    again = asyncio.run(source.problem(1))
    assert read_problems(path)[1] == again and again.id == "made-1"  # caught up on the one problem replayed


def test_a_problem_that_cannot_be_recorded_is_refused(tmp_path: Path) -> None:
    class Opaque:
        async def problem(self, index: int) -> Problem:
            return Problem("p", "1+1=", "2", {"blob": object()})

    with pytest.raises(TypeError, match="columns must be JSON"):
        asyncio.run(RecordedSource(Opaque(), tmp_path / PROBLEMS_FILE).problem(0))
    assert not (tmp_path / PROBLEMS_FILE).exists() or (tmp_path / PROBLEMS_FILE).read_text() == ""


def test_the_default_source_is_the_task_training_set() -> None:
    task = ArithmeticTask(seed=0)
    source = IndexedSource(task.train_problem)
    assert isinstance(source, ProblemSource)
    assert [asyncio.run(source.problem(i)) for i in (5, 0)] == [task.train_problem(5), task.train_problem(0)]


# -- builders get resources ---------------------------------------------------------------------------


class ModelReward(SingleTurnGroupBuilder):
    """The task's scores, plus a reward part from the worker's own generator (one greedy token)."""

    async def score_group(self, trajectories) -> GroupScore:
        score = await super().score_group(trajectories)
        resources = self.task.resources
        sample = await resources.generator.generate(resources.tokenizer.encode(self.problem.prompt), SamplingParams(temperature=0.0, max_new_tokens=1))
        self.task.seen.append((resources, resources.generator))
        judged = float(len(sample.token_ids))
        return GroupScore([r + judged for r in score.rewards], [p | {"judge": judged} for p in score.parts], score.errors)


class ModelRewardTask(ArithmeticTask):
    """Arithmetic whose reward calls a model: the worker's generator, reached through `Task.resources`."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.seen: list[tuple[WorkerResources, object]] = []  # (resources, generator) each scoring used

    def group_builder(self, problem: Problem) -> ModelReward:
        return ModelReward(self, problem)


def test_a_reward_calls_the_engine_the_worker_holds() -> None:
    cfg = load_config(None, [*SMALL, "task.name=tests.test_problem_source:ModelRewardTask", "task.options={num_eval: 4, max_digits: 1}",
                             "sampling.max_new_tokens=2", "train.group_size=2"])
    spec = PolicySpec.of(cfg)
    store = SnapshotStore(keep=2)
    store.publish(0, open_session(spec).model.state_dict())

    async def run():
        worker = RolloutWorker(spec, store, seed=0, engine_slots=4)
        await worker.submit([GroupSpec(f"train-{i}", i, worker.task.train_problem(i)) for i in range(2)])
        groups = []
        while len(groups) < 2:
            groups += (await worker.poll()).groups
        worker.close()
        return worker, groups

    worker, groups = asyncio.run(run())
    assert len(worker.task.seen) == 2
    for resources, generator in worker.task.seen:
        assert generator is worker.engine and resources is worker.resources
        assert resources.role == "policy" and resources.generators == {"policy": worker.engine} and resources.tokenizer is worker.tokenizer
    assert all(t.reward_parts["judge"] == 1.0 for g in groups for t in g.trajectories)
    with pytest.raises(TypeError):
        worker.resources.generators["other"] = worker.engine  # read-only: every builder sees the same record
