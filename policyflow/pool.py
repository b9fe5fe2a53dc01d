"""The rollout workers as the coordinator sees them: feed admitted groups, collect finished ones,
replace workers that die, and move their weights forward.

Three kinds of asyncio task share the buffer (one loop, no locks):

* the producer admits groups while the buffer's bound allows (`accepted + running + n ≤
  (η + v + 1)·B`), requeued groups first, and hands each to the least-loaded live worker;
* one collector per worker long-polls it for finished groups and puts them in the buffer;
* when a worker dies (`WorkerDied`: a killed or crashed process), its collector requeues every
  group the worker held, so they are issued again to another worker, and starts a
  replacement. The buffer's ledger guarantees that nothing is lost and nothing is trained
  twice: a requeued task can only be reissued, and a finished task is put only once.

Problems come from a `problems.ProblemSource`, asked for index `next_index`, then the next, each
once (a resume starts from `LoopState.next_problem`): by default the task's `train_problem(i)`;
problems made at run time come through a `problems.RecordedSource`, which replays them on resume.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any, TypeVar

from policyflow.buffer import RolloutBuffer
from policyflow.config import PipelineConfig
from policyflow.policy import PolicySpec
from policyflow.runtime import Handle, Runtime, WorkerDied
from policyflow.session import build_task
from policyflow.problems import IndexedSource, ProblemSource
from policyflow.types import Sample
from policyflow.weights import should_update
from policyflow.workers import GroupSpec, RolloutWorker

log = logging.getLogger("policyflow.pool")
T = TypeVar("T")
_COUNTERS = ("tokens", "busy_s", "alive_s", "swaps", "pause_s", "aborted_sequences", "aborted_tokens", "reward_errors")  # per worker, summed


def task_id(index: int) -> str:
    """The task id of training problem `index` (each index is issued once per run)."""
    return f"train-{index}"


def task_index(task_id: str) -> int:
    """The training problem index of a task id made by `task_id`."""
    return int(task_id.rsplit("-", 1)[1])


@dataclass
class _Slot:
    index: int
    handle: Handle
    version: int
    outstanding: dict[str, GroupSpec] = field(default_factory=dict)  # submitted, not yet back
    stats: dict[str, float] = field(default_factory=dict)


class RolloutPool:
    """The `pipeline.rollout_workers` rollout workers of one policy (`spec`), fed from `buffer`
    and moved forward from `store`."""

    def __init__(
        self, runtime: Runtime, spec: PolicySpec, pipeline: PipelineConfig, store, buffer: RolloutBuffer, *,
        next_index: int, worker_cls: type = RolloutWorker, rng_states: list | None = None, cpus: float = 1,
        source: ProblemSource | None = None, worker_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.runtime, self.spec, self.pipeline, self.store, self.buffer = runtime, spec, pipeline, store, buffer
        self.next_index = next_index  # the first training problem never issued (LoopState.next_problem)
        self.source = source  # the problems, by issue index; None: the task's training set (built on first use)
        self._next_spec: GroupSpec | None = None
        self.worker_cls = worker_cls
        self.worker_kwargs = dict(worker_kwargs or {})  # more constructor arguments of each worker (models=: frozen models)
        self.cpus = cpus
        self.restarts = 0
        self.slots: list[_Slot] = []
        self._rng_states = list(rng_states or [])
        self._lost = dict.fromkeys(_COUNTERS, 0.0)  # counters of replaced workers
        self._replaced = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    async def start(self, before_producing: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Spawn the workers, await `before_producing()` (if given: the engines are idle then), start producing."""
        n = self.pipeline.rollout_workers
        self.slots = list(await asyncio.gather(*(self._spawn(i, generation=0) for i in range(n))))
        if before_producing is not None:
            await before_producing()
        self._tasks = [asyncio.create_task(self._produce(), name="producer")]
        self._tasks += [asyncio.create_task(self._collect(i), name=f"collector-{i}") for i in range(n)]

    async def stop(self) -> None:
        """Stop dispatching and collecting, and stop the engines (the workers stay up for `rng_states`)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await asyncio.gather(*(s.handle.call("close") for s in self.slots if s.handle.alive), return_exceptions=True)

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, but raise at once if the producer or a collector failed."""
        main = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait([main, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        if main in done:
            return main.result()
        main.cancel()
        for task in done:
            task.result()  # raises the failure
        raise RuntimeError("a rollout pool task stopped without an error")  # they loop until cancelled

    async def update_weights(self, version: int) -> None:
        """Move workers lagging more than pipeline.max_lag versions to the latest snapshot."""
        p = self.pipeline
        due = [s for s in self.slots if s.handle.alive and should_update(s.version, version, p.max_lag)]
        results = await asyncio.gather(*(s.handle.call("update_weights", p.swap_mode) for s in due), return_exceptions=True)
        for slot, result in zip(due, results):
            if isinstance(result, WorkerDied):
                continue  # its collector replaces it; the replacement starts on the latest weights
            if isinstance(result, BaseException):
                raise result
            slot.version = result

    async def probes(self, version: int) -> list[Sample]:
        """A greedy probe continuation (`RolloutWorker.probe`) from each live worker whose engine holds `version`."""
        held = [s for s in self.slots if s.handle.alive and s.version == version]
        results = await asyncio.gather(*(s.handle.call("probe") for s in held), return_exceptions=True)
        samples = []
        for result in results:
            if isinstance(result, WorkerDied):
                continue  # its collector replaces it
            if isinstance(result, BaseException):
                raise result
            if set(result.versions) == {version}:
                samples.append(result)
        return samples

    async def rng_states(self) -> list[Any]:
        states = []
        for slot in self.slots:
            try:
                states.append(await slot.handle.call("rng_state"))
            except WorkerDied:
                states.append(None)
        return states

    def metrics(self) -> dict[str, float]:
        total = dict(self._lost)
        for slot in self.slots:
            for key in _COUNTERS:
                total[key] += slot.stats.get(key, 0.0)
        return {
            "async/engine_utilisation": total["busy_s"] / total["alive_s"] if total["alive_s"] else 0.0,
            "async/weight_updates": total["swaps"],
            "async/pause_per_update_s": total["pause_s"] / total["swaps"] if total["swaps"] else 0.0,
            "async/aborted_sequences": total["aborted_sequences"],
            "async/aborted_tokens": total["aborted_tokens"],
            "async/worker_restarts": float(self.restarts),
            "rollout/generated_tokens": total["tokens"],
            "rollout/reward_errors": total["reward_errors"],
            "async/engine_versions_min": float(min(s.version for s in self.slots)),
        }

    # -- tasks -------------------------------------------------------------------------------
    async def _spawn(self, i: int, generation: int) -> _Slot:
        seed = self.spec.seed + 1000 * i + 1_000_003 * generation
        rng = self._rng_states[i] if generation == 0 and i < len(self._rng_states) else None
        handle = await self.runtime.spawn(
            self.worker_cls, self.spec, self.store, seed=seed, engine_slots=self.pipeline.engine_slots, rng=rng,
            name=f"rollout-{i}", cpus=self.cpus, **self.worker_kwargs,
        )
        return _Slot(i, handle, version=await handle.call("held_version"))

    async def _produce(self) -> None:
        while True:
            specs = []
            while True:
                spec = await self._peek()
                if not self.buffer.try_admit(spec.task_id):
                    break
                if spec.index == self.next_index:
                    self.next_index += 1
                specs.append(spec)
            if specs:
                await self._dispatch(specs)
            else:
                await self.buffer.changed()

    async def _peek(self) -> GroupSpec:
        """The next group to admit: the oldest requeued one, else problem `next_index`, asked of
        the source once (it waits here, unadmitted, while the buffer is full)."""
        for payload in self.buffer.requeued.values():  # oldest requeued first
            return payload
        if self._next_spec is None or self._next_spec.index != self.next_index:
            if self.source is None:
                self.source = IndexedSource(build_task(self.spec).train_problem)
            index = self.next_index
            problem = await self.source.problem(index)
            self._next_spec = GroupSpec(task_id(index), index, problem)
        return self._next_spec

    async def _dispatch(self, specs: list[GroupSpec]) -> None:
        while not any(s.handle.alive for s in self.slots):
            self._replaced.clear()
            await self._replaced.wait()
        chosen: dict[int, tuple[_Slot, list[GroupSpec]]] = {}
        for spec in specs:
            slot = min((s for s in self.slots if s.handle.alive), key=lambda s: len(s.outstanding))
            slot.outstanding[spec.task_id] = spec
            chosen.setdefault(slot.index, (slot, []))[1].append(spec)
        for slot, batch in chosen.values():  # the slot objects chosen above: if one is replaced meanwhile, its call fails
            try:
                await slot.handle.call("submit", batch)
            except WorkerDied:
                self._requeue(slot, batch)

    async def _collect(self, i: int) -> None:
        while True:
            slot = self.slots[i]
            try:
                report = await slot.handle.call("poll")
            except WorkerDied as err:
                await self._replace(slot, err)
                continue
            slot.stats = report.stats
            slot.version = max(slot.version, int(report.stats["version"]))  # a drain swap completes between calls
            for group in report.groups:
                del slot.outstanding[group.task_id]
                self.buffer.put(group)

    async def _replace(self, slot: _Slot, err: WorkerDied) -> None:
        self.restarts += 1
        log.warning("%s; reissuing its %d group(s) (restart %d)", err, len(slot.outstanding), self.restarts)
        self._requeue(slot, list(slot.outstanding.values()))
        for key in _COUNTERS:
            self._lost[key] += slot.stats.get(key, 0.0)
        slot.stats = {}
        while True:
            if self.restarts > self.pipeline.max_worker_restarts:
                raise RuntimeError(f"rollout workers died {self.restarts} times (pipeline.max_worker_restarts={self.pipeline.max_worker_restarts}); last: {err}")
            try:
                self.slots[slot.index] = await self._spawn(slot.index, generation=self.restarts)
                break
            except WorkerDied as failed:  # the replacement died while starting: that counts as another restart
                err = failed
                self.restarts += 1
        self._replaced.set()

    def _requeue(self, slot: _Slot, specs: list[GroupSpec]) -> None:
        for spec in specs:
            if slot.outstanding.pop(spec.task_id, None) is not None:
                self.buffer.requeue(spec.task_id, spec)
