"""The code demo (`configs/code.yaml`, task `multiply`): the task, its demonstrations replayed
through the env with the real sandbox, and the whole config run for two steps at tiny sizes."""

from __future__ import annotations

import asyncio
import json

from policyflow import coordinator
from policyflow.agent.tool_env import PerEpisodeToolGroupBuilder, ToolGroupBuilder
from policyflow.config import load_config
from policyflow.session import build_task
from policyflow.tasks.multiply import MultiplyTask
from policyflow.policy import PolicySpec
from tests.conftest import SMALL


def test_task_problems_and_held_out_pairs():
    task = MultiplyTask(seed=3, num_eval=50)
    held_out = {(p.columns["a"], p.columns["b"]) for p in task.eval_problems()}
    assert len(held_out) == 50
    for i in range(300):
        p = task.train_problem(i)
        a, b = p.columns["a"], p.columns["b"]
        assert 100 <= a <= 9999 and 100 <= b <= 9999 and p.answer == str(a * b) and p.prompt == f"{a}*{b}"
        assert (a, b) not in held_out and (b, a) not in held_out
    assert task.train_problem(7) == MultiplyTask(seed=3, num_eval=50).train_problem(7)
    p = task.eval_problems()[0]
    assert task.is_correct(p, p.answer) and task.is_correct(p, "0" + p.answer) and not task.is_correct(p, p.answer + "1")
    assert not task.is_correct(p, None) and not task.is_correct(p, "١٢")


def test_demonstrations_replay_through_the_env_in_the_sandbox():
    task = MultiplyTask(seed=0, num_eval=10, demo_code_fraction=0.5)
    kinds = [len(task.sft_turns(task.sft_problem(i))) for i in range(200)]
    assert 60 < kinds.count(3) < 140 and kinds.count(1) == 200 - kinds.count(3)  # about half run code
    problem = next(task.sft_problem(i) for i in range(20) if len(task.sft_turns(task.sft_problem(i))) == 3)
    turns = task.sft_turns(problem)
    assert turns[0] == ("gen", f"<code>print({problem.prompt})</code>") and turns[1] == ("obs", problem.answer)

    async def play():
        (env,) = await task.group_builder(problem).make_envs(1)
        first = await env.step(turns[0][1])
        last = await env.step(turns[2][1])
        await env.close()
        return env, first, last

    env, first, last = asyncio.run(play())
    assert first.observation == turns[1][1]  # the demonstration's observation is what the sandbox prints
    assert env.observation_wrap == ("<out>", "</out>") and env.stop == task.stop == ("</code>", "</answer>")
    assert last.done and last.reward_parts == {"correct": 1.0, "code_penalty": 0.0, "format": 0.1}


def test_stateful_and_hermes_builders():
    task = MultiplyTask(num_eval=4, stateful=True, tool_format="hermes")
    builder = task.group_builder(task.eval_problems()[0])
    assert isinstance(builder, PerEpisodeToolGroupBuilder)
    envs = asyncio.run(builder.make_envs(2))
    assert envs[0].setup.pool is not envs[1].setup.pool and task.prompt_tools()[0]["function"]["name"] == "python"
    assert '"name": "python"' in task.sft_turns(task.sft_problem(0))[0][1] or task.demo_code_fraction < 1
    assert isinstance(MultiplyTask(num_eval=4).group_builder(task.eval_problems()[0]), ToolGroupBuilder)


def test_config_builds_the_task(tmp_path):
    cfg = load_config("configs/code.yaml", [f"run.output_dir={tmp_path}"])
    task = build_task(PolicySpec.of(cfg))
    assert isinstance(task, MultiplyTask) and (task.min_digits, task.max_digits) == (3, 4)
    assert task.demo_code_fraction == cfg.task.code.demo_code_fraction and task.settings.timeout_s == cfg.task.code.timeout_s


def test_demo_config_runs_two_steps(tmp_path):
    """configs/code.yaml end to end at tiny sizes: SFT, RL with code episodes in the sandbox, eval, summary."""
    cfg = load_config("configs/code.yaml", [*SMALL, f"run.output_dir={tmp_path}", "sampling.max_new_tokens=24", "run.samples_every=1"])
    summary = coordinator.train(cfg, log=lambda *_: None)
    assert {"eval_before", "eval_after"} <= summary.keys() and "accuracy_sampled" in summary["eval_after"]
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "agent/tool_calls_mean" in m]
    assert len(steps) == 2 and all({"agent/tool_errors", "perf/tool_seconds"} <= m.keys() for m in steps)
