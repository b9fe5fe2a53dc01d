"""The staleness-controlled rollout buffer (DESIGN.md §4; AReaL 2505.24298, ECHO 2508.05387).

One plain class, `RolloutBuffer`, decides three things for every mode (sync = η 0, one-step-off
= η 1, fully async = η ≥ 1):

* **Admission** — may another group start generating now? All counts are in *groups*
  (one GRPO group = one task = G trajectories). With v optimizer steps done (one step per
  batch), B groups per batch and staleness budget η, n more groups may start only while

      occupied + n ≤ (η + v + 1)·B,      occupied = accepted + running

  where `accepted` counts the batch slots already taken by finished groups: groups trained or
  waiting in the buffer, plus the slots of groups rejected by a no-refill filter (see below).
  Slots given back (the group does not count any more):
    - a group rejected by a refill filter (`dynamic_sampling`): it never became accepted, so a
      replacement may start (DAPO dynamic sampling: keep sampling until the batch is full);
    - a group dropped by the hard cutoff: it will never be trained, so a replacement may start
      (otherwise every stale drop would shrink the window for good and the run would stall);
    - a group requeued while running (aborted: worker died, `abort` weight swap).
  Slots kept: a group rejected by a no-refill filter (`zero_variance`) stays in the FIFO as a
  *hole*: it fills its place in its batch, which therefore trains on fewer groups.

* **Batches** — `get_batch(B, v)` takes the oldest B slots in the order groups *finished*
  (FIFO), after dropping every buffered group with a token older than `v − η_hard`
  (`group.min_version < v − η_hard`) as waste. So no trained token is older than η_hard.

* **Filters** — named predicates (`FILTERS`, chosen by config strings) applied when a finished
  group is `put`; the first that rejects it names the count.

What the admission bound guarantees (tested in tests/test_buffer.py). If the caller advances
the version once per batch of B slots (v batches taken ⇔ version v), a group put into the
buffer at version v_put is trained at a version ≤ v_put + η: at most (η+1)·B slots are ever
waiting or running, so at most η batches are taken before it. Hence, with tokens tagged with
the version current when their group was admitted (v_admit), staleness ≤ η + (v_put − v_admit).
When groups finish in the order they were admitted (sync and drain modes), that is ≤ η. When
a slow group finishes after later ones (fully async), it can be older than η: the hard cutoff
is what makes "no trained token older than η_hard" an invariant.

Task ledger: every task id is in exactly one state — running, requeued (pending reissue),
buffered, trained, filtered or stale (dropped by the cutoff) — so
`issued = accepted ⊔ dropped ⊔ running ⊔ requeued` with `accepted = buffered ⊔ trained` and
`dropped = filtered ⊔ stale`; a trained task can never be trained again.

The class is not thread-safe: use it from one thread (one event loop, or none at all). The
sync methods work without an event loop; the async ones wait on changes made by the others.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from policyflow.advantages import has_signal
from policyflow.types import Group

GroupFilter = Callable[[Group], bool]  # True = keep the group


def has_reward_variance(group: Group) -> bool:
    """Keep a group whose rewards are not all equal (the zero-variance rule of `advantages.has_signal`)."""
    return has_signal(group.rewards)


def has_mixed_correctness(group: Group) -> bool:
    """DAPO dynamic sampling (arXiv 2503.14476): keep a group that is neither all right nor all
    wrong, judged on the `correct` reward part (the reward itself when a trajectory has none),
    not on the shaped reward, so the overlong penalty cannot keep an all-wrong group."""
    return has_signal([t.reward_parts.get("correct", t.reward) for t in group.trajectories])


FILTERS: dict[str, GroupFilter] = {
    "zero_variance": has_reward_variance,  # drop; its slot stays in its batch (fewer groups)
    "dynamic_sampling": has_mixed_correctness,  # DAPO: drop and give the slot back for a refill
}
REFILL_FILTERS: frozenset[str] = frozenset({"dynamic_sampling"})


def admission_limit(version: int, eta: int, batch_groups: int) -> int:
    """Most groups that may be accepted or running at version v: (η + v + 1)·B (AReaL §5.1)."""
    return (eta + version + 1) * batch_groups


def may_admit(occupied: int, n: int, version: int, eta: int, batch_groups: int) -> bool:
    """May n more groups start? `occupied + n ≤ (η + v + 1)·B`, everything counted in groups."""
    return occupied + n <= admission_limit(version, eta, batch_groups)


def token_staleness(groups: Iterable[Group], version: int) -> list[int]:
    """`version − token_version` for every generated token of every trajectory in `groups`."""
    return [
        version - tv
        for g in groups
        for t in g.trajectories
        for s in t.segments
        if s.versions
        for tv in s.versions
    ]


def staleness_summary(staleness: Sequence[int]) -> dict[str, float]:
    """Mean, nearest-rank 99th percentile and max of per-token staleness (zeros when empty)."""
    if not staleness:
        return {"async/staleness_mean": 0.0, "async/staleness_p99": 0.0, "async/staleness_max": 0.0}
    ordered = sorted(staleness)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return {
        "async/staleness_mean": sum(ordered) / len(ordered),
        "async/staleness_p99": float(p99),
        "async/staleness_max": float(ordered[-1]),
    }


@dataclass(frozen=True)
class Ledger:
    """Where every issued task id is now; each id is in exactly one of the six sets."""

    running: frozenset[str]
    requeued: frozenset[str]  # released from running, waiting to be reissued
    buffered: frozenset[str]
    trained: frozenset[str]
    filtered: frozenset[str]  # rejected by a filter when put
    stale: frozenset[str]  # accepted, then dropped by the hard cutoff

    @property
    def accepted(self) -> frozenset[str]:
        return self.buffered | self.trained

    @property
    def dropped(self) -> frozenset[str]:
        return self.filtered | self.stale

    @property
    def issued(self) -> frozenset[str]:
        return self.accepted | self.dropped | self.running | self.requeued


_HOLE = None  # the batch slot of a group rejected by a no-refill filter
_STATES = ("running", "requeued", "buffered", "trained", "filtered", "stale")


class RolloutBuffer:
    """Admission control, FIFO batches with a hard staleness cutoff, filters, and a task ledger.

    batch_groups: B, groups per train step. eta: η, the staleness budget of admission.
    eta_hard: drop groups with a token older than v − eta_hard when a batch is formed (None: never).
    filters: names from `registry` (default `FILTERS`), applied in order when a group is put.
    refill_filters: the filter names that give the slot back (the others leave a hole).
    refill_limit: most slots given back by refill filters between two batches (None: no limit);
        past it, a rejected group leaves a hole instead, so a run whose groups all get rejected
        still trains (DAPO's cap on resampling rounds).
    start_version: v when the buffer is created (a resumed run): batches 0..v-1 count as taken.
    """

    def __init__(
        self,
        batch_groups: int,
        eta: int = 0,
        eta_hard: int | None = None,
        filters: Sequence[str] = (),
        registry: Mapping[str, GroupFilter] = FILTERS,
        refill_filters: Collection[str] = REFILL_FILTERS,
        refill_limit: int | None = None,
        start_version: int = 0,
    ) -> None:
        if batch_groups < 1:
            raise ValueError(f"batch_groups must be ≥ 1, got {batch_groups}")
        if eta < 0 or (eta_hard is not None and eta_hard < 0):
            raise ValueError(f"eta and eta_hard must be ≥ 0 (eta_hard may be None), got {eta}, {eta_hard}")
        unknown = [name for name in filters if name not in registry]
        if unknown:
            raise ValueError(f"unknown group filter(s) {unknown}; choose from {sorted(registry)}")
        self.batch_groups = batch_groups
        self.eta = eta
        self.eta_hard = eta_hard
        self.version = start_version
        self.refill_limit = refill_limit
        self._filters = [(name, registry[name]) for name in filters]
        self._refill = frozenset(refill_filters)
        self._queue: deque[Group | None] = deque()  # finished groups (and holes), FIFO
        self._running: dict[str, int] = {}  # task id -> version at admission
        self._requeued: dict[str, Any] = {}  # task id -> payload (e.g. the partial output)
        self._state: dict[str, str] = {}
        self._consumed = start_version * batch_groups  # slots taken by batches: trained groups + holes
        self._refill_debt = 0
        self._refills_given = 0  # slots given back by refill filters since the last batch
        self._counts: dict[str, float] = {
            key: 0.0
            for key in (
                "async/dropped_stale_groups", "async/dropped_stale_trajectories", "async/dropped_stale_tokens",
                "async/filtered_tokens", "async/refills",
                "async/requeues", "async/reissues",
            )
        } | {f"async/filtered/{name}": 0.0 for name in filters}
        self._last_batch = staleness_summary([]) | {"async/batch_groups": 0.0}
        self._event: asyncio.Event | None = None

    # ---- admission -------------------------------------------------------------------------

    @property
    def occupied(self) -> int:
        """accepted + running, in groups: slots taken by batches, waiting in the FIFO, or running."""
        return self._consumed + len(self._queue) + len(self._running)

    @property
    def capacity(self) -> int:
        """How many more groups may start now."""
        return max(0, admission_limit(self.version, self.eta, self.batch_groups) - self.occupied)

    def set_version(self, version: int) -> None:
        """Record that `version` optimizer steps are done (never decreases); wakes waiters."""
        if version < self.version:
            raise ValueError(f"version went backwards: {self.version} -> {version}")
        if version != self.version:
            self.version = version
            self._wake()

    def try_admit(self, task_ids: str | Sequence[str]) -> bool:
        """Start these groups (all or none) if the admission bound allows; False otherwise.

        A task id names one unit of work: it may be admitted once, and again only after
        `requeue`. Reuse raises (give each epoch's copy of a prompt its own id).
        """
        ids = [task_ids] if isinstance(task_ids, str) else list(task_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"admit needs distinct task ids, got {ids}")
        for tid in ids:
            state = self._state.get(tid)
            if state not in (None, "requeued"):
                raise ValueError(f"task {tid!r} was already issued (now {state}); only requeued tasks are reissued")
        if not may_admit(self.occupied, len(ids), self.version, self.eta, self.batch_groups):
            return False
        for tid in ids:
            if self._state.get(tid) == "requeued":
                del self._requeued[tid]
                self._counts["async/reissues"] += 1
            elif self._refill_debt > 0:
                self._refill_debt -= 1
                self._counts["async/refills"] += 1
            self._state[tid] = "running"
            self._running[tid] = self.version
        return True

    @property
    def running(self) -> Mapping[str, int]:
        """Running task ids -> the version at their admission (read-only view)."""
        return MappingProxyType(self._running)

    @property
    def requeued(self) -> Mapping[str, Any]:
        """Tasks waiting to be reissued, oldest first -> the payload given to `requeue`."""
        return MappingProxyType(self._requeued)

    def requeue(self, task_id: str, payload: Any = None) -> None:
        """Release a running task (aborted) so it can be reissued; its slot is given back."""
        self._expect(task_id, "running")
        del self._running[task_id]
        self._state[task_id] = "requeued"
        self._requeued[task_id] = payload
        self._counts["async/requeues"] += 1
        self._wake()

    # ---- finished groups -------------------------------------------------------------------

    def put(self, group: Group) -> bool:
        """Hand over the finished group of a running task; True if kept, False if filtered."""
        tid = group.task_id
        self._expect(tid, "running")
        if not group.trajectories:
            raise ValueError(f"group {group.id!r} of task {tid!r} has no trajectories")
        del self._running[tid]
        for name, keep in self._filters:
            if not keep(group):
                self._state[tid] = "filtered"
                self._counts[f"async/filtered/{name}"] += 1
                self._counts["async/filtered_tokens"] += sum(t.num_gen_tokens for t in group.trajectories)
                if name in self._refill and (self.refill_limit is None or self._refills_given < self.refill_limit):
                    self._refill_debt += 1
                    self._refills_given += 1
                else:
                    self._queue.append(_HOLE)
                self._wake()
                return False
        self._state[tid] = "buffered"
        self._queue.append(group)
        self._wake()
        return True

    def get_batch(self, num_groups: int, version: int) -> list[Group] | None:
        """The oldest `num_groups` slots as a batch for version v, or None if not enough yet.

        Records v as the current version, then drops (as waste) every buffered group with
        `min_version < v − eta_hard` (stale groups never fill a slot). Holes
        left by no-refill filters fill slots, so a batch may hold fewer than `num_groups` groups.
        """
        if num_groups < 1:
            raise ValueError(f"num_groups must be ≥ 1, got {num_groups}")
        self.set_version(version)
        self._drop_stale(version)
        if len(self._queue) < num_groups:
            return None
        slots = [self._queue.popleft() for _ in range(num_groups)]
        self._consumed += num_groups
        self._refills_given = 0
        groups = [g for g in slots if g is not _HOLE]
        for g in groups:
            self._state[g.task_id] = "trained"
        self._last_batch = staleness_summary(token_staleness(groups, version)) | {"async/batch_groups": float(len(groups))}
        self._wake()
        return groups

    async def wait_for_batch(self, num_groups: int, version: int) -> list[Group]:
        """Wait until `get_batch(num_groups, version)` can return a batch, and return it."""
        while (batch := self.get_batch(num_groups, version)) is None:
            await self.changed()
        return batch

    def __len__(self) -> int:
        """Groups waiting in the buffer (holes not counted)."""
        return sum(g is not _HOLE for g in self._queue)

    # ---- accounting ------------------------------------------------------------------------

    def ledger(self) -> Ledger:
        sets: dict[str, set[str]] = {state: set() for state in _STATES}
        for tid, state in self._state.items():
            sets[state].add(tid)
        return Ledger(**{state: frozenset(ids) for state, ids in sets.items()})

    def metrics(self) -> dict[str, float]:
        """Cumulative counts, current gauges and the staleness of the last batch (`async/…`)."""
        ledger = self.ledger()
        return dict(self._counts) | self._last_batch | {
            "async/version": float(self.version),
            "async/buffer_size": float(len(self)),
            "async/buffer_holes": float(len(self._queue) - len(self)),
            "async/running": float(len(self._running)),
            "async/requeued": float(len(self._requeued)),
            "async/capacity": float(self.capacity),
            "async/issued_groups": float(len(ledger.issued)),
            "async/accepted_groups": float(len(ledger.accepted)),
            "async/trained_groups": float(len(ledger.trained)),
        }

    # ---- internals -------------------------------------------------------------------------

    def _drop_stale(self, version: int) -> None:
        if self.eta_hard is None:
            return
        oldest_allowed = version - self.eta_hard
        kept: deque[Group | None] = deque()
        for g in self._queue:
            if g is _HOLE or g.min_version >= oldest_allowed:
                kept.append(g)
                continue
            self._state[g.task_id] = "stale"
            self._counts["async/dropped_stale_groups"] += 1
            self._counts["async/dropped_stale_trajectories"] += len(g.trajectories)
            self._counts["async/dropped_stale_tokens"] += sum(t.num_gen_tokens for t in g.trajectories)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._wake()

    def _expect(self, task_id: str, *states: str) -> None:
        state = self._state.get(task_id)
        if state not in states:
            raise ValueError(f"task {task_id!r} is {state or 'not issued'}, expected {' or '.join(states)}")

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def changed(self) -> None:
        """Wait for the next change of state (a put, a batch, a new version, a requeue, ...)."""
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()
