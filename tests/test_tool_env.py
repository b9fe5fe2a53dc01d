"""The generic tool env (`agent/tool_env.py`): any tools, an answer check and reward parts the
task declares; search as one configuration of it; and prompts rendered identically, tools
included, by SFT, prompt fitting and RL (the Hermes format, with demonstrations of its own)."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
import torch

from policyflow.agent.context import full_context
from policyflow.agent.env import group_builder
from policyflow.agent.episode import EpisodeRunner
from policyflow.agent.tool_env import Outcome, RewardPart, ToolEnv, ToolGroupBuilder, ToolSetup, format_bonus, tool_penalty
from policyflow.config import AgentConfig, load_config
from policyflow.engine import SamplingParams
from policyflow.model import build_char_tokenizer
from policyflow.problems import Problem
from policyflow.rewards import search_penalty_reward
from policyflow.rollout import encode_prompts
from policyflow.session import prompt_fit
from policyflow.sft import demonstration_rows
from policyflow.tasks.search_qa import SearchQATask
from policyflow.tokens import episode_rows
from policyflow.tools import Tool, ToolPool
from policyflow.tools.search import SearchIndex, search_tool
from policyflow.types import Sample
from policyflow.policy import PolicySpec

# A chat template with tools (rendered before the conversation) and tool-role messages, for the
# character tokenizer: enough of Qwen's shape to test Hermes prompts and observations.
TOOLS_TEMPLATE = (
    "{%- if tools %}[tools]{% for t in tools %}{{ t | tojson }}{% endfor %}<eos>\n{% endif %}"
    "{%- for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}"
    "{%- if add_generation_prompt %}[assistant]{% endif %}"
)


class RecordingEngine:
    """Stands in for AsyncEngine: answers each call with the next scripted turn (char tokens;
    `eos` turns end with EOS, as a Hermes turn does) and records every call's prompt ids."""

    version = 0
    max_positions = None

    def __init__(self, tokenizer, turns: list[str], eos: bool):
        self.tokenizer, self.turns, self.eos, self.prompts = tokenizer, list(turns), eos, []

    async def generate(self, prompt_ids, params):
        self.prompts.append(list(prompt_ids))
        text = self.turns.pop(0)
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += (self.tokenizer.eos_token_id,) if self.eos or not self.turns else ()
        return Sample(tuple(prompt_ids), ids, (-0.5,) * len(ids), (0,) * len(ids), "stop", text)


def _play(env, actions: list[str]):
    async def run():
        await env.initial_observation()
        return [await env.step(a) for a in actions]

    return asyncio.run(run())


async def _add(a: int, b: int) -> str:
    return str(a + b)


ADD = Tool("add", "Add two integers.", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"], "additionalProperties": False}, _add)


def test_one_env_runs_two_tools_with_the_tasks_reward_parts(tmp_path) -> None:
    """Search and a second tool in one episode (search A, search B, add, answer) with no new env
    class: each call is routed to its tool and counted per tool, a failed call is an error
    observation that still counts as a call, and the reward is `correct` plus the declared parts
    (the search penalty counts only searches)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "title": "Zesok", "text": "pop 40"}\n{"id": "b", "title": "Kuvi", "text": "pop 2"}\n')
    pool = ToolPool([search_tool(SearchIndex(corpus, tmp_path / "bm25"), k=1), ADD])
    penalty = tool_penalty(0.25, tools=["search"])
    own = RewardPart("adds", lambda o: 0.01 * o.calls_by_tool.get("add", 0))
    setup = ToolSetup(pool, "hermes", lambda problem, answer: answer == problem.answer, (penalty, format_bonus(0.1), own))
    problem = Problem("p", "pop of Zesok + Kuvi?", "42")
    [env] = asyncio.run(ToolGroupBuilder(problem, "Q: pop of Zesok + Kuvi?\n", setup).make_envs(1))
    call = lambda name, **args: f"<tool_call>{json.dumps({'name': name, 'arguments': args})}</tool_call>"  # noqa: E731
    results = _play(env, [call("search", query="Zesok"), call("search", query="Kuvi"), call("add", a="40", b=2), call("add", a=40, b=2), "<answer>42</answer>"])
    assert [r.observation for r in results[:4]] == ["Zesok: pop 40", "Kuvi: pop 2", "error: bad arguments for add: argument 'a' must be integer, got str", "42"]
    assert [(r.tools.calls, r.tools.errors) for r in results] == [(1, 0), (1, 0), (1, 1), (1, 0), (0, 0)]
    assert env.calls == {"search": 2, "add": 2} and env.tool_errors == 1 and env.malformed == 0
    last = results[-1]
    assert last.done and last.reward_parts == {"correct": 1.0, "search_penalty": -0.25, "format": 0.1, "adds": 0.02}
    assert last.reward == pytest.approx(1.0 - 0.25 + 0.1 + 0.02)
    assert env.stop == () and env.tools == [t.schema() for t in (pool.tools["search"], ADD)]


def test_the_search_reward_parts_are_mmsearch_r1s() -> None:
    """tool_penalty and format_bonus give exactly rewards.search_penalty_reward's parts for every
    (correct, searches, well formed), the numbers SearchEnv used to hard-code."""
    penalty, fmt = tool_penalty(0.1), format_bonus(0.1)
    for correct, calls, malformed in itertools.product([False, True], [0, 1, 3], [0, 2]):
        outcome = Outcome(correct=correct, answer="x", tool_calls=calls, calls_by_tool={"search": calls}, tool_errors=0, malformed=malformed, turns=calls + malformed + 1)
        expected = search_penalty_reward(torch.tensor(float(correct), dtype=torch.float64), torch.tensor(calls), torch.tensor(malformed == 0), penalty=0.1, format_weight=0.1)
        assert penalty.fn(outcome) == float(expected["search_penalty"]) and fmt.fn(outcome) == float(expected["format"])


def test_a_setup_that_breaks_the_rules_is_refused(tmp_path) -> None:
    pool = ToolPool([ADD])
    check = lambda problem, answer: True  # noqa: E731
    with pytest.raises(ValueError, match="cannot be named 'correct'"):
        RewardPart("correct", lambda o: 1.0)
    with pytest.raises(ValueError, match="unique"):
        ToolSetup(pool, "hermes", check, (format_bonus(0.1), format_bonus(0.2)))
    with pytest.raises(ValueError, match="unknown tool format 'xml'"):
        ToolSetup(pool, "xml", check)
    with pytest.raises(ValueError, match="cannot be called with tags: it needs exactly one required string argument"):
        ToolSetup(pool, "tags", check)  # add takes two integers: fine for Hermes, not for a tag
    with pytest.raises(ValueError, match=r"search penalty must be in \[0, 1\]"):
        tool_penalty(1.5)


def test_the_runner_closes_the_env_once_however_it_ended(tmp_path) -> None:
    """`on_close` releases what one episode holds (a per-episode sandbox): run once, at the end."""
    closed: list[str] = []

    async def release() -> None:
        closed.append("closed")

    tok = build_char_tokenizer()
    setup = ToolSetup(ToolPool([ADD]), "hermes", lambda problem, answer: answer == "3")
    env = ToolEnv(Problem("p", "1+2?", "3"), "1+2?", setup, on_close=release)
    runner = EpisodeRunner(RecordingEngine(tok, ["<tool_call>{"] * 2, eos=True), tok, SamplingParams(max_new_tokens=32), AgentConfig(max_turns=2))
    traj = asyncio.run(runner.run(env, id="e", task_id="t"))
    assert traj.status == "truncated" and env.malformed == 2 and closed == ["closed"]  # stopped by agent.max_turns, never answered
    asyncio.run(env.close())
    assert closed == ["closed"]


@pytest.mark.parametrize("fmt", ["tags", "hermes"])
def test_the_task_declares_what_its_envs_show(tmp_path, fmt: str) -> None:
    """search_qa's `stop`, `prompt_tools()` and `observation_wrap` are what its envs expose to the
    runner, so what SFT and prompt fitting read off the task is what RL renders."""
    task = SearchQATask(seed=1, num_entities=20, num_eval_entities=4, num_eval=5, tool_format=fmt, corpus_dir=tmp_path)
    builder = group_builder(task, task.train_problem(0))
    [env] = asyncio.run(builder.make_envs(1))
    assert isinstance(env, ToolEnv) and env.stop == task.stop and env.tools == task.prompt_tools() and env.observation_wrap == task.observation_wrap
    assert (task.prompt_tools() is None) == (fmt == "tags")
    assert asyncio.run(env.initial_observation()) == task.render_prompt(task.train_problem(0))


def test_a_group_builder_that_returns_something_else_is_one_clear_error() -> None:
    class Broken:
        def group_builder(self, problem):
            return [problem]

    with pytest.raises(TypeError, match="^Broken.group_builder returned a list, not a policyflow.agent.env.EnvGroupBuilder"):
        group_builder(Broken(), Problem("p", "q", "a"))


@pytest.mark.parametrize("two_lookups", [False, True])
def test_hermes_sft_rows_are_the_rows_rl_trains_tools_included(tmp_path, two_lookups: bool) -> None:
    """With the Hermes format and a chat template that renders tools: the SFT row's prompt ids
    (`rollout.encode_prompts`, which sft.warm_start uses) are the RL episode's first-call prompt
    ids, tool schemas included; prompt fitting counts exactly that many tokens; and the whole
    demonstration (`<tool_call>` turns ending with EOS, results as tool-role messages) gives the
    training rows RL gives for the same turns, through the real env and search tool."""
    task = SearchQATask(seed=0, num_entities=30, num_eval_entities=5, num_eval=4, tool_format="hermes", corpus_dir=tmp_path)
    problem = next(p for p in (task.train_problem(k) for k in range(50)) if p.columns["hops"] == (2 if two_lookups else 1))
    tok = build_char_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    demo = task.sft_turns(problem)
    assert demo[0][1].startswith('<tool_call>{"name": "search", "arguments": {"query": "') and demo[-1] == ("gen", f"<answer>{problem.answer}</answer>")

    sft_prompt = encode_prompts(tok, task, [problem], True)[0]
    engine = RecordingEngine(tok, [text for kind, text in demo if kind == "gen"], eos=True)
    runner = EpisodeRunner(engine, tok, SamplingParams(max_new_tokens=200), AgentConfig(max_turns=6, max_obs_tokens=64), chat_template=True)
    group, errors = asyncio.run(runner.run_group(group_builder(task, problem), 1, task_id="t"))
    [traj] = group.trajectories
    assert engine.prompts[0] == sft_prompt and '[tools]{"type": "function"' in tok.decode(sft_prompt)
    assert traj.status == "complete" and traj.num_tool_calls == len(demo) // 2 and traj.tools.errors == 0
    assert traj.reward_parts == pytest.approx({"correct": 1.0, "search_penalty": -0.1, "format": 0.1})

    cfg = load_config(None, ["task.name=search_qa", "task.search.tool_format=hermes", "model.chat_template=true"])
    fit = prompt_fit(PolicySpec.of(cfg), tok, 100_000, tools=task.prompt_tools())
    assert fit.count(task.render_prompt(problem)) == len(sft_prompt)

    rl_rows = [(ids, mask) for ids, mask, *_ in episode_rows(traj)]
    sft_rows = demonstration_rows(tok, sft_prompt, demo, True, full_context, 64, task.observation_wrap, task.stop)
    assert sft_rows == rl_rows
