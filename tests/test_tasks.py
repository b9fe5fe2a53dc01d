"""Tasks: prompts, answer checks, rewards, seeded disjoint splits, jsonl loading, reward containment."""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from policyflow.tasks import TASKS, ArithmeticTask, CountdownTask, JsonlTask, Problem, TaskError, make_task
from policyflow.tasks.countdown import MAX_DEPTH, check_expression
from policyflow.tasks.reward_fn import call_reward_fn, last_number, load_reward_fn, parse_number

# ----------------------------------------------------------------------------- arithmetic


def test_arithmetic_prompt_completion_and_stop():
    task = ArithmeticTask()
    problem = task.train_problem(0)
    a, b = problem.columns["a"], problem.columns["b"]
    assert problem.prompt == f"{a}+{b}="
    assert task.render_prompt(problem) == problem.prompt
    assert task.sft_completion(problem) == str(a + b)
    assert task.stop == ()
    assert re.fullmatch(r"[0-9]{1,3}\+[0-9]{1,3}=", problem.prompt)


def test_arithmetic_rewards():
    task = ArithmeticTask()
    p = Problem(id="x", prompt="12+345=", answer="357", columns={"a": 12, "b": 345})
    completions = ["357", " 357\n", "357abc", "358", "", "0357", "abc", "-357", "35 7"]
    score = task.score([p] * len(completions), completions)
    assert score.rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert score.correct == [r == 1.0 for r in score.rewards]
    assert score.errors == 0
    assert [task.extract_answer(c) for c in [" 357 ", "x", "", "-4a"]] == ["357", None, None, "-4"]


def test_arithmetic_seeded_and_disjoint():
    a, b, c = ArithmeticTask(seed=0), ArithmeticTask(seed=0), ArithmeticTask(seed=1)
    assert [a.train_problem(i) for i in range(50)] == [b.train_problem(i) for i in range(50)]
    assert a.eval_problems() == b.eval_problems()
    assert [p.prompt for p in a.eval_problems()] != [p.prompt for p in c.eval_problems()]
    held = {frozenset((p.columns["a"], p.columns["b"])) for p in a.eval_problems()}
    assert len(held) == len(a.eval_problems()) == 200
    for i in range(3000):
        p = a.train_problem(i)
        assert frozenset((p.columns["a"], p.columns["b"])) not in held
        assert not a.is_held_out(p)
    assert all(a.is_held_out(p) for p in a.eval_problems())


def test_arithmetic_digit_range_and_small_space():
    task = ArithmeticTask(min_digits=2, max_digits=2, num_eval=20)
    for i in range(200):
        p = task.train_problem(i)
        assert 10 <= p.columns["a"] <= 99 and 10 <= p.columns["b"] <= 99
    # 1-digit sums: 55 unordered pairs, so 28 held out would leave fewer than half for training.
    task = ArithmeticTask(min_digits=1, max_digits=1, num_eval=27)
    held = {(min(p.columns.values()), max(p.columns.values())) for p in task.eval_problems()}
    train = {(min(p.columns.values()), max(p.columns.values())) for p in (task.train_problem(i) for i in range(500))}
    assert held.isdisjoint(train) and len(held | train) == 55
    with pytest.raises(TaskError, match="num_eval"):
        ArithmeticTask(min_digits=1, max_digits=1, num_eval=28)
    with pytest.raises(TaskError):
        ArithmeticTask(min_digits=3, max_digits=2)


def test_score_length_mismatch_is_an_error():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="2 problems but 1 completions"):
        task.score([task.train_problem(0), task.train_problem(1)], ["1"])


# ----------------------------------------------------------------------------- countdown


def test_countdown_reference_solutions_are_correct():
    task = CountdownTask()
    problems = [task.train_problem(i) for i in range(300)] + list(task.eval_problems())
    score = task.score(problems, [task.sft_completion(p) for p in problems])
    assert score.rewards == [1.0] * len(problems)
    assert all(score.correct)
    for p in problems[:20]:
        numbers, target = p.columns["numbers"], p.columns["target"]
        assert p.prompt == ",".join(map(str, numbers)) + f"->{target}:"
        assert len(numbers) == 3 and all(1 <= n <= 20 for n in numbers) and 1 <= target <= 100


def test_countdown_seeded_and_disjoint():
    a, b = CountdownTask(seed=3), CountdownTask(seed=3)
    assert [a.train_problem(i) for i in range(30)] == [b.train_problem(i) for i in range(30)]
    assert a.eval_problems() == b.eval_problems()
    held = {(tuple(sorted(p.columns["numbers"])), p.columns["target"]) for p in a.eval_problems()}
    assert len(held) == 200
    for i in range(1500):
        p = a.train_problem(i)
        assert (tuple(sorted(p.columns["numbers"])), p.columns["target"]) not in held
    assert a.eval_problems() != CountdownTask(seed=4).eval_problems()


def _problem(numbers: tuple[int, ...], target: int) -> Problem:
    return Problem(id="t", prompt="", answer="", columns={"numbers": numbers, "target": target})


@pytest.mark.parametrize(
    "completion, reward",
    [
        ("3*5+7", 1.0),
        ("7+5*3", 1.0),
        ("(3*5)+7", 1.0),
        (" 3 * 5 + 7 \n", 1.0),
        ("3*5+7=22", 1.0),  # cut at '='
        ("3×5+7", 1.0),  # unicode operator aliases
        ("3*5+7\nsome trailing text", 1.0),  # first line only
        ("3+5+7", 0.0),  # valid, wrong value
        ("__import__('os')", 0.0),
        ("__import__('os').system('true')", 0.0),
        ("2**99999", 0.0),
        ("3**5+7", 0.0),
        ("1/0", 0.0),
        ("7/(5-5)*3", 0.0),  # division by zero with the right numbers
        ("３*5+7", 0.0),  # fullwidth digit
        ("٣*5+7", 0.0),  # arabic-indic digit
        ("3*5+8", 0.0),  # 8 is not given
        ("3*5+7+7", 0.0),  # 7 reused
        ("3*5", 0.0),  # 7 unused (exactly-once rule)
        ("", 0.0),
        ("   ", 0.0),
        ("2.5*5+7", 0.0),
        ("-3*5+7+30", 0.0),  # unary minus
        ("3*-5+7", 0.0),
        ("+3*5+7", 0.0),
        ("(3*5+7", 0.0),
        ("3*5+7)", 0.0),
        ("3 5 7", 0.0),
        ("3" + " " * 100 + "*5+7", 0.0),  # over the length limit
        ("9" * 100_000, 0.0),
        ("(" * 10_000 + "3" + ")" * 10_000, 0.0),
    ],
)
def test_countdown_rewards_and_adversarial_strings(completion: str, reward: float):
    task = CountdownTask()
    score = task.score([_problem((3, 5, 7), 22)], [completion])
    assert score.rewards == [reward]
    assert score.correct == [reward == 1.0]


def test_countdown_parser_verdicts():
    numbers = (3, 5, 7)
    assert check_expression("3*5+7", numbers).value == Fraction(22)
    assert check_expression("7/2*2", (7, 2, 2)).value == Fraction(7)  # exact rationals
    assert check_expression("7/2", (7, 2)).value == Fraction(7, 2)
    assert "division by zero" in check_expression("3/(7-7)", (3, 7, 7)).error
    assert "unary" in check_expression("-3+5+7", numbers).error
    assert "not one of the given numbers" in check_expression("3*5+8", numbers).error
    assert "used 2 times" in check_expression("3*5+3", numbers).error
    assert "unused" in check_expression("3*5", numbers).error
    assert check_expression("3*5", numbers, require_all=False).value == Fraction(15)
    assert check_expression("3*3+7", (3, 3, 7)).value == Fraction(16)  # a number given twice
    assert "unexpected character" in check_expression("2.5", (2, 5), require_all=False).error
    assert "longer than 64" in check_expression("1+" * 40 + "1", (1,)).error
    assert "digits" in check_expression("1" * 50, (1,), max_chars=1000).error
    deep = "(" * (MAX_DEPTH + 1) + "3" + ")" * (MAX_DEPTH + 1)
    assert "nested deeper" in check_expression(deep, (3,), max_chars=10**6).error
    assert check_expression("(" * MAX_DEPTH + "3" + ")" * MAX_DEPTH, (3,)).value == 3
    very_deep = "(" * 100_000 + "3" + ")" * 100_000
    assert "nested deeper" in check_expression(very_deep, (3,), max_chars=10**6).error


def test_countdown_parser_never_raises_on_random_strings():
    rng = random.Random(0)
    alphabet = "0123456789+-*/()×÷ .,x=_'e"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        verdict = check_expression(text, (1, 2, 3, 4), require_all=False)
        assert (verdict.value is None) == (verdict.error is not None)


def test_countdown_format_reward_and_use_all_flag():
    task = CountdownTask(format_reward=0.1)
    p = _problem((3, 5, 7), 22)
    score = task.score([p] * 4, ["3*5+7", "3+5+7", "3+5+8", "1/0"])
    assert score.rewards == [1.0, 0.1, 0.0, 0.0]
    assert score.correct == [True, False, False, False]
    assert score.parts["format"] == [1.0, 1.0, 0.0, 0.0]
    loose = CountdownTask(require_all_numbers=False)
    assert loose.score([_problem((3, 5, 7, 9), 22)], ["3*5+7"]).rewards == [1.0]
    assert CountdownTask().score([_problem((3, 5, 7, 9), 22)], ["3*5+7"]).rewards == [0.0]
    with pytest.raises(TaskError):
        CountdownTask(format_reward=1.0)


# ----------------------------------------------------------------------------- jsonl


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _good_file(tmp_path: Path, n: int = 20) -> Path:
    rows = [json.dumps({"prompt": f"q{i}", "answer": str(i), "topic": "even" if i % 2 == 0 else "odd"}) for i in range(n)]
    return _write(tmp_path / "data.jsonl", rows)


def test_jsonl_good_file_split_and_exact_reward(tmp_path: Path):
    task = JsonlTask(_good_file(tmp_path))
    assert len(task.eval_problems()) == 2 and task.num_train == 18
    train_prompts = {task.train_problem(i).prompt for i in range(18)}
    assert len(train_prompts) == 18  # one epoch is a permutation
    assert train_prompts.isdisjoint(p.prompt for p in task.eval_problems())
    assert [task.train_problem(i) for i in range(40)] == [JsonlTask(_good_file(tmp_path)).train_problem(i) for i in range(40)]
    assert JsonlTask(_good_file(tmp_path), seed=1).eval_problems() != task.eval_problems()
    p = task.eval_problems()[0]
    assert p.id.startswith("data.jsonl:") and p.columns["topic"] in ("even", "odd")
    completions = [p.answer, f" {p.answer}\n", f"think... <answer>{p.answer}</answer>", p.answer + "0", ""]
    score = task.score([p] * 5, completions)
    assert score.rewards == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert score.correct == [True, True, True, False, False]
    assert score.errors == 0 and task.bad_rows == []


def test_jsonl_duplicate_prompts_never_straddle_the_split(tmp_path: Path):
    rows = [json.dumps({"prompt": f"q{i % 5}", "answer": "a"}) for i in range(30)]
    task = JsonlTask(_write(tmp_path / "d.jsonl", rows), eval_fraction=0.4)
    held = {p.prompt for p in task.eval_problems()}
    assert len(held) == 2 and len(task.eval_problems()) == 12
    assert all(task.train_problem(i).prompt not in held for i in range(50))


def test_jsonl_numeric_reward(tmp_path: Path):
    rows = [json.dumps({"prompt": "a", "answer": "1,234"}), json.dumps({"prompt": "b", "answer": 0.75}), json.dumps({"prompt": "c", "answer": "-2"})]
    task = JsonlTask(_write(tmp_path / "n.jsonl", rows), reward="numeric", eval_fraction=0.5)
    a = Problem("a", "a", "1,234", {"answer": "1,234"})
    b = Problem("b", "b", "0.75", {"answer": 0.75})
    c = Problem("c", "c", "-2", {"answer": "-2"})
    completions = ["so it is 1234.0", "3/4", "x = 5 - 7 = -2", "1235", "<answer>0.7500001</answer>", "none"]
    score = task.score([a, b, c, a, b, c], completions)
    assert score.rewards == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert score.correct == [r == 1.0 for r in score.rewards]
    assert parse_number(" 1e3 ") == 1000.0 and parse_number("12 apples") is None and parse_number("٣") is None
    assert last_number("1/0 then 7") == 7.0 and last_number("1e999") is None
    with pytest.raises(TaskError, match=r"n2.jsonl:2: answer 'seven' is not a number"):
        JsonlTask(_write(tmp_path / "n2.jsonl", [json.dumps({"prompt": "a", "answer": "1"}), json.dumps({"prompt": "b", "answer": "seven"})]), reward="numeric")


BAD_LINES = [
    json.dumps({"prompt": "q0", "answer": "0"}),  # 1 good
    "{not json",  # 2 invalid JSON
    json.dumps({"question": "q", "answer": "1"}),  # 3 missing prompt column
    "",  # 4 blank: not a row
    json.dumps({"prompt": 5, "answer": "1"}),  # 5 non-string prompt
    json.dumps({"prompt": "q5"}),  # 6 missing answer
    json.dumps(["prompt", "answer"]),  # 7 not an object
    json.dumps({"prompt": "q7", "answer": {"x": 1}}),  # 8 answer not a string/number
    json.dumps({"prompt": "q8", "answer": "8"}),  # 9 good
    json.dumps({"prompt": "q9", "answer": 9}),  # 10 good (numbers become text)
]


def test_jsonl_bad_rows_error_mode_names_file_and_line(tmp_path: Path):
    path = _write(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(TaskError, match=r"bad\.jsonl:2: invalid JSON") as info:
        JsonlTask(path)
    assert "on_bad_row='skip'" in str(info.value)
    with pytest.raises(TaskError, match=r"bad\.jsonl:2: missing the prompt column 'prompt'"):
        JsonlTask(_write(tmp_path / "bad.jsonl", [BAD_LINES[0], BAD_LINES[2]]))


def test_jsonl_bad_rows_skip_mode_logs_each_line(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = _write(tmp_path / "bad.jsonl", BAD_LINES)
    with caplog.at_level(logging.WARNING, logger="policyflow.tasks.jsonl"):
        task = JsonlTask(path, on_bad_row="skip", eval_fraction=0.3)
    assert task.bad_rows == [2, 3, 5, 6, 7, 8]
    for line in task.bad_rows:
        assert f"bad.jsonl:{line}: skipping malformed row" in caplog.text
    kept = {p.id for p in task.eval_problems()} | {task.train_problem(i).id for i in range(5)}
    assert kept == {"bad.jsonl:1", "bad.jsonl:9", "bad.jsonl:10"}
    assert {p.answer for p in task.eval_problems()} | {task.train_problem(i).answer for i in range(5)} == {"0", "8", "9"}


def test_jsonl_missing_file_and_bad_arguments(tmp_path: Path):
    with pytest.raises(TaskError, match="not found.*JSON object per line"):
        JsonlTask(tmp_path / "nope.jsonl")
    with pytest.raises(TaskError, match="not a file"):
        JsonlTask(tmp_path)
    with pytest.raises(TaskError, match="no usable rows"):
        JsonlTask(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(TaskError, match="on_bad_row"):
        JsonlTask(_good_file(tmp_path), on_bad_row="ignore")
    with pytest.raises(TaskError, match="2 distinct prompts"):
        JsonlTask(_write(tmp_path / "one.jsonl", [json.dumps({"prompt": "q", "answer": "a"})]))


def test_jsonl_eval_path_and_overlap(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    train = _good_file(tmp_path, n=10)
    held = _write(tmp_path / "held.jsonl", [json.dumps({"prompt": "q3", "answer": "3"}), json.dumps({"prompt": "new", "answer": "x"})])
    with caplog.at_level(logging.WARNING):
        task = JsonlTask(train, eval_path=held)
    assert [p.prompt for p in task.eval_problems()] == ["q3", "new"]
    assert task.overlapping_rows == [4] and task.num_train == 9
    assert "also in the held-out file" in caplog.text
    assert all(task.train_problem(i).prompt != "q3" for i in range(30))


# ----------------------------------------------------------------------------- user reward functions


REWARDS_MODULE = '''
import threading
RELEASE = threading.Event()
NOT_CALLABLE = 3

def by_topic(prompts, completions, **columns):
    return [float(len(c)) + (10.0 if t == "even" else 0.0) for c, t in zip(completions, columns["topic"])]

def seen_columns(prompts, completions, **columns):
    return [float(sorted(columns) == ["answer", "topic"]) for _ in prompts]

def raising(prompts, completions, **columns):
    if any("boom" in c for c in completions):
        raise RuntimeError("boom in grader")
    return [1.0 for _ in completions]

def hanging(prompts, completions, **columns):
    if len(completions) > 1:
        raise RuntimeError("batch fails, forcing one-by-one calls")
    if "hang" in completions[0]:
        RELEASE.wait(30)
    return [1.0]

def hang_everything(prompts, completions, **columns):
    RELEASE.wait(30)
    return [1.0 for _ in completions]

def one_too_many(prompts, completions, **columns):
    return [1.0 for _ in completions] + [0.0]

def always_one(prompts, completions, **columns):
    return [1.0]

def junk(prompts, completions, **columns):
    return ["high", float("nan"), 0.5, None, True]

def no_kwargs(prompts, completions):
    return [0.0 for _ in prompts]
'''


@pytest.fixture
def rewards_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A user module `pf_user_rewards` importable as `pf_user_rewards:<fn>`; hung threads are released after."""
    (tmp_path / "pf_user_rewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pf_user_rewards", raising=False)
    import pf_user_rewards

    yield pf_user_rewards
    pf_user_rewards.RELEASE.set()
    sys.modules.pop("pf_user_rewards", None)


def _user_task(tmp_path: Path, reward: str, **kwargs) -> JsonlTask:
    return JsonlTask(_good_file(tmp_path, n=10), reward=reward, **kwargs)


def test_user_reward_function_gets_aligned_columns(tmp_path: Path, rewards_module):
    task = _user_task(tmp_path, "pf_user_rewards:by_topic")
    problems = [task.train_problem(i) for i in range(4)]
    completions = ["a", "bb", "ccc", problems[3].answer]
    score = task.score(problems, completions)
    expected = [float(len(c)) + (10.0 if p.columns["topic"] == "even" else 0.0) for p, c in zip(problems, completions)]
    assert score.rewards == expected and score.errors == 0
    assert score.correct == [False, False, False, True]  # correct stays the exact match
    assert _user_task(tmp_path, "pf_user_rewards:seen_columns").score(problems, ["x"] * 4).rewards == [1.0] * 4


def test_reward_function_load_errors(tmp_path: Path, rewards_module):
    for spec, message in [
        ("no_colon_here", "import path 'module:function'"),
        ("pf_missing_module_xyz:fn", "cannot import module 'pf_missing_module_xyz'"),
        ("pf_user_rewards:nothere", "has no attribute 'nothere'"),
        ("pf_user_rewards:NOT_CALLABLE", "is a int, not a function"),
        ("pf_user_rewards:", "import path"),
    ]:
        with pytest.raises(TaskError, match=re.escape(message)):
            load_reward_fn(spec)
    with pytest.raises(TaskError, match=r"fn\(prompts, completions, \*\*kwargs\)"):
        _user_task(tmp_path, "pf_user_rewards:no_kwargs")


def test_raising_reward_is_contained(tmp_path: Path, rewards_module, caplog: pytest.LogCaptureFixture):
    task = _user_task(tmp_path, "pf_user_rewards:raising")
    problems = [task.train_problem(i) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="policyflow.tasks.reward_fn"):
        score = task.score(problems, ["fine", "boom!", "also fine"])
    assert score.rewards == [1.0, 0.0, 1.0]
    assert score.errors == 1
    assert "boom in grader" in caplog.text and "'boom!'" in caplog.text


def test_hanging_reward_is_contained(tmp_path: Path, rewards_module, caplog: pytest.LogCaptureFixture):
    task = _user_task(tmp_path, "pf_user_rewards:hanging", reward_timeout_s=0.2)
    problems = [task.train_problem(i) for i in range(3)]
    # The batch raises; one by one, the hanging sample times out and the others score.
    with caplog.at_level(logging.WARNING, logger="policyflow.tasks.reward_fn"):
        score = task.score(problems, ["ok", "hang", "ok too"])
    assert score.rewards == [1.0, 0.0, 0.0] and score.errors == 2  # the hang used up the budget
    assert "timed out" in caplog.text and "budget" in caplog.text
    score = task.score(problems[:2], ["ok", "ok"])
    assert score.rewards == [1.0, 1.0] and score.errors == 0
    # A batch that hangs counts every sample as an error, within about one timeout.
    everything = _user_task(tmp_path, "pf_user_rewards:hang_everything", reward_timeout_s=0.2)
    score = everything.score(problems, ["a", "b", "c"])
    assert score.rewards == [0.0, 0.0, 0.0] and score.errors == 3


def test_hanging_sample_only_costs_its_share(rewards_module):
    fn = rewards_module.hanging
    result = call_reward_fn(fn, ["p"] * 3, ["ok", "ok", "hang"], {}, timeout_s=0.2)
    assert result.rewards == [1.0, 1.0, 0.0] and result.failed == [False, False, True]


def test_wrong_length_and_non_number_returns(tmp_path: Path, rewards_module, caplog: pytest.LogCaptureFixture):
    task = _user_task(tmp_path, "pf_user_rewards:one_too_many")
    problems = [task.train_problem(i) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="policyflow.tasks.reward_fn"):
        score = task.score(problems, ["a", "b"])
    assert score.rewards == [0.0, 0.0] and score.errors == 2
    assert "returned 3 rewards for 2 samples" in caplog.text
    assert "returned 2 rewards for 1 samples" in caplog.text
    # Wrong length on the batch but right one by one: the per-sample calls recover.
    recovered = _user_task(tmp_path, "pf_user_rewards:always_one").score(problems, ["a", "b"])
    assert recovered.rewards == [1.0, 1.0] and recovered.errors == 0
    result = call_reward_fn(rewards_module.junk, ["p"] * 5, ["c"] * 5, {}, timeout_s=1.0)
    assert result.rewards == [0.0, 0.0, 0.5, 0.0, 1.0]  # None: TRL's "cannot score", 0.0 but not an error
    assert result.failed == [True, True, False, False, False] and result.errors == 2 and result.unscored == 1


# ----------------------------------------------------------------------------- registry


def test_make_task(tmp_path: Path):
    assert set(TASKS) == {"arithmetic", "countdown", "jsonl", "search_qa", "multiply", "agent_program"}
    assert isinstance(make_task("arithmetic"), ArithmeticTask)
    assert make_task("countdown", seed=1, num_eval=5).eval_problems() == CountdownTask(seed=1, num_eval=5).eval_problems()
    assert isinstance(make_task("jsonl", path=_good_file(tmp_path)), JsonlTask)
    with pytest.raises(ValueError, match=r"unknown task 'gsm8k'; choose one of \['agent_program', 'arithmetic', 'countdown', 'jsonl', 'multiply', 'search_qa'\]"):
        make_task("gsm8k")
    with pytest.raises(ValueError, match="accepts"):
        make_task("arithmetic", path="x")
