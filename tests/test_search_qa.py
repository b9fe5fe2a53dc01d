"""Synthetic search QA: determinism, disjoint held-out places, answer checks, and scripted search episodes."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest

from policyflow.agent.env import group_builder
from policyflow.agent.tool_env import ToolEnv
from policyflow.tasks import TaskError, make_task
from policyflow.tasks.search_qa import SearchQATask, make_entities
from policyflow.policy import PolicySpec


@pytest.fixture
def task(tmp_path) -> SearchQATask:
    return SearchQATask(seed=3, num_entities=60, num_eval_entities=12, num_eval=30, corpus_dir=tmp_path / "corpus")


def test_entities_and_questions_are_deterministic(task, tmp_path):
    again = SearchQATask(seed=3, num_entities=60, num_eval_entities=12, num_eval=30, corpus_dir=tmp_path / "other")
    assert again.entities == task.entities and again.eval_problems() == task.eval_problems()
    assert [task.train_problem(i) for i in range(20)] == [again.train_problem(i) for i in range(20)]
    assert make_entities(4, 60, 99) != task.entities
    names = [e.name for e in task.entities] + [e.capital for e in task.entities]
    assert len(set(names)) == len(names)
    assert all(10 <= e.pop <= 99 for e in task.entities)


def test_held_out_questions_use_only_held_out_places(task):
    held_out = {e.id for e in task.eval_entities}
    eval_ids = {i for p in task.eval_problems() for i in p.columns["entities"]}
    assert len({p.prompt for p in task.eval_problems()}) == 30  # distinct questions
    train_ids = {i for k in range(300) for i in task.train_problem(k).columns["entities"]}
    assert eval_ids <= held_out and not train_ids & held_out
    hops = [task.train_problem(k).columns["hops"] for k in range(300)]
    assert 0.4 < hops.count(2) / len(hops) < 0.6  # two_hop_fraction 0.5


def test_answers_are_the_facts(task):
    for k in range(50):
        p = task.train_problem(k)
        es = [task.entity(i) for i in p.columns["entities"]]
        if p.columns["hops"] == 2:
            assert p.prompt == f"pop of {es[0].name} + {es[1].name}?" and p.answer == str(es[0].pop + es[1].pop)
        elif p.prompt.startswith("capital"):
            assert p.prompt == f"capital of {es[0].name}?" and p.answer == es[0].capital
        else:
            assert p.prompt == f"pop of {es[0].name}?" and p.answer == str(es[0].pop)


def test_answer_check_and_score(task):
    name_q = next(p for p in (task.train_problem(k) for k in range(50)) if p.prompt.startswith("capital"))
    num_q = next(p for p in (task.train_problem(k) for k in range(50)) if p.columns["hops"] == 2)
    assert task.is_correct(name_q, f" {name_q.answer.upper()} ") and not task.is_correct(name_q, "Nope") and not task.is_correct(name_q, None)
    assert task.is_correct(num_q, "0" + num_q.answer) and not task.is_correct(num_q, num_q.answer + "1") and not task.is_correct(num_q, "x")
    score = task.score([name_q, num_q, num_q], [f"<answer>{name_q.answer}</answer>", "<answer>1</answer>", num_q.answer])
    assert score.correct == [True, False, False] and score.rewards == [1.0, 0.0, 0.0]


def test_corpus_file(task):
    path = task.corpus_path()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[5] == {"id": "e5", "title": task.entities[5].name, "text": f"capital {task.entities[5].capital}, pop {task.entities[5].pop}"}
    assert len(rows) == 60 and task.corpus_path() == path


def test_eval_splits_are_one_and_two_lookups(task):
    problems = task.eval_problems()
    assert all(task.eval_split(p) == ("one_lookup" if p.columns["hops"] == 1 else "two_lookups") for p in problems)
    assert {task.eval_split(p) for p in problems} == {"one_lookup", "two_lookups"}


def test_corpus_file_is_named_by_its_content(task, tmp_path):
    """Other entities (another seed, size or value range, or another passage format) get another
    file: a corpus cached by other settings or an older version is never read in its place."""
    other = SearchQATask(seed=1, num_entities=60, num_eval_entities=10, corpus_dir=task.corpus_dir)
    assert other.corpus_path() != task.corpus_path()
    assert other.corpus_path().read_text() != task.corpus_path().read_text()
    again = SearchQATask(seed=task.seed, num_entities=60, num_eval_entities=10, corpus_dir=task.corpus_dir)
    assert again.corpus_path() == task.corpus_path()


def test_bad_arguments():
    with pytest.raises(TaskError, match="num_eval_entities < num_entities"):
        SearchQATask(num_entities=10, num_eval_entities=10)
    with pytest.raises(TaskError, match="unknown tool_format 'xml'"):
        SearchQATask(tool_format="xml")
    assert isinstance(make_task("search_qa", seed=1, num_entities=20, num_eval_entities=4, num_eval=5), SearchQATask)
    with pytest.raises(TaskError, match="distinct held-out questions"):
        SearchQATask(num_entities=20, num_eval_entities=2, num_eval=50)  # 2 places give only 6 questions


def test_demo_search_fraction_answers_a_share_of_demonstrations_at_once(tmp_path):
    """With demo_search_fraction f, a deterministic share ~1 − f of demonstrations is one answer
    turn with no search (reward 1 + γ in the env, no penalty); the rest search as usual."""
    args = dict(seed=3, num_entities=60, num_eval_entities=12, num_eval=30, corpus_dir=tmp_path)
    half, never = SearchQATask(**args, demo_search_fraction=0.5), SearchQATask(**args, demo_search_fraction=0.0)
    problems = [half.train_problem(k) for k in range(400)]
    direct = [len(half.sft_turns(p)) == 1 for p in problems]
    assert 0.4 < sum(direct) / len(direct) < 0.6
    assert direct == [len(half.sft_turns(p)) == 1 for p in problems]  # the same problems every time
    assert all(never.sft_turns(p) == [("gen", f"<answer>{p.answer}</answer>")] for p in problems[:20])
    assert SearchQATask(**args).sft_turns(problems[0])[0][1].startswith("<search>")  # default 1.0: always search
    [env] = asyncio.run(group_builder(never, problems[0]).make_envs(1))
    _, [result] = asyncio.run(_play(env, [f"<answer>{problems[0].answer}</answer>"]))
    assert result.done and result.reward_parts == {"correct": 1.0, "search_penalty": 0.0, "format": 0.1}
    with pytest.raises(TaskError, match="demo_search_fraction"):
        SearchQATask(**args, demo_search_fraction=1.5)


def test_warm_start_problems_are_about_places_of_their_own(task):
    """SFT demonstrations ask about fresh made-up places (none in the corpus, so none memorisable):
    deterministic per index, of both kinds, each demonstration's observations are its own places'
    passages and its answer their fact."""
    problems = [task.sft_problem(10_000_000 + k) for k in range(300)]
    assert problems == [task.sft_problem(10_000_000 + k) for k in range(300)]
    places = [p for problem in problems for p in task.places(problem)]
    corpus = {n for e in task.entities for n in (e.name, e.capital)}
    assert not {n for p in places for n in (p.name, p.capital)} & corpus
    assert len({p.name for p in places}) > 0.9 * len(places)  # fresh names, not a small reused set
    assert all(p.name != p.capital for p in places)
    assert {problem.columns["hops"] for problem in problems} == {1, 2}
    for problem in problems[:40]:
        first, *rest = task.places(problem)
        demo = task.sft_turns(problem)
        assert [text for kind, text in demo if kind == "obs"] == [f"{p.name}: capital {p.capital}, pop {p.pop}" for p in (first, *rest)]
        assert demo[-1] == ("gen", f"<answer>{problem.answer}</answer>")
        if problem.prompt.startswith("capital"):
            assert problem.answer == first.capital
        else:
            assert int(problem.answer) == sum(p.pop for p in (first, *rest))
    assert task.places(task.train_problem(0))[0] is task.entity(task.train_problem(0).columns["entities"][0])
    # a corpus holding every name a place can get leaves none for the demonstrations: a clear error, no endless loop
    from itertools import product

    from policyflow.tasks.search_qa import _CODAS, _ONSETS, _VOWELS
    task.corpus_names = {(a + b + c + d).capitalize() + e for a, b, c, d, e in product(_ONSETS, _VOWELS, _ONSETS, _VOWELS, _CODAS)}
    with pytest.raises(TaskError, match="lower task.search.num_entities"):
        task.sft_problem(0)


async def _play(env: ToolEnv, actions: list[str]) -> tuple[str, list]:
    prompt = await env.initial_observation()
    return prompt, [await env.step(a) for a in actions]


def test_demonstration_replays_through_the_env(task):
    """Playing a demonstration's actions in a real env gives exactly its observations, reward 1 − β + γ,
    and the whole two-lookup episode fits the tiny model's 256 positions."""
    for k in range(12):
        problem = task.train_problem(k)
        demo = task.sft_turns(problem)
        [env] = asyncio.run(group_builder(task, problem).make_envs(1))
        prompt, results = asyncio.run(_play(env, [text for kind, text in demo if kind == "gen"]))
        assert [r.observation for r in results[:-1]] == [text for kind, text in demo if kind == "obs"]
        assert [r.tools.calls for r in results] == [1] * problem.columns["hops"] + [0]
        last = results[-1]
        assert last.done and last.reward_parts == {"correct": 1.0, "search_penalty": -0.1, "format": 0.1}
        assert last.reward == pytest.approx(1.0)
        assert len(prompt) + sum(len(text) for _, text in demo) + len("<info></info>") * problem.columns["hops"] <= 256
    assert env.stop == ("</search>", "</answer>") and env.tools is None


def test_env_rewards_and_errors(task):
    problem = next(p for p in (task.train_problem(k) for k in range(50)) if p.columns["hops"] == 1)
    [guess, sloppy, wrong] = asyncio.run(group_builder(task, problem).make_envs(3))
    _, [r] = asyncio.run(_play(guess, [f"<answer>{problem.answer}</answer>"]))
    assert r.reward_parts == {"correct": 1.0, "search_penalty": 0.0, "format": 0.1} and r.reward == pytest.approx(1.1)
    _, results = asyncio.run(_play(sloppy, ["hmm", "<search>a</search><search>b</search>", f"<answer>{problem.answer}</answer>"]))
    assert results[0].observation == "error: no action; write <search> or <answer>"  # unwrapped: the runner adds <info>…</info>
    assert [r.tools.errors for r in results] == [1, 1, 0] and not results[0].done
    assert results[0].tools.errors_by_kind == {"malformed": 1} and results[0].tools.calls == 0
    assert results[-1].reward_parts == {"correct": 1.0, "search_penalty": 0.0, "format": 0.0}
    _, results = asyncio.run(_play(wrong, ["<search>zzzz</search>", "<state>none</state><answer>no idea</answer>"]))
    assert results[0].observation == "no results" and results[0].tools.errors == 0
    assert results[1].info["state"] == "none" and results[1].reward_parts == {"correct": 0.0, "search_penalty": 0.0, "format": 0.1}


def test_hermes_env(tmp_path):
    task = SearchQATask(seed=1, num_entities=20, num_eval_entities=4, num_eval=5, tool_format="hermes", corpus_dir=tmp_path)
    problem = task.train_problem(0)
    name = task.entity(problem.columns["entities"][0]).name
    [env] = asyncio.run(task.group_builder(problem).make_envs(1))
    assert env.stop == task.stop == () and env.tools == [t.schema() for t in task.tool_pool().tools.values()]
    assert pickle.loads(pickle.dumps(task))._setup is None and task._setup is not None
    call = json.dumps({"name": "search", "arguments": {"query": name}})
    _, [found, bad] = asyncio.run(_play(env, [f"<tool_call>{call}</tool_call>", '<tool_call>{"name": "web"}</tool_call>']))
    assert found.observation.startswith(f"{name}: capital ") and bad.tools.errors == 1 and "unknown tool 'web'" in bad.observation


def test_hermes_parallel_calls_run_at_once_and_answer_in_order(tmp_path):
    """Three <tool_call> blocks in one turn: all three searches run concurrently through the pool
    (all in flight at once), each is counted, and the observation holds one result per call, in order."""
    task = SearchQATask(seed=1, num_entities=20, num_eval_entities=4, num_eval=5, tool_format="hermes", corpus_dir=tmp_path, search_latency_s=0.05)
    names = [e.name for e in task.entities[:3]]
    [env] = asyncio.run(task.group_builder(task.train_problem(0)).make_envs(1))
    turn = "\n".join(f"<tool_call>{json.dumps({'name': 'search', 'arguments': {'query': n}})}</tool_call>" for n in names)
    _, [result] = asyncio.run(_play(env, [turn]))
    assert isinstance(result.observation, tuple) and [o.split(":")[0] for o in result.observation] == names
    assert (result.tools.calls, result.tools.errors) == (3, 0) and env.tool_calls == 3 and env.calls == {"search": 3}
    assert task.tool_pool().max_in_flight == 3  # the latency overlapped: the calls ran at once
    assert [c["arguments"]["query"] for c in result.info["calls"]] == names


def test_built_from_config(tmp_path):
    from policyflow.config import load_config
    from policyflow.session import build_task

    cfg = load_config(None, [
        "task.name=search_qa", "task.search.num_entities=30", "task.search.num_eval_entities=5", "task.num_eval=7",
        "task.search.search_penalty=0.3", "task.search.top_k=2", "agent.max_obs_tokens=64", f"run.output_dir={tmp_path}",
    ])
    task = build_task(PolicySpec.of(cfg))
    assert isinstance(task, SearchQATask) and len(task.entities) == 30 and len(task.eval_problems()) == 7
    assert task.settings.penalty == 0.3 and task.search_args == {"k": 2, "latency_s": 0.0}
    assert task.corpus_path().parent == tmp_path / "cache" / "search_qa"


class ScriptedEngine:
    """Stands in for AsyncEngine: answers each call with the next scripted turn (char tokens)."""

    version = 0
    max_positions = None

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer, self.turns, self.prompts = tokenizer, list(turns), []

    async def generate(self, prompt_ids, params):
        from policyflow.types import Sample

        self.prompts.append(self.tokenizer.decode(prompt_ids))
        text = self.turns.pop(0)
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return Sample(tuple(prompt_ids), ids, (-0.5,) * len(ids), (0,) * len(ids), "stop", text)


@pytest.mark.parametrize("context", ["full", "mem1"])
def test_two_lookup_episode_through_the_runner(task, context):
    """A scripted two-lookup episode on the real episode runner: under mem1 the last call sees the
    prompt, the turn holding `<state>` (the first population) and the latest observation only."""
    from policyflow.agent.context import context_policy
    from policyflow.agent.episode import EpisodeRunner
    from policyflow.config import AgentConfig
    from policyflow.engine import SamplingParams
    from policyflow.model import build_char_tokenizer

    problem = next(p for p in (task.train_problem(k) for k in range(50)) if p.columns["hops"] == 2)
    first, second = (task.entity(i) for i in problem.columns["entities"])
    demo = task.sft_turns(problem)
    tok = build_char_tokenizer()
    engine = ScriptedEngine(tok, [text for kind, text in demo if kind == "gen"])
    runner = EpisodeRunner(engine, tok, SamplingParams(max_new_tokens=64), AgentConfig(max_turns=6), context=context_policy(context))
    group, errors = asyncio.run(runner.run_group(task.group_builder(problem), 1, task_id="t"))
    [traj] = group.trajectories
    assert errors == 0 and traj.status == "complete" and traj.num_turns == 3 and traj.num_tool_calls == 2
    assert traj.reward == pytest.approx(1.0) and traj.reward_parts == pytest.approx({"correct": 1.0, "search_penalty": -0.1, "format": 0.1})
    assert [s.kind for s in traj.segments] == ["prompt", "gen", "obs", "gen", "obs", "gen"]
    last = engine.prompts[-1]
    shown = [text if kind == "gen" else f"<info>{text}</info>" for kind, text in demo]  # the runner wraps each observation
    if context == "full":
        assert [c.context for c in traj.calls] == [(0,), (0, 1, 2), (0, 1, 2, 3, 4)]
        assert last == task.render_prompt(problem) + "".join(shown[:-1])
    else:
        assert [c.context for c in traj.calls] == [(0,), (0, 1, 2), (0, 3, 4)]
        assert last == task.render_prompt(problem) + shown[2] + shown[3]
        assert f"<state>{first.pop}</state>" in last and f"pop {second.pop}" in last and first.name not in last.split("<state>")[1]


@pytest.mark.parametrize("context", ["full", "mem1"])
def test_demonstration_rows(task, context):
    """SFT rows of a two-lookup demonstration: one row of everything under full; under mem1 the
    third turn, whose context drops the first turn, starts a second row; observations are never
    trained, every gen token is trained once; EOS closes the answer."""
    from policyflow.agent.context import context_policy
    from policyflow.model import build_char_tokenizer
    from policyflow.sft import demonstration_rows

    tok = build_char_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    problem = next(p for p in (task.train_problem(k) for k in range(50)) if p.columns["hops"] == 2)
    prompt = task.render_prompt(problem)
    (_, g1), (_, o1), (_, g2), (_, o2), (_, g3) = turns = task.sft_turns(problem)
    rows = demonstration_rows(tok, enc(prompt), turns, False, context_policy(context), observation_wrap=task.observation_wrap, stop=task.stop)
    o1, o2 = (f"<info>{o}</info>" for o in (o1, o2))  # the observations as the model sees them
    eos = [tok.eos_token_id]
    if context == "full":
        assert rows == [(enc(prompt + g1 + o1 + g2 + o2 + g3) + eos, [0] * len(prompt) + [1] * len(g1) + [0] * len(o1) + [1] * len(g2) + [0] * len(o2) + [1] * (len(g3) + 1))]
    else:
        assert rows == [
            (enc(prompt + g1 + o1 + g2), [0] * len(prompt) + [1] * len(g1) + [0] * len(o1) + [1] * len(g2)),
            (enc(prompt + g2 + o2 + g3) + eos, [0] * len(prompt + g2 + o2) + [1] * (len(g3) + 1)),
        ]
    single = demonstration_rows(tok, enc("1+2="), [("gen", "3")], False)
    assert single == [(enc("1+2=3") + eos, [0, 0, 0, 0, 1, 1])]
    with pytest.raises(ValueError, match="'gen' or 'obs'"):
        demonstration_rows(tok, enc("?"), [("tool", "x")], False)


def test_an_answer_the_model_writes_never_raises(task):
    """A number too long for int() (over 4300 digits) or a digit int() refuses ('²') is wrong, not a crash."""
    problem = next(p for p in task.eval_problems() if p.answer.isdigit())
    for answer in ("9" * 6000, "²", "١٢", " ", "0" * 5000):
        assert task.is_correct(problem, answer) is False
    assert task.is_correct(problem, "00" + problem.answer) and task.is_correct(problem, f" {problem.answer} ")
