"""RolloutBuffer: admission bound, FIFO batches, hard cutoff, filters, ledger, asyncio waits."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyflow.buffer import (
    FILTERS,
    RolloutBuffer,
    admission_limit,
    has_reward_variance,
    may_admit,
    staleness_summary,
    token_staleness,
)
from policyflow.types import Call, Group, Segment, Trajectory

# ---- helpers ---------------------------------------------------------------------------------


def make_traj(task_id: str, *gen_versions: tuple[int, ...], reward: float = 0.0, idx: int = 0) -> Trajectory:
    """prompt, then one gen segment per tuple of token versions, with an obs segment between turns."""
    segments = [Segment("prompt", (1, 2))]
    calls = []
    for turn, versions in enumerate(gen_versions):
        if turn:
            segments.append(Segment("obs", (3,), turn=turn))
        calls.append(Call(context=tuple(range(len(segments))), produced=len(segments)))
        n = len(versions)
        segments.append(Segment("gen", tuple(range(10, 10 + n)), (-0.5,) * n, tuple(versions), turn=turn))
    all_v = [v for vs in gen_versions for v in vs] or [0]
    return Trajectory(
        id=f"{task_id}/{idx}", task_id=task_id, segments=segments, calls=calls,
        reward=reward, start_version=min(all_v),
    )


def make_group(task_id: str, versions: tuple[int, ...] = (0,), rewards: tuple[float, ...] = (0.0, 1.0)) -> Group:
    """One trajectory per reward, each with a single gen segment whose tokens carry `versions`."""
    trajs = [make_traj(task_id, versions, reward=r, idx=i) for i, r in enumerate(rewards)]
    return Group(id=task_id, task_id=task_id, prompt="p", answer="a", trajectories=trajs)


def ids(groups: list[Group] | None) -> list[str]:
    assert groups is not None
    return [g.task_id for g in groups]


def assert_conserved(buf: RolloutBuffer) -> None:
    led = buf.ledger()
    parts = [led.accepted, led.dropped, led.running, led.requeued]
    assert sum(len(p) for p in parts) == len(led.issued)  # disjoint, and they cover every issued id
    assert led.trained <= led.accepted
    assert set(buf.running) == led.running and set(buf.requeued) == led.requeued
    assert len(buf) == len(led.buffered)


# ---- admission -------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0, 1, 2])
@pytest.mark.parametrize("B", [1, 3])
def test_admission_bound_at_the_boundary_across_versions(eta, B):
    buf = RolloutBuffer(batch_groups=B, eta=eta)
    n = 0
    for v in range(4):
        buf.set_version(v)
        while buf.try_admit(f"t{n}"):
            n += 1
        assert n == (eta + v + 1) * B == admission_limit(v, eta, B)  # exactly the bound, not one more
        assert buf.capacity == 0 and not buf.try_admit("extra")


def test_admitting_several_groups_is_all_or_nothing():
    buf = RolloutBuffer(batch_groups=2, eta=1)  # limit (1 + 0 + 1)·2 = 4
    assert buf.try_admit(["a", "b", "c"])
    assert not buf.try_admit(["d", "e"])  # 3 + 2 > 4: neither starts
    assert set(buf.running) == {"a", "b", "c"}
    assert buf.try_admit(["d"])
    assert may_admit(occupied=3, n=1, version=0, eta=1, batch_groups=2)
    assert not may_admit(occupied=3, n=2, version=0, eta=1, batch_groups=2)


def test_finishing_and_training_keep_slots_until_the_version_moves():
    buf = RolloutBuffer(batch_groups=2, eta=0)
    assert buf.try_admit(["a", "b"]) and buf.capacity == 0
    buf.put(make_group("a"))
    assert buf.capacity == 0  # accepted still counts
    buf.put(make_group("b"))
    assert ids(buf.get_batch(2, 0)) == ["a", "b"]
    assert buf.capacity == 0  # trained slots count until the step is done
    buf.set_version(1)
    assert buf.capacity == 2


def test_dropped_groups_give_their_slot_back_and_holes_keep_it():
    buf = RolloutBuffer(batch_groups=2, eta=0, eta_hard=0, filters=["dynamic_sampling"])
    assert buf.try_admit(["a", "b"])
    assert not buf.put(make_group("a", rewards=(1.0, 1.0)))  # filtered for refill
    assert buf.capacity == 1 and buf.try_admit("c")
    assert buf.metrics()["async/refills"] == 1
    buf.requeue("b")  # aborted: slot back
    assert buf.capacity == 1 and buf.try_admit("b")
    assert buf.metrics()["async/reissues"] == 1 and buf.metrics()["async/refills"] == 1

    holes = RolloutBuffer(batch_groups=2, eta=0, filters=["zero_variance"])
    assert holes.try_admit(["a", "b"])
    assert not holes.put(make_group("a", rewards=(0.0, 0.0)))
    assert holes.capacity == 0  # the hole keeps its place in the batch
    holes.put(make_group("b"))
    assert ids(holes.get_batch(2, 0)) == ["b"]  # the step trains on fewer groups
    assert holes.metrics()["async/batch_groups"] == 1


def test_stale_drop_gives_the_slot_back():
    buf = RolloutBuffer(batch_groups=1, eta=1, eta_hard=0)
    buf.try_admit(["a", "b"])
    buf.put(make_group("a", versions=(0,)))
    buf.put(make_group("b", versions=(0,)))
    assert ids(buf.get_batch(1, 0)) == ["a"]
    assert buf.get_batch(1, 1) is None  # b is older than 1 - 0: dropped, nothing left
    assert buf.ledger().stale == {"b"}
    assert buf.capacity == 3 - 1  # limit (1+1+1)·1, one slot consumed by the trained batch


# ---- FIFO and the hard cutoff ----------------------------------------------------------------


def test_batches_are_fifo_in_finish_order():
    buf = RolloutBuffer(batch_groups=2, eta=1)
    buf.try_admit(["a", "b", "c", "d"])
    assert buf.get_batch(2, 0) is None
    for t in ["c", "a", "d", "b"]:
        buf.put(make_group(t))
    assert ids(buf.get_batch(2, 0)) == ["c", "a"]
    buf.set_version(1)
    assert ids(buf.get_batch(2, 1)) == ["d", "b"]
    assert buf.get_batch(1, 1) is None


def test_hard_cutoff_drops_exactly_the_stale_groups_and_counts_waste():
    buf = RolloutBuffer(batch_groups=2, eta=3, eta_hard=1)
    buf.try_admit(["v0", "v1", "v2", "v3", "mixed"])
    buf.put(make_group("v0", versions=(0, 0, 0)))  # 2 trajs × 3 tokens
    buf.put(make_group("v1", versions=(1, 1)))  # 2 × 2
    buf.put(make_group("v2", versions=(2, 3)))
    buf.put(make_group("v3", versions=(3,)))
    mixed = Group("mixed", "mixed", "p", "a", [make_traj("mixed", (3, 3), (1,), reward=1.0), make_traj("mixed", (3,), idx=1)])
    buf.put(mixed)  # one token of version 1 in its second turn
    batch = buf.get_batch(2, 3)  # oldest allowed token: 3 - 1 = 2
    assert ids(batch) == ["v2", "v3"]
    assert buf.ledger().stale == {"v0", "v1", "mixed"}
    m = buf.metrics()
    assert m["async/dropped_stale_groups"] == 3
    assert m["async/dropped_stale_trajectories"] == 2 + 2 + 2
    assert m["async/dropped_stale_tokens"] == 6 + 4 + (3 + 1)
    assert min(g.min_version for g in batch) >= 3 - 1
    # staleness of the trained tokens: v2 -> [1, 0] twice, v3 -> [0] twice
    assert m["async/staleness_mean"] == pytest.approx(2 / 6)
    assert m["async/staleness_max"] == 1 and m["async/staleness_p99"] == 1
    assert m["async/buffer_size"] == 0


def test_no_cutoff_when_eta_hard_is_none():
    buf = RolloutBuffer(batch_groups=1, eta=5)
    buf.try_admit("a")
    buf.put(make_group("a", versions=(0,)))
    assert ids(buf.get_batch(1, 5)) == ["a"]
    assert buf.metrics()["async/staleness_max"] == 5


def test_staleness_helpers():
    g = Group("g", "g", "p", "a", [make_traj("g", (4, 5), (6,)), make_traj("g", (6,) * 97, idx=1)])
    s = token_staleness([g], 6)
    assert sorted(s) == [0] * 98 + [1, 2]
    assert staleness_summary(s) == {"async/staleness_mean": 0.03, "async/staleness_p99": 1.0, "async/staleness_max": 2.0}
    assert staleness_summary([])["async/staleness_max"] == 0.0


def test_version_never_goes_back():
    buf = RolloutBuffer(batch_groups=1)
    buf.set_version(2)
    with pytest.raises(ValueError, match="backwards"):
        buf.get_batch(1, 1)


# ---- filters -----------------------------------------------------------------------------------


def test_filter_counts_per_name():
    buf = RolloutBuffer(batch_groups=4, eta=2, filters=["zero_variance", "dynamic_sampling"])
    buf.try_admit([f"t{i}" for i in range(6)])
    assert buf.put(make_group("t0", rewards=(0.0, 1.0)))
    assert not buf.put(make_group("t1", versions=(0, 0), rewards=(1.0, 1.0)))
    assert not buf.put(make_group("t2", rewards=(0.0, 0.0, 0.0)))
    assert buf.put(make_group("t3", rewards=(0.5, 0.0)))
    m = buf.metrics()
    assert m["async/filtered/zero_variance"] == 2  # the first filter that rejects names the count
    assert m["async/filtered/dynamic_sampling"] == 0
    assert m["async/filtered_tokens"] == 2 * 2 + 3 * 1
    assert m["async/buffer_size"] == 2 and m["async/buffer_holes"] == 2
    assert buf.ledger().filtered == {"t1", "t2"}


def test_dynamic_sampling_counts_refills():
    buf = RolloutBuffer(batch_groups=2, eta=0, filters=["dynamic_sampling"])
    buf.try_admit(["a", "b"])
    buf.put(make_group("a", rewards=(1.0, 1.0)))
    buf.put(make_group("b", rewards=(0.0, 0.0)))
    assert buf.metrics()["async/filtered/dynamic_sampling"] == 2
    assert buf.try_admit(["c", "d"]) and not buf.try_admit("e")
    buf.put(make_group("c"))
    buf.put(make_group("d"))
    assert ids(buf.get_batch(2, 0)) == ["c", "d"]
    assert buf.metrics()["async/refills"] == 2


def test_has_reward_variance():
    assert has_reward_variance(make_group("a", rewards=(0.0, 1.0)))
    assert not has_reward_variance(make_group("a", rewards=(0.3, 0.3, 0.3)))
    assert not has_reward_variance(make_group("a", rewards=(1.0,)))
    assert set(FILTERS) >= {"zero_variance", "dynamic_sampling"}


def test_unknown_filter_is_a_loud_error():
    with pytest.raises(ValueError, match="choose from"):
        RolloutBuffer(batch_groups=1, filters=["zero-variance"])


# ---- ledger and requeue ------------------------------------------------------------------------


def test_requeue_reissue_and_misuse():
    buf = RolloutBuffer(batch_groups=1, eta=1)
    buf.try_admit(["a", "b"])
    buf.requeue("a", payload=[7, 8])
    assert dict(buf.requeued) == {"a": [7, 8]}
    with pytest.raises(ValueError, match="requeued, expected running"):
        buf.put(make_group("a"))  # the aborted run finishing late
    with pytest.raises(ValueError, match="already issued"):
        buf.try_admit("b")
    assert buf.try_admit("a") and not buf.requeued
    with pytest.raises(ValueError, match="not issued"):
        buf.put(make_group("zzz"))
    buf.put(make_group("a"))
    led = buf.ledger()
    assert led.running == {"b"} and led.buffered == {"a"} and led.issued == {"a", "b"}
    assert buf.metrics()["async/requeues"] == 1 and buf.metrics()["async/reissues"] == 1
    assert_conserved(buf)
    with pytest.raises(ValueError, match="already issued"):
        buf.try_admit("a")  # nothing is trained twice


def test_out_of_order_completion_can_exceed_eta_and_the_cutoff_catches_it():
    """The admission bound alone does not bound staleness: a slow group ages while later ones train."""
    for eta_hard, expected_stale in [(None, 0), (1, 1)]:
        buf = RolloutBuffer(batch_groups=1, eta=1, eta_hard=eta_hard)
        buf.try_admit(["slow", "g0"])  # both at version 0: tokens carry version 0
        for v in range(3):
            buf.put(make_group(f"g{v}", versions=(v,)))
            assert ids(buf.get_batch(1, v)) == [f"g{v}"]
            buf.set_version(v + 1)
            assert buf.try_admit(f"g{v + 1}")
        buf.put(make_group("slow", versions=(0,)))
        batch = buf.get_batch(1, 3)
        assert buf.metrics()["async/dropped_stale_groups"] == expected_stale
        if eta_hard is None:
            assert ids(batch) == ["slow"] and buf.metrics()["async/staleness_max"] == 3  # > eta = 1
        else:
            assert batch is None


# ---- asyncio -------------------------------------------------------------------------------------


def test_async_waits_wake_on_put_and_on_version():
    async def main():
        buf = RolloutBuffer(batch_groups=2, eta=0)
        order = []

        async def trainer():
            for v in range(2):
                batch = await buf.wait_for_batch(2, v)
                order.append(("train", v, ids(batch)))
                buf.set_version(v + 1)

        async def rollouts():
            for i in range(4):
                while not buf.try_admit(f"t{i}"):  # waits until the trainer's step frees slots
                    await buf.changed()
                order.append(("admit", buf.version, f"t{i}"))
                await asyncio.sleep(0)
                buf.put(make_group(f"t{i}", versions=(buf.version,)))

        await asyncio.wait_for(asyncio.gather(trainer(), rollouts()), timeout=5)
        return order

    order = asyncio.run(main())
    assert order == [
        ("admit", 0, "t0"), ("admit", 0, "t1"), ("train", 0, ["t0", "t1"]),
        ("admit", 1, "t2"), ("admit", 1, "t3"), ("train", 1, ["t2", "t3"]),
    ]


# ---- property tests over random schedules ------------------------------------------------------

OPS = st.lists(st.sampled_from(["admit", "admit", "finish", "finish", "batch", "requeue"]), min_size=20, max_size=100)
FILTER_CHOICES = st.sampled_from([(), ("zero_variance",), ("dynamic_sampling",)])


def run_schedule(ops, rnd, B, eta, eta_hard, filters, in_order=False, continue_mode=True):
    """Drive a buffer like a coordinator would and check invariants after every operation.

    Tokens carry versions an engine could have used: between the version at admission and the
    current one (continue mode), or all the admission version. Versions advance once per batch.
    """
    buf = RolloutBuffer(batch_groups=B, eta=eta, eta_hard=eta_hard, filters=filters)
    v, n, trained, put_version, put_tokens, batches = 0, 0, [], {}, {}, []
    for op in ops:
        running = list(buf.running)  # admission order
        if op == "admit":
            pending = list(buf.requeued)
            tid = pending[0] if pending and rnd.random() < 0.5 else f"t{n}"
            if buf.try_admit(tid):
                n += tid == f"t{n}"
        elif op == "finish" and running:
            # in order, or out of order with a bias to the newest so that slow groups age
            tid = running[0] if in_order else running[-1] if rnd.random() < 0.5 else rnd.choice(running)
            v_admit = buf.running[tid]
            size = rnd.randint(1, 3)
            trajs = []
            for i in range(size):
                k = rnd.randint(1, 4)
                lo = rnd.randint(v_admit, v) if continue_mode else v_admit
                versions = tuple(sorted(rnd.randint(lo, v) for _ in range(k))) if continue_mode else (v_admit,) * k
                trajs.append(make_traj(tid, versions, reward=float(rnd.random() < 0.5), idx=i))
            buf.put(Group(tid, tid, "p", "a", trajs))
            put_version[tid] = (v_admit, v)
            put_tokens[tid] = sum(t.num_gen_tokens for t in trajs)
        elif op == "requeue" and running and not in_order:
            buf.requeue(rnd.choice(running))
        elif op == "batch":
            batch = buf.get_batch(B, v)
            if batch is not None:
                batches.append((v, batch))
                trained += ids(batch)
                v += 1
                buf.set_version(v)
        # invariants after every step
        assert buf.occupied <= admission_limit(buf.version, eta, B)
        assert_conserved(buf)
        assert len(trained) == len(set(trained)) and set(trained) == buf.ledger().trained
        assert buf.ledger().issued == {f"t{i}" for i in range(n)}  # nothing lost
    return buf, batches, put_version, put_tokens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, rnd=st.randoms(use_true_random=False), B=st.integers(1, 3), eta=st.integers(0, 2),
       eta_hard=st.one_of(st.none(), st.integers(0, 2)), filters=FILTER_CHOICES, continue_mode=st.booleans())
def test_random_schedules_respect_cutoff_ledger_and_fifo_window(ops, rnd, B, eta, eta_hard, filters, continue_mode):
    buf, batches, put_version, put_tokens = run_schedule(ops, rnd, B, eta, eta_hard, filters, continue_mode=continue_mode)
    for v, batch in batches:
        assert len(batch) <= B
        for g in batch:
            if eta_hard is not None:
                assert g.min_version >= v - eta_hard  # no trained token older than eta_hard
            v_admit, v_put = put_version[g.task_id]
            assert v - v_put <= eta  # what the admission bound guarantees ...
            assert v - g.min_version <= eta + (v_put - v_admit)  # ... hence for tokens
    led = buf.ledger()
    m = buf.metrics()
    assert m["async/dropped_stale_groups"] == len(led.stale)
    assert m["async/dropped_stale_tokens"] == sum(put_tokens[t] for t in led.stale)
    if eta_hard is None:
        assert not led.stale


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, rnd=st.randoms(use_true_random=False), B=st.integers(1, 3), eta=st.integers(0, 2),
       filters=FILTER_CHOICES)
def test_in_order_completion_at_admission_version_never_exceeds_eta(ops, rnd, B, eta, filters):
    """Tokens carry the version current at admission and groups finish in admission order:
    admission control at η alone keeps every trained token within η, so a cutoff at η drops nothing."""
    buf, batches, _, _ = run_schedule(ops, rnd, B, eta, eta, filters, in_order=True, continue_mode=False)
    for v, batch in batches:
        assert max(token_staleness(batch, v), default=0) <= eta
    assert buf.metrics()["async/dropped_stale_groups"] == 0


def test_refill_limit_turns_rejections_into_holes_until_the_next_batch():
    buf = RolloutBuffer(batch_groups=2, eta=0, filters=("dynamic_sampling",), refill_limit=1)
    assert buf.try_admit(["a", "b"])
    assert not buf.put(make_group("a", rewards=(1.0, 1.0)))  # refilled: its slot is free again
    assert buf.capacity == 1 and buf.try_admit("c")
    assert not buf.put(make_group("c", rewards=(0.0, 0.0)))  # past the limit: a hole keeps the slot
    assert buf.capacity == 0
    buf.put(make_group("b"))
    assert ids(buf.get_batch(2, 0)) == ["b"]  # the hole filled the other slot
    m = buf.metrics()
    assert m["async/refills"] == 1 and m["async/filtered/dynamic_sampling"] == 2
    buf.set_version(1)
    assert buf.try_admit("d")
    assert not buf.put(make_group("d", rewards=(1.0, 1.0)))  # a new batch: the limit starts again
    assert buf.capacity == 2


def test_start_version_counts_earlier_batches_as_taken():
    buf = RolloutBuffer(batch_groups=3, eta=1, start_version=5)
    assert buf.version == 5 and buf.capacity == 2 * 3  # (η + 1)·B, not (η + v + 1)·B
    assert buf.try_admit([f"t{i}" for i in range(6)]) and not buf.try_admit("t6")
