"""Episodes: exact multi-turn training rows (with and without context pruning), limits, and
weight swaps (continue, drain, abort) with episodes that span several engine calls."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from policyflow.agent.context import full_context, mem1_context
from policyflow.agent.episode import EpisodeRunner
from policyflow.config import AgentConfig, LossConfig, SamplingConfig, TrainConfig
from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.model import build_tiny
from policyflow.session import open_session
from policyflow.tasks.base import Problem
from policyflow.tokens import collate, episode_rows
from policyflow.trainer import Trainer, sequence_logprobs
from policyflow.weights import SnapshotStore
from policyflow.workers import GroupSpec, RolloutWorker
from policyflow.policy import PolicySpec
from tests.envs_for_tests import ScriptedBuilder, ScriptedEnv

PROBLEM = Problem("p0", "What is 12+30? ", "42")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=0)
    return model.eval(), tokenizer


def _runner(tiny, context=full_context, max_new_tokens=5, seed=0, **agent) -> EpisodeRunner:
    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, generator=torch.Generator().manual_seed(seed))
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    return EpisodeRunner(engine, tokenizer, params, AgentConfig(**agent), context=context)


def _group(runner: EpisodeRunner, builder, n: int):
    return asyncio.run(runner.run_group(builder, n, task_id="t"))[0]


# -- exact multi-turn training ----------------------------------------------------------------


@pytest.mark.parametrize(("context", "rows_per_episode"), [(full_context, 1), (mem1_context, 3)])
def test_trainer_recomputes_the_engines_logprobs_for_every_generated_token(tiny, context, rows_per_episode) -> None:
    """4 turns with observations between: every generated token, trained once, in a row that is exactly what the model saw."""
    model, _ = tiny
    group = _group(_runner(tiny, context), ScriptedBuilder(PROBLEM, turns=4), 3)
    episodes = group.trajectories
    assert [t.num_turns for t in episodes] == [4, 4, 4]
    for t in episodes:  # the calls' contexts: full extends; pruning keeps the prompt, the latest turn and its observation
        expected = [(0,), (0, 1, 2), (0, 1, 2, 3, 4), (0, 1, 2, 3, 4, 5, 6)] if context is full_context else [(0,), (0, 1, 2), (0, 3, 4), (0, 5, 6)]
        assert [c.context for c in t.calls] == expected and [c.produced for c in t.calls] == [1, 3, 5, 7]

    advantages_B = torch.tensor([-1.0, 0.0, 1.0])
    batch = collate(episodes, advantages_B, pad_id=0)
    assert batch.num_sequences == 3 * rows_per_episode
    assert batch.advantages_B.tolist() == [a for a in (-1.0, 0.0, 1.0) for _ in range(rows_per_episode)]
    assert int(batch.loss_mask_BT.sum()) == sum(t.num_gen_tokens for t in episodes) == 3 * 4 * 5  # each token trained exactly once

    with torch.no_grad():
        recomputed_BT = sequence_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT)
    mask = batch.loss_mask_BT.bool()
    assert (recomputed_BT[mask] - batch.behav_logprobs_BT[mask]).abs().max().item() < 1e-4
    out = Trainer(copy.deepcopy(model), TrainConfig(), LossConfig(), SamplingConfig(max_new_tokens=5)).step(batch)
    assert out["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the trainer's own step sees the batch as on-policy
    if context is mem1_context:  # the third call's row: prompt, turn 2, observation 2, turn 3 — and only turn 3 trained
        t = episodes[0]
        seg = lambda i: list(t.segments[i].token_ids)
        ids, mask_row, _, _ = episode_rows(t)[1]
        assert ids == seg(0) + seg(3) + seg(4) + seg(5)
        assert mask_row == [0] * (len(ids) - len(seg(5))) + [1] * len(seg(5))


def test_scripted_episode_records_observations_rewards_and_tool_counts(tiny) -> None:
    builder = ScriptedBuilder(PROBLEM, turns=3)
    group = _group(_runner(tiny), builder, 2)
    t = group.trajectories[1]
    assert [s.kind for s in t.segments] == ["prompt", "gen", "obs", "gen", "obs", "gen"]
    assert t.segments[2].text == "[obs 1]" and t.segments[4].text == "[obs 2]"
    assert t.reward == 1.0 and t.reward_parts == {"correct": 1.0} and t.num_tool_calls == 2 and t.num_tool_errors == 1
    assert all(env.closed for env in builder.envs) and builder.envs[1].actions == [t.segments[i].text for i in (1, 3, 5)]
    assert t.context_tokens_max == sum(len(s.token_ids) for s in t.segments)


# -- limits ----------------------------------------------------------------------------------


def test_max_turns_ends_the_episode_truncated_with_its_reward(tiny) -> None:
    group = _group(_runner(tiny, max_turns=2), ScriptedBuilder(PROBLEM, turns=5), 2)
    for t in group.trajectories:
        assert t.status == "truncated" and t.num_turns == 2 and t.reward == 0.0 and t.num_tool_calls == 2


def test_many_turns_beyond_128_with_a_flat_context(tiny) -> None:
    runner = _runner(tiny, mem1_context, max_new_tokens=1, max_turns=130)
    group = _group(runner, ScriptedBuilder(PROBLEM, turns=500, obs="o"), 1)
    (t,) = group.trajectories
    assert t.num_turns == 130 and t.status == "truncated"
    prompt = len(t.segments[0].token_ids)
    assert t.context_tokens_max == prompt + 3  # prompt + previous turn + its observation + this turn
    assert len(episode_rows(t)) == 129  # the first two calls share a row, every later one is pruned


def test_max_total_tokens_caps_every_call_and_truncates(tiny) -> None:
    limit = 40
    runner = _runner(tiny, max_new_tokens=6, max_total_tokens=limit, max_turns=50)
    group = _group(runner, ScriptedBuilder(PROBLEM, turns=50), 2)
    for t in group.trajectories:
        assert t.status == "truncated" and 1 < t.num_turns < 50
        assert t.context_tokens_max <= limit
        assert max(len(row[0]) for row in episode_rows(t)) <= limit


def test_max_obs_tokens_cuts_observations(tiny) -> None:
    runner = _runner(tiny, max_obs_tokens=4)
    group = _group(runner, ScriptedBuilder(PROBLEM, turns=2, obs="a long observation {k}"), 1)
    obs = group.trajectories[0].segments[2]
    assert obs.kind == "obs" and len(obs.token_ids) == 4 and obs.text == "a lo"


# -- weight swaps with multi-turn episodes -------------------------------------------------------


def _worker(small_config, *overrides):
    cfg = small_config("sampling.max_new_tokens=4", "sampling.stop=[]", *overrides)
    session = open_session(PolicySpec.of(cfg))
    store = SnapshotStore(keep=3)
    store.publish(0, session.model.state_dict())
    worker = RolloutWorker(PolicySpec.of(cfg), store, seed=0, engine_slots=cfg.pipeline.engine_slots)
    gate, waiting = asyncio.Event(), [0]
    worker.task.group_builder = lambda problem: ScriptedBuilder(problem, turns=3, gate=gate, waiting=waiting)
    return cfg, session, store, worker, gate, waiting


def _spec(worker: RolloutWorker, i: int) -> GroupSpec:
    return GroupSpec(f"train-{i}", i, worker.task.train_problem(i))


async def _collect(worker: RolloutWorker, n: int) -> dict:
    groups = []
    while len(groups) < n:
        groups += (await worker.poll()).groups
    return {g.task_id: g for g in groups}


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def _turn_versions(group) -> list[set[int]]:
    """Per turn, the versions of that turn's tokens over the group's episodes."""
    turns = max(t.num_turns for t in group.trajectories)
    return [{v for t in group.trajectories for s in t.segments if s.kind == "gen" and s.turn == k for v in s.versions} for k in range(turns)]


def test_drain_lets_admitted_episodes_finish_all_their_turns(small_config) -> None:
    """The drain is requested while every episode waits on a tool (the engine is idle): it still waits for their later turns."""
    cfg, session, store, worker, gate, waiting = _worker(small_config)
    G = cfg.train.group_size

    async def run():
        await worker.submit([_spec(worker, 0)])
        await _until(lambda: waiting[0] == G and worker.engine.num_in_flight == 0)
        store.publish(1, {k: v + 0.01 for k, v in session.model.state_dict().items()})
        assert await worker.update_weights("drain") == 0  # episodes still running: no swap yet
        await worker.submit([_spec(worker, 1)])  # held until the swap
        gate.set()
        return await _collect(worker, 2)

    groups = asyncio.run(run())
    assert _turn_versions(groups["train-0"]) == [{0}, {0}, {0}]
    assert _turn_versions(groups["train-1"]) == [{1}, {1}, {1}]
    assert worker.held_version() == 1 and worker.stats["swaps"] == 1


def test_continue_gives_later_turns_the_new_version_and_the_group_its_oldest(small_config) -> None:
    cfg, session, store, worker, gate, waiting = _worker(small_config)
    G = cfg.train.group_size

    async def run():
        await worker.submit([_spec(worker, 0)])
        await _until(lambda: waiting[0] == G)
        store.publish(1, {k: v + 0.01 for k, v in session.model.state_dict().items()})
        assert await worker.update_weights("continue") == 1
        gate.set()
        return await _collect(worker, 1)

    group = asyncio.run(run())["train-0"]
    assert _turn_versions(group) == [{0}, {1}, {1}]
    assert group.min_version == 0  # the staleness cutoff looks at the oldest token of any turn
    assert all(t.start_version == 0 and max(v for s in t.segments if s.versions for v in s.versions) == 1 for t in group.trajectories)


def test_abort_mid_turn_keeps_every_token_exact_under_its_own_version(small_config) -> None:
    cfg, session, store, worker, gate, waiting = _worker(small_config, "sampling.max_new_tokens=8")
    gate.set()  # no tool wait: the abort hits a running turn
    old_model = copy.deepcopy(session.model)
    new_weights = {k: v * 1.05 for k, v in session.model.state_dict().items()}

    async def run():
        await worker.submit([_spec(worker, 0)])
        await _until(lambda: worker.engine.stats["steps"] >= 12)  # inside the second turn (8 tokens per turn)
        store.publish(1, new_weights)
        assert await worker.update_weights("abort") == 1
        return await _collect(worker, 1)

    group = asyncio.run(run())["train-0"]
    new_model = copy.deepcopy(old_model)
    new_model.load_state_dict(new_weights)
    assert worker.engine.stats["aborted_tokens"] > 0
    batch = collate(group.trajectories, torch.zeros(len(group.trajectories)), pad_id=0)
    mask = batch.loss_mask_BT.bool()
    rows = [row for t in group.trajectories for row in episode_rows(t)]
    versions_BT = torch.tensor([row[3] + [-1] * (batch.input_ids_BT.shape[1] - len(row[3])) for row in rows])
    for version, model in ((0, old_model), (1, new_model)):
        with torch.no_grad():
            ref_BT = sequence_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT)
        picked = mask & (versions_BT == version)
        assert picked.any()
        assert (ref_BT[picked] - batch.behav_logprobs_BT[picked]).abs().max().item() < 1e-4


# -- chat models: observations in the template's tool role ----------------------------------------

CHAT = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_chat_observation_ids_continue_the_templates_own_rendering() -> None:
    """prompt ids + the model's turn (ending with its end token) + observation ids == the template's whole conversation."""
    from policyflow.model import build_char_tokenizer
    from policyflow.tokens import render_observation, render_prompt

    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT
    prompt = render_prompt(tokenizer, "2+2?", chat_template=True)
    turn = tokenizer("<search>x</search>", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    obs, text = render_observation(tokenizer, "x is 4", chat_template=True)
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<search>x</search>"}, {"role": "tool", "content": "x is 4"}]
    whole = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert prompt + turn + obs == whole and text == "x is 4"
    assert tokenizer.decode(obs) == "\n[tool]x is 4<eos>\n[assistant]"
    # A turn cut at a stop string (no end token generated): the observation closes the turn first.
    closed, _ = render_observation(tokenizer, "x is 4", chat_template=True, turn_ended=False)
    assert prompt + turn[:-1] + closed == whole


def test_the_models_position_limit_caps_episodes_without_max_total_tokens(tiny) -> None:
    """With agent.max_total_tokens empty, a growing `full` context stops at the model's window instead of failing."""
    runner = _runner(tiny, max_new_tokens=40, max_turns=100)
    window = runner.generator.max_positions
    assert window is not None and runner.max_total_tokens == window
    group = _group(runner, ScriptedBuilder(PROBLEM, turns=100), 1)
    (t,) = group.trajectories
    assert t.status == "truncated" and t.num_turns < 100 and t.context_tokens_max <= window


class _BrokenEnv(ScriptedEnv):
    async def step(self, action: str):
        raise RuntimeError("simulated env bug")


def test_an_env_that_raises_stops_the_worker_loudly(small_config) -> None:
    cfg, session, store, worker, gate, waiting = _worker(small_config)
    builder = ScriptedBuilder(PROBLEM, turns=2)

    async def broken_envs(n):
        return [_BrokenEnv("p", 2) for _ in range(n)]

    builder.make_envs = broken_envs
    worker.task.group_builder = lambda problem: builder

    async def run():
        await worker.submit([_spec(worker, 0)])
        await worker.poll()

    with pytest.raises(RuntimeError, match="simulated env bug"):
        asyncio.run(asyncio.wait_for(run(), timeout=60))


def test_episode_record_keeps_every_turn_for_samples_jsonl(tiny) -> None:
    from policyflow.rollout import episode_record

    group = _group(_runner(tiny), ScriptedBuilder(PROBLEM, turns=2), 1)
    t = group.trajectories[0]
    record = episode_record(t)
    assert [(s["kind"], any(s["loss_mask"])) for s in record["segments"]] == [("prompt", False), ("gen", True), ("obs", False), ("gen", True)]
    assert record["segments"][0]["text"] == PROBLEM.prompt and record["segments"][2]["text"] == "[obs 1]"
    assert record["calls"] == [{"context": [0], "produced": 1}, {"context": [0, 1, 2], "produced": 3}]
    assert len(record["steps"]) == 2 and record["tool_calls"] == 1


# -- the whole pipeline with multi-turn episodes ----------------------------------------------


@pytest.mark.parametrize("runtime", ["inline", "process"])
def test_async_pipeline_with_search_episodes_under_mem1(small_config, runtime) -> None:
    """Multi-turn search episodes (tool calls, pruned contexts) through the pool, buffer and trainer in both runtimes."""
    import json

    from policyflow import coordinator

    cfg = small_config(
        "task.name=search_qa", "task.search.num_entities=30", "task.search.num_eval_entities=5", "task.num_eval=4",
        "agent.context=mem1", "agent.max_turns=3", "agent.max_total_tokens=160", "agent.max_obs_tokens=48", "sampling.max_new_tokens=24",
        "pipeline.mode=async", f"pipeline.runtime={runtime}", "sft.max_steps=0", "eval.every=0", "train.steps=2",
        "train.skip_zero_variance=false", "run.samples_every=1",
    )
    summary = coordinator.train(cfg, log=lambda *_: None)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "agent/turns_mean" in m]
    assert len(steps) == 2
    for m in steps:  # issue 10 §5's agent metrics, from the trained episodes, in both runtimes
        assert {"agent/tool_calls_mean", "agent/tool_errors", "agent/tool_timeouts", "perf/tool_seconds"} <= m.keys()
        assert 1 < m["agent/turns_mean"] <= 3 and m["agent/context_tokens_max"] <= 160
        assert m["async/staleness_max"] <= cfg.pipeline.eta_hard
    assert summary["groups"]["trained"] == 2 * cfg.train.prompts_per_step
    sample = json.loads((cfg.run_dir / "samples.jsonl").read_text().splitlines()[0])
    assert sample["turns"] == len(sample["calls"]) > 1
