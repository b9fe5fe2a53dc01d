"""Episode rules: tool statistics per step (every runtime), observations cut in tokens by the
runner and identically in SFT demonstrations, what a per-turn cut means for an episode's status,
and parallel Hermes tool calls rendered as the chat template renders several tool messages."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from policyflow.agent.context import context_policy
from policyflow.agent.env import SingleTurnGroupBuilder
from policyflow.agent.episode import EpisodeRunner
from policyflow.config import AgentConfig
from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.model import build_char_tokenizer, build_tiny
from policyflow.rollout import rollout_metrics
from policyflow.tasks import make_task
from policyflow.tasks.base import Problem
from policyflow.tasks.search_qa import SearchQATask
from policyflow.tokens import episode_rows, render_observation, render_prompt
from policyflow.types import Sample
from tests.envs_for_tests import ScriptedBuilder

PROBLEM = Problem("p0", "What is 12+30? ", "42")


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=0)
    return model.eval(), tokenizer


def _runner(tiny, max_new_tokens=5, **agent) -> EpisodeRunner:
    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, generator=torch.Generator().manual_seed(0))
    return EpisodeRunner(engine, tokenizer, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, ignore_eos=True), AgentConfig(**agent))


def _group(runner: EpisodeRunner, builder, n: int):
    return asyncio.run(runner.run_group(builder, n, task_id="t"))[0]


# -- 1. tool statistics ---------------------------------------------------------------------------


def test_step_metrics_sum_the_tool_counts_each_episode_carries(tiny) -> None:
    """Each scripted step reports 1 call (0.25 s); the second one failed by timeout. Two 3-turn
    episodes make 2 steps with calls each: 2 calls, 1 error, 1 timeout, 0.5 s per episode."""
    group = _group(_runner(tiny), ScriptedBuilder(PROBLEM, turns=3), 2)
    for t in group.trajectories:
        assert (t.tools.calls, t.tools.errors, t.tools.timeouts, t.tools.seconds) == (2, 1, 1, 0.5)
    m = rollout_metrics([group])
    assert m["agent/tool_calls_mean"] == 2.0 and m["agent/tool_errors"] == 2.0 and m["agent/tool_timeouts"] == 2.0
    assert m["perf/tool_seconds"] == 1.0  # the tools' own time, not the time spent in env.step
    assert m["agent/turns_mean"] == 3.0 and m["agent/context_tokens_max"] == max(t.context_tokens_max for t in group.trajectories)


def test_tool_metrics_reach_metrics_jsonl_from_worker_processes(small_config) -> None:
    """Scripted searches with the real tool in rollout-worker processes: every step's line holds the
    issue's agent metrics, counted from the episodes the step trained (every answered scripted
    episode made turns − 1 searches, each sleeping search_latency_s)."""
    from benchmarks.scripted_search import ScriptedSearchWorker
    from policyflow import coordinator

    latency = 0.01
    cfg = small_config(
        "task.name=search_qa", "task.search.num_entities=30", "task.search.num_eval_entities=5", "task.num_eval=4",
        f"task.search.search_latency_s={latency}", "agent.max_turns=3", "agent.max_obs_tokens=48", "sampling.max_new_tokens=6",
        "pipeline.mode=one_step_off", "pipeline.runtime=process", "sft.max_steps=0", "eval.every=0", "train.steps=2",
        "train.skip_zero_variance=false",
    )
    asyncio.run(coordinator.run_rl(cfg, log=lambda *_: None, worker_cls=ScriptedSearchWorker))
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "step" in m and m["step"] > 0]
    assert len(steps) == 2
    episodes = cfg.train.prompts_per_step * cfg.train.group_size
    for m in steps:
        assert {"agent/turns_mean", "agent/tool_calls_mean", "agent/tool_errors", "agent/tool_timeouts", "agent/context_tokens_max", "perf/tool_seconds"} <= m.keys()
        assert m["agent/tool_calls_mean"] == pytest.approx(m["agent/turns_mean"] - 1) and m["agent/tool_calls_mean"] > 0
        assert m["agent/tool_errors"] == 0 and m["agent/tool_timeouts"] == 0
        assert m["perf/tool_seconds"] >= latency * m["agent/tool_calls_mean"] * episodes  # each search slept at least that long
        assert m["rollout/truncated_fraction"] == 0.0  # answered on a turn cut at max_new_tokens: complete (rule 3)


# -- 2. observations are cut in tokens, by the runner, and the same in SFT -----------------------------


class DemoEngine:
    """Stands in for AsyncEngine: answers each call with the next demonstration turn (char tokens, EOS after the last)."""

    version = 0
    max_positions = None

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer, self.turns = tokenizer, list(turns)

    async def generate(self, prompt_ids, params):
        text = self.turns.pop(0)
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + ((self.tokenizer.eos_token_id,) if not self.turns else ())
        return Sample(tuple(prompt_ids), ids, (-0.5,) * len(ids), (0,) * len(ids), "stop", text)


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _play_search(task: SearchQATask, problem: Problem, turns: list[str], max_obs: int, context: str = "full"):
    """The one episode of `turns` (scripted model turns) on the real runner, env and search tool (char tokens)."""
    tok = build_char_tokenizer()
    runner = EpisodeRunner(DemoEngine(tok, turns), tok, SamplingParams(max_new_tokens=64), AgentConfig(max_turns=6, max_obs_tokens=max_obs), context=context_policy(context))
    group, _ = asyncio.run(runner.run_group(task.group_builder(problem), 1, task_id="t"))
    return tok, group.trajectories[0]


def test_a_cut_observation_keeps_its_wrapper_whole(tmp_path) -> None:
    """Tag format, agent.max_obs_tokens below both observations (an error, then a passage): each obs
    segment is exactly the ids of `<info>`, the first max_obs content tokens, and the ids of
    `</info>` (the old rule cut the wrapped text, so `</info>` was lost); its text says the same."""
    task = SearchQATask(seed=0, num_entities=30, num_eval_entities=5, num_eval=4, corpus_dir=tmp_path)
    problem = next(p for p in (task.train_problem(k) for k in range(50)) if p.columns["hops"] == 1)
    place = task.entity(problem.columns["entities"][0])
    contents = ["error: no action; write <search> or <answer>", f"{place.name}: {place.passage()['text']}"]
    max_obs = 12
    assert all(len(c) > max_obs for c in contents)  # the cut matters
    tok, traj = _play_search(task, problem, ["hmm", f"<search>{place.name}</search>", f"<answer>{problem.answer}</answer>"], max_obs)
    assert traj.status == "complete" and traj.reward_parts["correct"] == 1.0 and traj.tools.errors == 1
    obs = [s for s in traj.segments if s.kind == "obs"]
    assert [list(s.token_ids) for s in obs] == [_ids(tok, "<info>") + _ids(tok, c)[:max_obs] + _ids(tok, "</info>") for c in contents]
    assert [s.text for s in obs] == [f"<info>{c[:max_obs]}</info>" for c in contents]  # characters = tokens here


def test_wrapped_pieces_are_tokenized_on_their_own_and_chat_models_ignore_the_wrap() -> None:
    """With word tokens, max_tokens bounds the content only: 2 words, plus the wrapper's own tokens
    around each parallel result; a chat template keeps its tool-role markers whatever the wrap."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "alpha", "beta", "gamma", "delta", "<info>", "</info>", "\n"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="removed")
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
    wrap = ("<info>", "</info>")
    ids, text = render_observation(tok, ("alpha beta gamma", "delta"), False, max_tokens=2, wrap=wrap)
    assert ids == [5, 1, 2, 6, 7, 5, 4, 6] and text.split() == ["<info>alpha", "beta</info>", "<info>delta</info>"]
    chat = build_char_tokenizer()
    chat.chat_template = GROUPING
    assert render_observation(chat, "result", True, 3, wrap=wrap) == render_observation(chat, "result", True, 3)


def test_search_env_errors_fit_the_demo_observation_budget(tmp_path) -> None:
    """Every malformed tag-format turn is answered with an error whole within configs/search.yaml's agent.max_obs_tokens."""
    from policyflow.config import load_config

    budget = load_config("configs/search.yaml").agent.max_obs_tokens
    task = SearchQATask(seed=0, num_entities=30, num_eval_entities=5, num_eval=4, corpus_dir=tmp_path)
    [env] = asyncio.run(task.group_builder(task.train_problem(0)).make_envs(1))
    turns = ["hmm", "<search>a</search><search>b</search><answer>c</answer>", "<search>a", "<search> </search>", "<state>x <answer>1</answer>"]
    errors = [asyncio.run(env.step(turn)).observation for turn in turns]
    assert all(e.startswith("error: ") for e in errors) and len(set(errors)) == len(turns)
    tok = build_char_tokenizer()
    assert max(len(_ids(tok, e)) for e in errors) <= budget


@pytest.mark.parametrize("context", ["full", "mem1"])
def test_sft_demonstration_rows_are_the_rows_rl_trains_with_observations_cut(tmp_path, context) -> None:
    """A two-lookup demonstration played by the episode runner through the real env and search tool,
    with agent.max_obs_tokens below the observations' length: the runner cuts each observation's
    content to that many tokens inside a whole `<info>`…`</info>`, and `demonstration_rows` (with
    the task's observation_wrap) gives exactly the same training rows (ids and masks)."""
    from policyflow.sft import demonstration_rows

    task = SearchQATask(seed=0, num_entities=30, num_eval_entities=5, num_eval=4, corpus_dir=tmp_path)
    problem = next(p for p in (task.train_problem(k) for k in range(50)) if p.columns["hops"] == 2)
    demo = task.sft_turns(problem)
    max_obs = 20
    assert all(len(text) > max_obs for kind, text in demo if kind == "obs")  # the cut matters
    tok, traj = _play_search(task, problem, [text for kind, text in demo if kind == "gen"], max_obs, context)
    assert traj.status == "complete" and traj.reward_parts["correct"] == 1.0
    cut = [_ids(tok, "<info>") + _ids(tok, text)[:max_obs] + _ids(tok, "</info>") for kind, text in demo if kind == "obs"]
    assert [list(s.token_ids) for s in traj.segments if s.kind == "obs"] == cut
    rl = [(ids, mask) for ids, mask, _, _ in episode_rows(traj)]
    prompt = render_prompt(tok, task.render_prompt(problem), False)
    assert demonstration_rows(tok, prompt, demo, False, context_policy(context), max_obs, task.observation_wrap, task.stop) == rl
    assert demonstration_rows(tok, prompt, demo, False, context_policy(context), max_obs, stop=task.stop) != rl  # the wrap is part of the rows
    assert demonstration_rows(tok, prompt, demo, False, context_policy(context), max_obs, task.observation_wrap) != rl  # so is how turns end


def test_observations_are_cut_in_tokens_not_characters() -> None:
    """With a tokenizer whose tokens are words, max_tokens keeps words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "alpha", "beta", "gamma", "delta"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
    ids, text = render_observation(tok, "alpha beta gamma delta", False, max_tokens=2)
    assert ids == [1, 2] and text.split() == ["alpha", "beta"]


# -- 3. the per-turn limit cuts an action; only episode limits truncate --------------------------------


def test_an_episode_the_env_finishes_on_a_cut_turn_is_complete(tiny) -> None:
    """Every turn is cut at max_new_tokens (no EOS); the env judges the last one and finishes: complete."""
    group = _group(_runner(tiny), ScriptedBuilder(PROBLEM, turns=2), 2)
    for t in group.trajectories:
        assert t.finish_reason == "length" and t.status == "complete" and t.num_turns == 2


def test_a_turn_cut_by_max_total_tokens_truncates_the_episode(tiny) -> None:
    """The last call's room is below max_new_tokens (an episode limit): finishing on it is truncated."""
    _, tokenizer = tiny
    prompt = len(render_prompt(tokenizer, PROBLEM.prompt, False))
    second_call = prompt + 5 + len("[obs 1]")  # prompt, the first turn (5 tokens), its observation
    group = _group(_runner(tiny, max_total_tokens=second_call + 3), ScriptedBuilder(PROBLEM, turns=2), 2)
    for t in group.trajectories:
        assert [len(t.segments[c.produced].token_ids) for c in t.calls] == [5, 3]
        assert t.status == "truncated" and t.num_turns == 2 and t.reward == t.reward_parts["correct"]


def test_a_single_turn_completion_cut_at_max_new_tokens_is_truncated(tiny) -> None:
    """A single-turn task's one completion is its episode: the per-turn limit is the episode's (DAPO's truncated sample)."""
    task = make_task("arithmetic", seed=0)
    group = _group(_runner(tiny, max_new_tokens=3), SingleTurnGroupBuilder(task, task.train_problem(0)), 3)
    assert [(t.finish_reason, t.status) for t in group.trajectories] == [("length", "truncated")] * 3


# -- 4. parallel tool calls: one tool message per call ---------------------------------------------

# Consecutive tool messages share one user block, each in its own <tool_response> (as Qwen2.5's template does).
GROUPING = (
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}[user]{% endif %}"
    "<tool_response>{{ m.content }}</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<eos>\n{% endif %}"
    "{%- else %}[{{ m.role }}]{{ m.content }}<eos>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}[assistant]{% endif %}"
)


def test_several_observations_render_as_the_templates_tool_messages() -> None:
    tok = build_char_tokenizer()
    tok.chat_template = GROUPING
    prompt = render_prompt(tok, "2+2?", chat_template=True)
    call = '<tool_call>{"name": "search", "arguments": {"query": "a"}}</tool_call>'
    turn = tok(call + call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    obs, text = render_observation(tok, ("first result", "second"), chat_template=True, max_tokens=5)
    conversation = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": call + call},
                    {"role": "tool", "content": "first"}, {"role": "tool", "content": "secon"}]
    whole = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert prompt + turn + obs == whole and text == "first\nsecon"  # each result cut to 5 tokens on its own
    assert tok.decode(obs) == "\n[user]<tool_response>first</tool_response><tool_response>secon</tool_response><eos>\n[assistant]"
    plain, _ = render_observation(tok, ("ab", "cd"), chat_template=False)
    assert plain == tok("ab\ncd", add_special_tokens=False)["input_ids"]
