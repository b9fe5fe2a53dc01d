"""The one pipeline in every mode: sync reproduces plain synchronous RL exactly, the stale modes
keep their staleness bounds, weight swaps tag tokens correctly, a killed worker loses nothing,
and a resumed asynchronous run drops its in-flight work cleanly."""

import asyncio
import json
from pathlib import Path

import pytest
import torch

from policyflow import coordinator
from policyflow.checkpoint import STATE_FILE, load_state, write_manifest
from policyflow.rollout import build_batch, rollout_groups
from policyflow.session import open_session
from policyflow.trainer import Trainer, sequence_logprobs
from policyflow.weights import SnapshotStore
from policyflow.workers import GroupSpec, RolloutWorker
from policyflow.policy import PolicySpec

QUIET = dict(log=lambda *_: None)


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(cfg) -> list[dict]:
    return [m for m in _metrics(cfg) if "loss/total" in m or "rollout/reward_mean" in m]


def _final_loop(summary: dict):
    return load_state(Path(summary["final_checkpoint"]))["loop"]


def _trained_task_ids(cfg) -> list[list[str]]:
    """The task ids each step trained, in batch order, from samples.jsonl (complete with
    run.samples_every=1 and at most coordinator.SAMPLE_GROUPS groups per step)."""
    assert cfg.run.samples_every == 1 and cfg.train.prompts_per_step <= coordinator.SAMPLE_GROUPS
    steps: dict[int, list[str]] = {}
    for line in (cfg.run_dir / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        ids = steps.setdefault(record["step"], [])
        if record["task_id"] not in ids:
            ids.append(record["task_id"])
    return [steps[step] for step in sorted(steps)]


def test_sync_mode_reproduces_plain_synchronous_rl_exactly(small_config) -> None:
    cfg = small_config("sft.max_steps=0", "eval.every=0", "train.steps=3", "train.epochs=2", "train.minibatches=2", "run.samples_every=1")
    coordinator.train(cfg, **QUIET)
    logged = _steps(cfg)

    # The same run written as the textbook loop: sample B groups with the current policy, train.
    session = open_session(PolicySpec.of(cfg))
    trainer = Trainer(session.model, cfg.train, cfg.loss, cfg.sampling)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    B, G = cfg.train.prompts_per_step, cfg.train.group_size
    for step in range(3):
        problems = [session.task.train_problem(i) for i in range(step * B, (step + 1) * B)]
        groups, _ = rollout_groups(session.runner, session.task, problems, G, generator)
        batch, _ = build_batch(groups, cfg.train, cfg.advantage, session.tokenizer.pad_token_id)
        out = trainer.step(batch)
        rewards = [t.reward for g in groups for t in g.trajectories]
        assert logged[step]["rollout/reward_mean"] == sum(rewards) / len(rewards)
        assert logged[step]["loss/total"] == pytest.approx(out["loss/total"], rel=1e-6, abs=1e-9)
        assert logged[step]["async/staleness_max"] == 0
    assert _trained_task_ids(cfg) == [[f"train-{i}" for i in range(step * B, (step + 1) * B)] for step in range(3)]


@pytest.mark.parametrize("overrides", [
    ("pipeline.mode=one_step_off",),
    ("pipeline.mode=one_step_off", "pipeline.rollout_workers=2"),
    ("pipeline.mode=async", "pipeline.max_staleness=1", "pipeline.hard_staleness=1"),
    ("pipeline.mode=async", "pipeline.swap=abort", "pipeline.engine_slots=4"),
    ("pipeline.mode=async", "pipeline.max_lag=1", "pipeline.rollout_workers=2"),
])
def test_stale_modes_keep_their_bounds_and_account_for_every_group(small_config, overrides) -> None:
    cfg = small_config(*overrides, "eval.every=0", "train.steps=5", "run.samples_every=1")
    assert cfg.loss.name == "decoupled_ppo"  # the default objective once data can be stale
    summary = coordinator.train(cfg, **QUIET)
    p = cfg.pipeline
    rows = _steps(cfg)
    assert len(rows) == 5 and all(torch.isfinite(torch.tensor(m["loss/total"])) for m in rows)
    assert max(m["async/staleness_max"] for m in rows) <= p.eta_hard
    assert any(m["async/staleness_max"] > 0 for m in rows)  # the data really was stale
    for m in rows:
        # Decoupled PPO: the proximal policy is the current one at the step's only update, so
        # u = π/π_prox is exactly 1 and nothing is clipped, however stale the data ...
        assert m["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["loss/clip_frac"] == 0.0
        # ... and the behaviour weight π_prox/π_behav is 1 on fresh tokens, not on stale ones
        # (its mean stays ≈ 1 either way, E_behav[w] = 1, so the max is what shows it).
        if m["async/staleness_max"] == 0:
            assert m["loss/behav_weight_mean"] == pytest.approx(1.0, abs=1e-5)
            assert m["loss/behav_weight_max"] == pytest.approx(1.0, abs=1e-5)
        else:
            assert m["loss/behav_weight_max"] > 1 + 1e-3
    if p.swap_mode == "drain" and p.rollout_workers == 1:
        # One engine draining whole groups: groups finish in version order, so admission alone
        # keeps every trained token within η and the cutoff never has to drop anything.
        assert max(m["async/staleness_max"] for m in rows) <= p.eta
        assert rows[-1]["async/dropped_stale_groups"] == 0
    for m in rows:
        assert 0 < m["async/engine_utilisation"] <= 1 and 0 <= m["async/trainer_idle_fraction"] < 1
    loop = _final_loop(summary)
    counts = summary["groups"]
    trained = [tid for step in _trained_task_ids(cfg) for tid in step]
    assert len(set(trained)) == len(trained) == counts["trained"] == 5 * cfg.train.prompts_per_step
    issued = counts["trained"] + counts["buffered"] + counts["running"] + counts["requeued"] + counts["stale"] + counts["filtered"]
    assert issued == summary["async"]["async/issued_groups"] == loop.next_problem
    if p.swap_mode == "abort":
        assert summary["async"]["async/aborted_tokens"] > 0


def test_dynamic_sampling_refills_and_its_cap_keeps_the_run_going(small_config) -> None:
    # Every reward is 0: DAPO rejects every group; past the cap the batch trains on nothing, and the run still ends.
    cfg = small_config("task.reward=tests.rewards_for_tests:broken", "train.dynamic_sampling=true", "train.max_resample_rounds=1", "eval.every=0")
    summary = coordinator.train(cfg, **QUIET)
    rows = _steps(cfg)
    B = cfg.train.prompts_per_step
    assert summary["steps"] == 2 and [m["async/batch_groups"] for m in rows] == [0, 0]
    assert rows[-1]["async/refills"] == 2 * B and rows[-1]["async/filtered/dynamic_sampling"] >= 4 * B


# -- the rollout worker on its own ----------------------------------------------------------


async def _collect(worker: RolloutWorker, n: int) -> list:
    groups = []
    while len(groups) < n:
        groups += (await worker.poll()).groups
    return groups


def _worker(small_config, *overrides):
    cfg = small_config(*overrides)
    session = open_session(PolicySpec.of(cfg))
    store = SnapshotStore(keep=3)
    store.publish(0, session.model.state_dict())
    return cfg, session, store, RolloutWorker(PolicySpec.of(cfg), store, seed=0, engine_slots=cfg.pipeline.engine_slots)


def _spec(worker: RolloutWorker, i: int) -> GroupSpec:
    return GroupSpec(f"train-{i}", i, worker.task.train_problem(i))


def test_worker_scores_groups_and_shapes_overlong(small_config) -> None:
    cfg, _, _, worker = _worker(small_config, "train.overlong_cache_len=2")

    async def run():
        await worker.submit([_spec(worker, i) for i in range(3)])
        return await _collect(worker, 3)

    groups = asyncio.run(run())
    assert sorted(g.task_id for g in groups) == ["train-0", "train-1", "train-2"]
    for t in (t for g in groups for t in g.trajectories):
        n = t.num_gen_tokens
        assert t.reward_parts["overlong"] == pytest.approx(0.0 if n <= 4 else (4 - n) / 2)
        assert set(t.segments[1].versions) == {0}


def test_drain_finishes_whole_groups_on_old_weights(small_config) -> None:
    """Slots < G: queued members of a submitted group still sample with the old weights."""
    cfg, session, store, worker = _worker(small_config, "pipeline.engine_slots=2", "sampling.max_new_tokens=4")

    async def run():
        await worker.submit([_spec(worker, 0)])
        await asyncio.sleep(0)
        store.publish(1, {k: v + 0.01 for k, v in session.model.state_dict().items()})
        assert await worker.update_weights("drain") == 0  # pending until the group is done
        await worker.submit([_spec(worker, 1)])
        return await _collect(worker, 2)

    groups = {g.task_id: g for g in asyncio.run(run())}
    versions = lambda g: {v for t in g.trajectories for v in t.segments[1].versions}
    assert versions(groups["train-0"]) == {0} and versions(groups["train-1"]) == {1}
    assert worker.held_version() == 1 and worker.stats["swaps"] == 1


def test_abort_swap_keeps_per_version_logprobs_exact(small_config) -> None:
    """Tokens before an abort swap match the old weights' log-probs; the resumed ones match the new weights."""
    cfg, session, store, worker = _worker(small_config, "sampling.max_new_tokens=8", "sampling.stop=[]")
    new_weights = {k: v * 1.05 for k, v in session.model.state_dict().items()}

    async def run():
        await worker.submit([_spec(worker, 0)])
        while worker.engine.stats["steps"] < 3:  # some tokens decoded, none finished (8 new tokens, no stop)
            await asyncio.sleep(0)
        store.publish(1, new_weights)
        assert await worker.update_weights("abort") == 1
        return await _collect(worker, 1)

    (group,) = asyncio.run(run())
    old_model = session.model
    new_model = open_session(PolicySpec.of(cfg)).model
    new_model.load_state_dict(new_weights)
    assert worker.engine.stats["aborted_tokens"] > 0
    mixed = 0
    for t in group.trajectories:
        prompt, gen = t.segments
        ids = torch.tensor([prompt.token_ids + gen.token_ids])
        P = len(prompt.token_ids)
        for version, model in ((0, old_model), (1, new_model)):
            with torch.no_grad():
                ref = sequence_logprobs(model, ids, torch.ones_like(ids))[0, P:]
            picked = [i for i, v in enumerate(gen.versions) if v == version]
            assert torch.allclose(ref[picked], torch.tensor(gen.logprobs)[picked], atol=1e-4)
        mixed += len(set(gen.versions)) == 2
        assert list(gen.versions) == sorted(gen.versions)  # old tokens first, then new
    assert mixed > 0


# -- faults and resume ---------------------------------------------------------------------


def test_a_worker_whose_engine_fails_stops_the_run_with_its_error(small_config) -> None:
    from tests.workers_for_tests import BreaksAfterTwoGroups

    cfg = small_config("pipeline.mode=async", "eval.every=0", "sft.max_steps=0", "train.steps=4")
    with pytest.raises(MemoryError, match="simulated"):
        asyncio.run(asyncio.wait_for(coordinator.run_rl(cfg, worker_cls=BreaksAfterTwoGroups, **QUIET), timeout=120))


def test_workers_that_keep_dying_end_the_run_after_max_restarts(small_config) -> None:
    from tests.workers_for_tests import AlwaysDead

    cfg = small_config("eval.every=0", "sft.max_steps=0", "pipeline.max_worker_restarts=2")
    with pytest.raises(RuntimeError, match="died 3 times"):
        asyncio.run(asyncio.wait_for(coordinator.run_rl(cfg, worker_cls=AlwaysDead, **QUIET), timeout=120))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sigkilled_worker_is_replaced_and_nothing_is_lost_or_trained_twice(small_config, lora_rank: int) -> None:
    cfg = small_config("pipeline.mode=async", "pipeline.runtime=process", "pipeline.rollout_workers=2", "eval.every=0", "train.steps=5", "sft.max_steps=0", f"model.lora.rank={lora_rank}", "run.samples_every=1")
    from tests.workers_for_tests import DiesOnce

    summary = asyncio.run(coordinator.run_rl(cfg, worker_cls=DiesOnce, **QUIET))
    assert (cfg.run_dir / "killed-a-worker").exists()
    stats = summary["async"]
    assert stats["async/worker_restarts"] == 1 and stats["async/requeues"] >= 1
    loop = _final_loop(summary)
    trained = [tid for step in _trained_task_ids(cfg) for tid in step]
    assert len(trained) == len(set(trained)) == 5 * cfg.train.prompts_per_step
    counts = summary["groups"]
    # Every issued task is trained, still in flight, or counted as dropped: nothing vanished with the worker.
    accounted = set(trained) | set(loop.in_flight_task_ids)
    assert len(accounted) + counts["stale"] + counts["filtered"] == loop.next_problem
    assert stats["async/reissues"] + counts["requeued"] == stats["async/requeues"]


def test_async_resume_drops_in_flight_work_and_never_trains_a_task_twice(small_config) -> None:
    first = small_config("pipeline.mode=async", "eval.every=0", "train.steps=2", "run.samples_every=1")
    summary = coordinator.train(first, **QUIET)
    saved = _final_loop(summary)
    assert saved.in_flight_task_ids  # async: groups were in flight when the checkpoint was written
    before = _trained_task_ids(first)
    _as_written_by_an_older_version(Path(summary["final_checkpoint"]), [tid for step in before for tid in step])
    more = small_config("pipeline.mode=async", "eval.every=0", "train.steps=4", "run.samples_every=1")
    summary = coordinator.train(more, resume=first.run_dir, **QUIET)
    loop = _final_loop(summary)
    assert summary["steps"] == 4 and loop.version == 4
    steps = _trained_task_ids(more)
    assert len(steps) == 4 and steps[:2] == before
    trained = [tid for step in steps for tid in step]
    assert len(set(trained)) == len(trained)
    assert not set(saved.in_flight_task_ids) & set(trained)
    assert min(int(t.rsplit("-", 1)[1]) for step in steps[2:] for t in step) >= saved.next_problem


def _as_written_by_an_older_version(checkpoint: Path, trained: list[str]) -> None:
    """Put back the unbounded `consumed_task_ids` list older versions kept in the loop state (manifest rewritten)."""
    blob = torch.load(checkpoint / STATE_FILE, weights_only=False)
    blob["loop"]["consumed_task_ids"] = trained
    torch.save(blob, checkpoint / STATE_FILE)
    write_manifest(checkpoint)
