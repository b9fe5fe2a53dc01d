"""Two tools in one episode (issue 18 §4): search_qa with `code_tool` adds the sandboxed code tool,
two-lookup demonstrations search A, search B, run `print(A+B)` and copy the printed sum; off, the
task is exactly as before (`configs/search_code.yaml`, docs/guide.md "Search demo", "Two tools")."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from policyflow import coordinator
from policyflow.agent.env import group_builder
from policyflow.config import load_config
from policyflow.session import build_task
from policyflow.tasks.search_qa import SearchQATask
from policyflow.policy import PolicySpec
from tests.conftest import SMALL

ARGS = dict(seed=3, num_entities=60, num_eval_entities=12, num_eval=30)
# The digest of the demonstrations, stop strings, wraps and reward parts the task gave before
# `code_tool` existed (computed with that version, both formats; see `_demonstrations_digest`).
DIGEST_BEFORE_CODE_TOOL = "b7fc539821d700223015fab2a7e0e376378ef33d4aa2ba53685827e9ef5abc9b"


def _demonstrations_digest(tmp_path, **extra) -> str:
    out = []
    for fmt in ("tags", "hermes"):
        task = SearchQATask(**ARGS, corpus_dir=tmp_path, tool_format=fmt, demo_search_fraction=0.75, **extra)
        problems = [task.sft_problem(i) for i in range(200)] + [task.train_problem(i) for i in range(100)]
        out.append([[p.prompt, p.answer, task.sft_turns(p)] for p in problems])
        out.append([task.stop, task.observation_wrap, [r.name for r in task.reward_parts()]])
    return hashlib.sha256(json.dumps(out).encode()).hexdigest()


def test_switch_off_leaves_the_task_as_it_was(tmp_path):
    assert _demonstrations_digest(tmp_path) == DIGEST_BEFORE_CODE_TOOL
    assert _demonstrations_digest(tmp_path, code_tool=False) == DIGEST_BEFORE_CODE_TOOL
    cfg = load_config("configs/search.yaml", [f"run.output_dir={tmp_path}"])
    assert cfg.task.search.code_tool is False and build_task(PolicySpec.of(cfg)).code_tool is False


@pytest.fixture
def task(tmp_path) -> SearchQATask:
    return SearchQATask(**ARGS, corpus_dir=tmp_path / "corpus", code_tool=True, code=dict(timeout_s=5.0, memory_mb=256, concurrency=4))


def test_two_lookup_demonstrations_compute_the_sum_in_code(task, tmp_path):
    off = SearchQATask(**ARGS, corpus_dir=tmp_path / "off")
    problems = [task.sft_problem(i) for i in range(100)]
    assert {p.columns["hops"] for p in problems} == {1, 2}
    for problem in problems:
        demo, before = task.sft_turns(problem), off.sft_turns(problem)
        if problem.columns["hops"] == 1:
            assert demo == before  # one-lookup demonstrations unchanged
            continue
        a, b = task.places(problem)
        assert demo == [*before[:-1], ("gen", f"<code>print({a.pop}+{b.pop})</code>"), ("obs", problem.answer), before[-1]]
    assert task.stop == ("</search>", "</code>", "</answer>")
    hermes = SearchQATask(**ARGS, corpus_dir=tmp_path / "hermes", tool_format="hermes", code_tool=True)
    problem = next(p for p in problems if p.columns["hops"] == 2)
    a, b = hermes.places(problem)
    assert ("gen", f'<tool_call>{json.dumps({"name": "python", "arguments": {"code": f"print({a.pop}+{b.pop})"}})}</tool_call>') in hermes.sft_turns(problem)


async def _play(env, actions):
    prompt = await env.initial_observation()
    results = [await env.step(a) for a in actions]
    await env.close()
    return prompt, results


def test_two_lookup_demonstration_replays_through_the_env(task):
    """Search A, search B, code, answer in a real env (real search, real sandbox): exactly the
    demonstration's observations, reward 1 − β + γ (β charged once, for the searches only), and
    the whole episode fits the tiny model's 256 positions."""
    problems = [p for p in (task.train_problem(k) for k in range(40)) if p.columns["hops"] == 2][:3]
    assert problems
    for problem in problems:
        demo = task.sft_turns(problem)
        [env] = asyncio.run(group_builder(task, problem).make_envs(1))
        prompt, results = asyncio.run(_play(env, [text for kind, text in demo if kind == "gen"]))
        assert [r.observation for r in results[:-1]] == [text for kind, text in demo if kind == "obs"]
        assert [r.tools.calls for r in results] == [1, 1, 1, 0]
        assert results[2].info["calls"][0]["tool"] == "code"
        last = results[-1]
        assert last.done and last.reward_parts == {"correct": 1.0, "search_penalty": -0.1, "format": 0.1}
        assert last.reward == pytest.approx(1.0)
        assert len(prompt) + sum(len(text) for _, text in demo) + len("<info></info>") * 3 <= 256
    assert env.stop == task.stop


def test_code_alone_is_not_charged_the_search_penalty(task):
    problem = next(p for p in (task.train_problem(k) for k in range(40)) if p.columns["hops"] == 1 and p.answer.isdigit())
    [env] = asyncio.run(group_builder(task, problem).make_envs(1))
    _, results = asyncio.run(_play(env, [f"<code>print({problem.answer})</code>", f"<answer>{problem.answer}</answer>"]))
    assert results[0].observation == problem.answer
    assert results[-1].reward_parts == {"correct": 1.0, "search_penalty": 0.0, "format": 0.1}


def test_config_builds_and_runs_two_steps(tmp_path):
    cfg = load_config("configs/search_code.yaml", [f"run.output_dir={tmp_path}"])
    task = build_task(PolicySpec.of(cfg))
    assert task.code_tool and task.code_settings.timeout_s == cfg.task.code.timeout_s and cfg.agent.max_turns >= 4
    assert cfg.agent.code_temperature == 1.0
    small = [*SMALL, f"run.output_dir={tmp_path}", "task.search.num_entities=60", "task.search.num_eval_entities=12",
             "sampling.max_new_tokens=24", "run.samples_every=1"]
    cfg = load_config("configs/search_code.yaml", small)
    summary = coordinator.train(cfg, log=lambda *_: None)
    assert "two_lookups" in summary["eval_after"]["accuracy_sampled_by_split"]
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in rows if "agent/tool_calls_mean" in m]) == 2
