"""Nothing the model writes can crash or stall a run (issue 17, class 5).

* Both tool-call parsers and every env's `step` take any text (and any JSON in a tool call:
  nested thousands deep, numbers of thousands of digits, NaN) and return a well-formed result,
  never an exception, in time linear in the text (property-based, with hypothesis).
* A tool runs off the event loop: a tool that blocks its thread without ever awaiting is still
  bounded by the pool's timeout, other coroutines keep running, and the stuck threads are
  bounded and counted.
* An observation is cut by characters before it is tokenized: the tokenizer never sees more
  than a bounded prefix of a huge tool result, and the ids are those of the whole text's cut.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyflow.agent.env import SingleTurnEnv, SingleTurnGroupBuilder, StepResult
from policyflow.agent.parse import FinalAnswer, Malformed, ParsedTurn, ToolCall, ToolCalls, parse_hermes, parse_tags, parse_turn
from policyflow.agent.tool_env import ToolEnv
from policyflow.model import build_char_tokenizer
from policyflow.tasks import ArithmeticTask, CountdownTask, JsonlTask
from policyflow.tasks.search_qa import SearchQATask
from policyflow.tokens import cut_observation, render_observation
from policyflow.tools import Tool, ToolPool, ToolStats
from policyflow.tools.search import SearchIndex, search_tool
from tests.conftest import eventually
from policyflow.types import Trajectory
from tests.envs_for_tests import ScriptedEnv

# Modest example counts: the suite runs on 2 shared cores. No deadline: the machine is noisy.
EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
FEW_EXAMPLES = settings(EXAMPLES, max_examples=60)
HANG_GUARD_S = 60.0  # only a guard against hangs: every assertion below is on values

TAGS = {"search": "query"}
TOOLS = ["search"]


# -- strategies: model text and the JSON inside tool calls ----------------------------------------

ODD_CHARS = st.sampled_from(["\x00", "\ud800", "\udfff", "\ufffd", "\u202e", "\U0001f600", "é", "\n", "\\", '"'])
ANY_CHAR = st.one_of(st.characters(exclude_categories=()), ODD_CHARS)
FRAGMENTS = st.sampled_from([
    "<search>", "</search>", "<answer>", "</answer>", "<state>", "</state>", "<tool_call>", "</tool_call>",
    "<info>", "</info>", "<tool_response>", "<", ">", "/", " ", "\n", "{", "}", "[", "]", ":", ",", '"',
    '{"name": "search", "arguments": ', '{"query": "Zorvia"}', '"name"', '"arguments"', "NaN", "Infinity", "1e999", "-0",
])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(ANY_CHAR, max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(ANY_CHAR, max_size=6), inner, max_size=4), max_leaves=16)


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a": ' * depth + "1" + "}" * depth


EXTREME_JSON = st.one_of(  # generated explicitly: random JSON never gets here
    st.builds(_nested, st.integers(1, 5000), st.sampled_from(["list", "dict"])),
    st.integers(1000, 20000).map(lambda n: "9" * n),
    st.integers(1000, 20000).map(lambda n: "-1" + "0" * n + ".5e3"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", '"\\ud800"', '"\\u0000"', '"\\udfff\\ud800"']),
    st.integers(1, 200000).map(lambda n: json.dumps("x" * n)),
)
JSON_TEXT = st.one_of(JSON_VALUES.map(json.dumps), EXTREME_JSON, st.text(ANY_CHAR, max_size=40))
TOOL_CALL = st.one_of(
    JSON_TEXT.map(lambda args: f'<tool_call>{{"name": "search", "arguments": {args}}}</tool_call>'),
    JSON_TEXT.map(lambda body: f"<tool_call>{body}</tool_call>"),
    JSON_VALUES.map(lambda v: f'<tool_call>{{"name": {json.dumps(v)}, "arguments": {{"query": "q"}}}}</tool_call>'),
)
def _model_text(max_repeats: int) -> st.SearchStrategy[str]:
    """Model turns: any characters, tag and JSON fragments, tool calls, one tag repeated up to `max_repeats` times."""
    return st.one_of(
        st.text(ANY_CHAR, max_size=200),
        st.lists(st.one_of(FRAGMENTS, st.text(ANY_CHAR, max_size=12), JSON_VALUES.map(json.dumps)), max_size=30).map("".join),
        st.lists(st.one_of(TOOL_CALL, FRAGMENTS, st.just("\n")), min_size=1, max_size=4).map("".join),
        st.builds(lambda tag, n: f"<{tag}>" * n, st.sampled_from(["state", "search", "answer", "tool_call"]), st.integers(1, max_repeats)),
    )


MODEL_TEXT = _model_text(20_000)


# -- well-formed results ----------------------------------------------------------------------------


def _assert_well_formed(parsed: ParsedTurn, tools) -> None:
    """A parse result as every caller relies on it: typed fields, calls to known tools with
    standard-JSON arguments that can be logged and sent between processes."""
    assert isinstance(parsed, ParsedTurn)
    assert parsed.state is None or isinstance(parsed.state, str)
    action = parsed.action
    if isinstance(action, ToolCalls):
        assert isinstance(action.calls, tuple) and action.calls
        for call in action.calls:
            assert isinstance(call, ToolCall) and call.name in tools and isinstance(call.arguments, dict)
            assert all(isinstance(key, str) for key in call.arguments)
            json.dumps(call.arguments, allow_nan=False, ensure_ascii=False).encode()  # finite numbers, text strings, not too deep
        pickle.loads(pickle.dumps(action))
    elif isinstance(action, FinalAnswer):
        assert isinstance(action.text, str)
    else:
        assert isinstance(action, Malformed) and isinstance(action.reason, str) and action.reason


def _assert_step(result: StepResult) -> None:
    """A step result as the episode runner, the logger and the process runtime read it."""
    assert isinstance(result, StepResult) and isinstance(result.done, bool)
    assert isinstance(result.reward, float) and math.isfinite(result.reward)
    assert all(isinstance(k, str) and isinstance(v, float) and math.isfinite(v) for k, v in result.reward_parts.items())
    obs = result.observation
    assert obs is None or isinstance(obs, str) or (isinstance(obs, tuple) and obs and all(isinstance(o, str) for o in obs))
    stats = result.tools
    assert isinstance(stats, ToolStats) and 0 <= stats.timeouts <= stats.errors and stats.calls >= 0 and stats.seconds >= 0
    assert isinstance(result.info, dict)
    json.dumps(result.info, default=str)  # samples.jsonl
    pickle.loads(pickle.dumps(result))  # the process runtime sends episodes between processes


# -- the parsers ------------------------------------------------------------------------------------


@EXAMPLES
@given(MODEL_TEXT)
def test_the_tag_parser_reads_any_text(text: str) -> None:
    _assert_well_formed(parse_tags(text, TAGS), TAGS)


@EXAMPLES
@given(MODEL_TEXT)
def test_the_hermes_parser_reads_any_text(text: str) -> None:
    _assert_well_formed(parse_hermes(text, TOOLS), TOOLS)


@EXAMPLES
@given(JSON_TEXT)
def test_the_hermes_parser_reads_any_json_in_a_tool_call(arguments: str) -> None:
    for text in (f'<tool_call>{{"name": "search", "arguments": {arguments}}}</tool_call>', f"<tool_call>{arguments}</tool_call>"):
        _assert_well_formed(parse_hermes(text, TOOLS), TOOLS)


@pytest.mark.parametrize(
    "arguments, reason",
    [
        ('{"query": ' + "[" * 5000 + "]" * 5000 + "}", "tool call JSON is nested deeper than 32 levels"),  # RecursionError before
        ('{"query": ' + "[" * 900 + "]" * 900 + "}", "tool call JSON is nested deeper than 32 levels"),  # parsed, then unpicklable
        ('{"query": ' + "9" * 5000 + "}", "tool call JSON has a number that is not a finite JSON number"),  # int digit limit before
        ('{"query": NaN}', "tool call JSON has a number that is not a finite JSON number (NaN is not a JSON number)"),
        ('{"query": 1e999}', "tool call JSON has a number that is not a finite JSON number (1e999 overflows a float)"),
        ('{"query": "a\\ud800"}', "tool call JSON holds a lone surrogate"),  # a tool echoing it made the tokenizer raise
        ('{"\\udfff": "q"}', "tool call JSON holds a lone surrogate"),
    ],
)
def test_json_the_run_cannot_carry_is_a_malformed_turn(arguments: str, reason: str) -> None:
    parsed = parse_hermes(f'<tool_call>{{"name": "search", "arguments": {arguments}}}</tool_call>', TOOLS)
    assert isinstance(parsed.action, Malformed) and parsed.action.reason.startswith(reason)


def test_an_unknown_tool_name_is_quoted_clipped() -> None:
    name = "x" * 100_000
    reason = parse_hermes(f'<tool_call>{{"name": "{name}"}}</tool_call>', TOOLS).action.reason
    assert reason.startswith("unknown tool 'xxx") and "...; available: ['search']" in reason and len(reason) < 200


def test_parsing_takes_time_linear_in_the_text() -> None:
    """2 MB of unclosed `<state>` tags: searching for each one's close from every opening took
    quadratic time (hours for this text). Run in a child process so a hang can be ended."""
    code = (
        "from policyflow.agent.parse import parse_hermes, parse_tags\n"
        "text = '<state>' * 300_000 + '</state><answer>x</answer>'\n"
        "print(parse_tags(text, {'search': 'query'}).action, parse_hermes(text, ['search']).action)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=Path(__file__).parents[1])
    assert done.stdout.split() == ["FinalAnswer(text='x')", "FinalAnswer(text='x')"], done.stderr[-2000:]


# -- every env's step ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def search_tasks(tmp_path_factory) -> dict[str, SearchQATask]:
    folder = tmp_path_factory.mktemp("search_qa")
    return {fmt: SearchQATask(num_entities=30, num_eval_entities=5, num_eval=4, corpus_dir=folder, tool_format=fmt) for fmt in ("tags", "hermes")}


def _search_step(task: SearchQATask, text: str, problem=None) -> tuple[ToolEnv, StepResult]:
    problem = problem or task.eval_problems()[0]
    env = ToolEnv(problem, task.render_prompt(problem), task.tool_setup())
    return env, asyncio.run(env.step(text))


@FEW_EXAMPLES
@given(st.one_of(MODEL_TEXT, TOOL_CALL), st.sampled_from(["tags", "hermes"]))
def test_the_search_env_steps_on_any_text(search_tasks, text: str, fmt: str) -> None:
    env, result = _search_step(search_tasks[fmt], text)
    _assert_step(result)
    assert result.done or result.observation  # an episode that goes on always shows the model something
    malformed = isinstance(parse_turn(fmt, text, env.setup.tools).action, Malformed)
    assert env.malformed == int(malformed) and result.tools.errors_by_kind.get("malformed", 0) == int(malformed)


@pytest.mark.parametrize("arguments", ["[" * 5000 + "]" * 5000, "9" * 5000])
def test_the_issues_tool_calls_are_counted_error_observations(search_tasks, arguments: str) -> None:
    """Issue 17's examples: JSON nested 5000 deep, a 5000-digit number (both raised out of step)."""
    env, result = _search_step(search_tasks["hermes"], f'<tool_call>{{"name": "search", "arguments": {{"query": {arguments}}}}}</tool_call>')
    _assert_step(result)
    assert not result.done and result.observation.startswith("error: tool call JSON")
    assert env.malformed == 1 and result.tools.errors_by_kind == {"malformed": 1} and result.tools.calls == 0


@pytest.mark.parametrize("answer", ["²", "9" * 5000])
def test_an_answer_the_tasks_check_cannot_read_is_wrong(search_tasks, answer: str) -> None:
    """`'²'.isdigit()` holds but `int('²')` raises, as does int() of 5000 digits: the answer check
    raised out of step. Whatever the task's check does with it, the env answers a wrong answer;
    a check that raises is contained too."""
    task = search_tasks["tags"]
    numeric = next(p for p in task.eval_problems() if p.answer.isdigit())
    env, result = _search_step(task, f"<answer>{answer}</answer>", numeric)
    _assert_step(result)
    assert result.done and result.reward_parts["correct"] == 0.0

    def raising(problem, text):
        raise ValueError(f"invalid literal for int() with base 10: {text!r}")

    env = ToolEnv(numeric, task.render_prompt(numeric), dataclasses.replace(task.tool_setup(), check=raising))
    result = asyncio.run(env.step(f"<answer>{answer}</answer>"))
    _assert_step(result)
    assert result.done and result.reward_parts["correct"] == 0.0 and result.info["answer_error"].startswith("ValueError: invalid literal")


@EXAMPLES
@given(MODEL_TEXT)
def test_single_turn_and_scripted_envs_step_on_any_text(text: str) -> None:
    for env in (SingleTurnEnv(ArithmeticTask(), ArithmeticTask().eval_problems()[0]), ScriptedEnv("p", turns=2)):
        _assert_step(asyncio.run(env.step(text)))


@pytest.fixture(scope="module")
def single_turn_tasks(tmp_path_factory) -> list:
    path = tmp_path_factory.mktemp("jsonl") / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(20)))
    return [ArithmeticTask(), CountdownTask(), JsonlTask(path, reward="exact"), JsonlTask(path, reward="numeric")]


@FEW_EXAMPLES
@given(st.lists(MODEL_TEXT, min_size=1, max_size=3))  # tags repeated 20,000 times: `tasks.base.last_tagged` is one pass
def test_single_turn_scoring_takes_any_completions(single_turn_tasks, completions: list[str]) -> None:
    for task in single_turn_tasks:
        builder = SingleTurnGroupBuilder(task, task.eval_problems()[0])
        trajectories = [Trajectory(id=str(j), task_id="t", segments=[], calls=[], completion_text=c) for j, c in enumerate(completions)]
        score = asyncio.run(builder.score_group(trajectories))
        assert len(score.rewards) == len(score.parts) == len(completions) and 0 <= score.errors <= len(completions)
        assert all(isinstance(r, float) and math.isfinite(r) for r in score.rewards)


class _PickyTask(ArithmeticTask):
    """Raises on completions holding "!" (a user task with a parser that did not foresee it)."""

    def score(self, problems, completions):
        if any("!" in c for c in completions):
            raise ValueError("cannot parse '!'")
        return super().score(problems, completions)


def test_a_completion_the_task_cannot_score_gets_zero_and_is_counted() -> None:
    task = _PickyTask()
    problem = task.eval_problems()[0]
    trajectories = [Trajectory(id=str(j), task_id="t", segments=[], calls=[], completion_text=c) for j, c in enumerate([problem.answer, "!", "1"])]
    score = asyncio.run(SingleTurnGroupBuilder(task, problem).score_group(trajectories))
    assert score.rewards == [1.0, 0.0, 0.0] and score.errors == 1 and [p["correct"] for p in score.parts] == [1.0, 0.0, 0.0]


# -- tools run off the event loop ------------------------------------------------------------------

TEXT_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def test_a_tool_that_blocks_its_thread_times_out_while_the_loop_runs_on() -> None:
    """An `async def` tool that blocks (like `time.sleep`) without ever awaiting, timeout 0.2 s: the
    caller gets a timeout observation while another coroutine on the loop keeps ticking; the stuck
    threads keep their slots (2), are counted, and when every slot is stuck a call fails at once."""
    release = threading.Event()

    async def blocking(text: str) -> str:
        release.wait(timeout=HANG_GUARD_S)  # blocks the thread it runs on
        return text

    async def echo(text: str) -> str:
        return text

    pool = ToolPool([Tool("block", "", TEXT_SCHEMA, blocking), Tool("echo", "", TEXT_SCHEMA, echo)], max_concurrency=2, timeout_s=0.2)

    async def run():
        ticks = [0]

        async def ticker() -> None:
            while True:
                await asyncio.sleep(0.005)
                ticks[0] += 1

        other = asyncio.create_task(ticker())
        first = await pool.call("block", {"text": "x"})
        ticks_while_blocked = ticks[0]
        echoed = await pool.call("echo", {"text": "y"})  # one slot is stuck, the other serves
        second = await pool.call("block", {"text": "z"})
        refused = await pool.call("echo", {"text": "w"})  # both slots are stuck: refused at once
        other.cancel()
        return first, ticks_while_blocked, echoed, second, refused, pool.overrunning

    try:
        first, ticks, echoed, second, refused, overrunning = asyncio.run(run())
    finally:
        release.set()
    assert first.error == second.error == "timeout" and first.text == "error: block timed out after 0.2 s"
    assert ticks >= 5  # the loop went on: about 40 ticks fit in 0.2 s; before, none did
    assert echoed.ok and echoed.text == "y"
    assert refused.error == "timeout" and "all 2 tool slots are held by calls still running past their 0.2 s timeout" in refused.text
    assert overrunning == 2 and pool.stats.timeouts == 3
    assert eventually(lambda: pool.threads == 0) and pool.overrunning == 0  # released: the threads end and are uncounted
    assert asyncio.run(pool.call("echo", {"text": "v"})).text == "v"


def test_the_search_tool_runs_off_the_event_loop(search_tasks) -> None:
    """The search runs in a thread other than the loop's, so a slow lookup cannot stall decoding."""
    index = SearchIndex(search_tasks["tags"].corpus_path(), search_tasks["tags"].corpus_dir / "bm25")
    seen: list[threading.Thread] = []
    search = index.search
    index.search = lambda query, k: seen.append(threading.current_thread()) or search(query, k)
    pool = ToolPool([search_tool(index)], timeout_s=30)

    async def run():
        return threading.current_thread(), await pool.call("search", {"query": search_tasks["tags"].entities[0].name})

    loop_thread, result = asyncio.run(run())
    assert result.ok and result.text != "no results" and seen and seen[0] is not loop_thread




# -- observations are cut by characters before they are tokenized ------------------------------------


class _CountingTokenizer:
    """A tokenizer that records the length of every text it is asked to tokenize."""

    def __init__(self, inner) -> None:
        self.inner, self.lengths = inner, []

    def __call__(self, text: str, **kw):
        self.lengths.append(len(text))
        return self.inner(text, **kw)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_a_huge_observation_is_never_tokenized_whole() -> None:
    """A 2 MB tool result cut to 64 tokens: the tokenizer sees the same bounded prefix as for a
    200 kB one (before: the whole text), and the ids are those of the whole text's cut."""
    tokenizer = build_char_tokenizer()
    seen = {}
    for size in (200_000, 2_000_000):
        text = ("Zorvia: capital Quelm, population 48. " * (size // 38 + 1))[:size]
        counting = _CountingTokenizer(tokenizer)
        ids, shown = render_observation(counting, text, False, 64, wrap=("<info>", "</info>"))
        assert ids == tokenizer(f"<info>{text[:64]}</info>", add_special_tokens=False)["input_ids"] and shown == f"<info>{text[:64]}</info>"
        seen[size] = max(counting.lengths)
    assert seen[200_000] == seen[2_000_000] < 20_000


@EXAMPLES
@given(st.text(ANY_CHAR, max_size=300), st.one_of(st.none(), st.integers(0, 80)))
def test_any_observation_text_is_cut_without_raising(text: str, max_tokens: int | None) -> None:
    """Lone surrogates (a tool echoing model-written JSON) made the tokenizer raise; they show as "?"."""
    tokenizer = build_char_tokenizer()
    ids, shown = cut_observation(tokenizer, text, max_tokens)
    assert all(isinstance(i, int) for i in ids) and (max_tokens is None or len(ids) <= max_tokens)
    shown.encode("utf-8")
    ids, shown = render_observation(tokenizer, (text, text + "\ud800"), False, max_tokens, wrap=("<info>", "</info>"))
    assert shown.startswith("<info>") and shown.endswith("</info>") and shown.encode("utf-8")


def test_a_lone_surrogate_in_an_observation_shows_as_a_question_mark() -> None:
    tokenizer = build_char_tokenizer()
    assert cut_observation(tokenizer, "no results for a\ud800b", 64) == (tokenizer("no results for a?b", add_special_tokens=False)["input_ids"], "no results for a?b")


@pytest.fixture(scope="module")
def tokenizers() -> list:
    """The char tokenizer, a byte-level BPE trained here (multi-byte pieces, merges across
    letters) and a word tokenizer that drops white space (its prefix must grow)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["zorvia", "capital", "population", "kuvi", "the", "of", "aaaa", "abab", "é", "日本語", "😀", "naïve"]
    corpus = [" ".join(rng.choice(words) for _ in range(30)) + " " + "".join(rng.choice("ab") for _ in range(40)) for _ in range(300)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    word = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word.decoder = decoders.WordPiece()
    return [build_char_tokenizer(), PreTrainedTokenizerFast(tokenizer_object=bpe), PreTrainedTokenizerFast(tokenizer_object=word, unk_token="[UNK]")]


OBS_TEXT = st.lists(
    st.one_of(st.sampled_from(["zorvia", " ", "aaaa", "abab", "é", "日本語", "😀", "e\u0301", "\n", "capital of kuvi"]), st.text(ANY_CHAR.filter(lambda c: not 0xD800 <= ord(c) <= 0xDFFF), max_size=6)),
    min_size=1, max_size=40,
).map("".join)


@EXAMPLES
@given(OBS_TEXT, st.integers(1, 60), st.integers(1, 400), st.integers(0, 2000))
def test_cutting_by_characters_first_keeps_the_same_ids(tokenizers, piece: str, max_tokens: int, repeats: int, spaces: int) -> None:
    """For ordinary texts (multi-byte characters included), long enough that only a prefix is
    tokenized, the ids and text are exactly those of cutting the whole text's tokens."""
    text = " " * spaces + piece * repeats
    for tokenizer in tokenizers:
        full = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        expected = (full, text) if len(full) <= max_tokens else (full[:max_tokens], tokenizer.decode(full[:max_tokens]))
        assert cut_observation(tokenizer, text, max_tokens) == expected


def test_code_the_model_writes_as_a_lone_surrogate_is_an_error_observation() -> None:
    """JSON accepts "\\ud800"; such code cannot be written as UTF-8, so it never starts a sandbox."""
    from policyflow.tools.python_tool import CodeSettings, code_tool

    pool = ToolPool([code_tool(CodeSettings(timeout_s=5), name="python")], timeout_s=15)
    result = asyncio.run(pool.call("python", {"code": 'print("\ud800")'}))
    assert not result.ok and "not valid UTF-8" in result.text and pool.stats.errors == 1
