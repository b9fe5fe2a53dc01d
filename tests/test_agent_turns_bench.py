"""The scripted search episodes of benchmarks/agent_turns.py: real engine, real BM25 tool, and
the context each call saw, checked token by token against the context policy's definition."""

from __future__ import annotations

import asyncio

import pytest
import torch

from benchmarks.agent_turns import peak_context, run_episode, scripted_runner
from policyflow.engine import AsyncEngine
from policyflow.model import build_tiny
from policyflow.tasks.search_qa import SearchQATask

NEW, OBS = 6, 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tokenizer = build_tiny(seed=0, hidden_size=32, num_layers=1, intermediate_size=64, max_positions=1024)
    engine = AsyncEngine(model.eval(), tokenizer, generator=torch.Generator().manual_seed(0))
    task = SearchQATask(seed=0, num_entities=20, num_eval_entities=4, num_eval=4, corpus_dir=tmp_path_factory.mktemp("corpus"))
    return engine, tokenizer, task


def episode(setup, context: str, turns: int, max_total: int = 1024):
    engine, tokenizer, task = setup
    trajectory, _ = asyncio.run(run_episode(scripted_runner(engine, tokenizer, context, turns, NEW, OBS, max_total), task, seed=turns))
    return trajectory


@pytest.mark.parametrize("context", ["full", "mem1"])
def test_every_turn_searches_the_scripted_place_with_the_real_tool(setup, context):
    _, _, task = setup
    t = episode(setup, context, 5)
    assert t.num_turns == t.num_tool_calls == 5
    observations = [s.text for s in t.segments if s.kind == "obs"]
    for k, text in enumerate(observations):
        place = task.entities[k]
        found = f"{place.name}: {place.passage()['text']}"  # the tool's whole result
        assert text == f"<info>{found[:OBS]}</info>"  # cut once, by the runner, then wrapped whole (characters = tokens here)
    assert all(len(s.token_ids) == NEW for s in t.segments if s.kind == "gen")


def test_full_context_is_the_whole_history_and_mem1_the_last_turn(setup):
    full, mem1 = episode(setup, "full", 6), episode(setup, "mem1", 6)
    lengths = [len(s.token_ids) for s in full.segments]  # prompt, gen, obs, gen, obs, ...
    assert peak_context(full) == sum(lengths[:-2])  # the last call saw everything before its own gen
    m = [len(s.token_ids) for s in mem1.segments]
    expected = [m[0]] + [m[0] + m[2 * k - 1] + m[2 * k] for k in range(1, 6)]  # prompt, then prompt + gen + obs of the turn before
    assert [sum(m[i] for i in call.context) for call in mem1.calls] == expected
    assert peak_context(mem1) == max(expected)


def test_full_stops_truncated_at_max_total_tokens(setup):
    t = episode(setup, "full", 50, max_total=300)
    assert t.num_turns < 50 and t.status == "truncated"
    last = t.calls[-1]
    assert sum(len(t.segments[i].token_ids) for i in last.context) + len(t.segments[last.produced].token_ids) <= 300


def test_scripted_groups_search_then_answer(setup):
    """Each episode of a scripted group makes its drawn number of searches, then answers: turns =
    searches + 1, and the answer is correct (reward 1 − β + γ) exactly when it searched."""
    from benchmarks.scripted_search import ScriptedGroupBuilder

    engine, tokenizer, task = setup
    runner = scripted_runner(engine, tokenizer, "full", 4, NEW, OBS, 1024)
    builder = ScriptedGroupBuilder(task, task.train_problem(3), max_searches=3)

    async def go():
        envs = await builder.make_envs(8)
        planned = [env.searches for env in envs]
        return planned, [await runner.run(env, id=str(j), task_id="t") for j, env in enumerate(envs)]

    planned, trajectories = asyncio.run(go())
    assert len(set(planned)) > 1 and all(0 <= s <= 3 for s in planned)
    s = task.settings
    for searches, t in zip(planned, trajectories):
        # every turn is cut at max_new_tokens (no EOS), but that per-turn limit only cuts the action: the env judged
        # the last one an answer and finished the episode, so it is complete (no episode limit stopped it)
        assert (t.num_tool_calls, t.num_turns, t.status, t.finish_reason) == (searches, searches + 1, "complete", "length")
        assert t.reward == pytest.approx((1 - s.penalty if searches else 0.0) + s.format_weight)
