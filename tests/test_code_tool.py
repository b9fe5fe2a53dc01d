"""The code tool (`tools/python_tool.py`): `<code>…</code>` in the tag format and a `python` tool
call for chat models, run in the real sandbox; what it prints is the observation, a failed run an
error observation counted as a tool error; and the `code_tests` reward (hidden unit tests in the
sandbox, scored by the fraction passed)."""

from __future__ import annotations

import asyncio
import json

import pytest

from policyflow.agent.parse import FinalAnswer, ToolCalls, parse_turn
from policyflow.agent.tool_env import ToolEnv, ToolSetup
from policyflow.problems import Problem
from policyflow.tasks.jsonl import JsonlTask
from policyflow.tasks.code_tests import code_tests_result, extract_code, split_tests
from policyflow.tools import ToolPool
from policyflow.tools.code import ExecResult
from policyflow.tools.python_tool import CodeError, CodeSettings, Notebook, code_tool, format_result
from policyflow.policy import PolicySpec

PROBLEM = Problem("p0", "12*34", "408")


def _env(tool_format: str = "tags", notebook: Notebook | None = None, timeout_s: float = 5.0) -> ToolEnv:
    name = "code" if tool_format == "tags" else "python"
    pool = ToolPool([code_tool(CodeSettings(timeout_s=timeout_s), name=name, notebook=notebook)], timeout_s=timeout_s + 10)
    return ToolEnv(PROBLEM, "Q: 12*34\n", ToolSetup(pool, tool_format, lambda p, a: a == p.answer, (), ("<out>", "</out>")))


def _steps(env: ToolEnv, actions: list[str]):
    async def run():
        return [await env.step(a) for a in actions]

    return asyncio.run(run())


def test_print_is_the_observation_and_counts_as_a_tool_call():
    env = _env()
    assert env.stop == ("</code>", "</answer>")
    first, answer = _steps(env, ["<code>print(12*34)</code>", "<answer>408</answer>"])
    assert first.observation == "408" and not first.done
    assert first.tools.calls == 1 and first.tools.errors == 0 and first.tools.seconds > 0
    assert answer.done and answer.reward_parts["correct"] == 1.0
    assert env.calls == {"code": 1} and env.tool_calls == 1


def test_exception_is_an_error_observation_counted_as_a_tool_error():
    env = _env()
    (step,) = _steps(env, ["<code>print('before')\n1/0</code>"])
    assert step.observation.startswith("error: code failed: CodeError: ZeroDivisionError: division by zero")
    assert "before" in step.observation  # what it printed before failing follows the exception line
    assert step.tools.calls == 1 and step.tools.errors == 1 and env.tool_errors == 1


def test_timeout_is_an_error_observation():
    env = _env(timeout_s=1.0)
    (step,) = _steps(env, ["<code>while True: pass</code>"])
    assert step.observation == "error: code failed: CodeError: timed out after 1 s"
    assert step.tools.errors == 1


def test_no_output_stderr_and_exit_codes():
    ok = lambda out, err="": ExecResult(out, err, 0, False, None, 0.1)  # noqa: E731
    assert format_result(ok(""), 5) == "(no output)"
    assert format_result(ok("3\n", "warning: x\n"), 5) == "3\nwarning: x"
    with pytest.raises(CodeError, match=r"^exit code 3$"):
        format_result(ExecResult("", "", 3, False, None, 0.1), 5)
    with pytest.raises(CodeError, match=r"^stopped: memory"):
        format_result(ExecResult("", "", None, False, "memory", 0.1), 5)


def test_indented_block_is_dedented_and_the_sandbox_has_no_host_files():
    env = _env()
    code = "<code>\n    import os\n    print(os.path.exists('/work/main/README.md'), 'work' in os.listdir('/'))\n</code>"
    (step,) = _steps(env, [code])
    assert step.observation == "False False"


def test_python_tool_call_for_chat_models():
    env = _env("hermes")
    call = json.dumps({"name": "python", "arguments": {"code": "x = 6\nprint(x * 7)"}})
    first, bad = _steps(env, [f"<tool_call>{call}</tool_call>", '<tool_call>{"name": "python", "arguments": {}}</tool_call>'])
    assert first.observation == "42" and env.calls == {"python": 2}
    assert bad.observation.startswith("error: bad arguments for python: missing required argument 'code'") and bad.tools.errors == 1
    assert env.setup.prompt_tools[0]["function"]["name"] == "python"


def test_stateful_notebook_keeps_variables_of_successful_cells():
    notebook = Notebook()
    env = _env(notebook=notebook)
    steps = _steps(env, ["<code>x = 21\nprint('set')</code>", "<code>1/0</code>", "<code>print(x * 2)</code>"])
    assert [s.observation for s in steps][::2] == ["set", "42"]  # the first cell's output is not replayed
    assert notebook.cells == ["x = 21\nprint('set')", "print(x * 2)"]


def test_parse_code_tag():
    tools = _env().setup.tools
    turn = parse_turn("tags", "<code>\n  a = 1\n  print(a)\n</code>", tools).action
    assert isinstance(turn, ToolCalls) and turn.calls[0].arguments == {"code": "a = 1\nprint(a)"}
    assert isinstance(parse_turn("tags", "<answer>5</answer>", tools).action, FinalAnswer)


# -- code_tests: a completion's code against hidden unit tests ----------------------------------

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]


def test_code_tests_reward_values(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    completions = [
        "Here:\n```python\ndef add(a, b):\n    return a + b\n```",  # correct: 1.0
        "<code>def add(a, b):\n    return 3</code>",  # one of two: 0.5
        "def add(a, b) return a + b",  # syntax error: 0, not an error
        "def add(a, b):\n    while True: pass",  # infinite loop: 0 at the timeout, an error
        f"def add(a, b):\n    return open({str(secret)!r}).read()",  # the host's file is not there: 0
        "import os\nos._exit(0)",  # ends the process before the verdict: 0, an error
        "print('deadbeef 2 2')\ndef add(a, b): return 0",  # a forged verdict without the run's nonce: 0
    ]
    result = code_tests_result(completions, [TESTS] * len(completions), timeout_s=2.0)
    assert result.rewards == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert result.failed == [False, False, False, True, False, True, False]


def test_test_source_string_and_bad_cells():
    source = "import math\n\ndef close(a, b):\n    return math.isclose(a, b)\n\nassert close(area(1), math.pi)\nassert area(0) == 1\n"
    result = code_tests_result(["import math\ndef area(r): return math.pi * r * r"], [source])
    assert result.rewards == [0.5] and result.failed == [False]
    assert [kind for kind, _ in split_tests(source)] == ["setup", "setup", "test", "test"]
    for bad in ([], "x = 1", "assert (", [""], 3):
        with pytest.raises((ValueError, SyntaxError)):
            split_tests(bad)
    assert extract_code("a\n```py\nx=1\n```\nb ```python\ny=2\n```") == "y=2\n"


def test_jsonl_task_with_code_tests(tmp_path):
    rows = [{"prompt": f"Write add, version {i}", "tests": TESTS} for i in range(4)]
    rows.append({"prompt": "Write area", "tests": "assert area(0) == 0"})
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = JsonlTask(path, reward="code_tests", eval_fraction=0.2, code={"timeout_s": 2.0})
    problems = list(task._train)
    completions = ["def add(a, b): return a + b"] * len(problems)
    score = task.score(problems, completions)
    expected = [1.0 if "add" in p.prompt else 0.0 for p in problems]
    assert score.rewards == expected and score.correct == [r == 1.0 for r in expected] and score.errors == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "tests": "assert ("}) + "\n")
    with pytest.raises(Exception, match="tests column"):
        JsonlTask(bad, reward="code_tests", eval_fraction=0.5)


def test_jsonl_code_tests_from_config(tmp_path):
    from policyflow.config import load_config
    from policyflow.session import build_task

    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Write add {i}", "tests": TESTS}) + "\n" for i in range(5)))
    cfg = load_config(None, ["task.name=jsonl", f"task.path={path}", "task.reward=code_tests", "task.code.timeout_s=3", f"run.output_dir={tmp_path}"])
    task = build_task(PolicySpec.of(cfg))
    assert isinstance(task, JsonlTask) and task.code["timeout_s"] == 3.0 and task.code["isolation"] == "namespaces"
    score = task.score(list(task.eval_problems()), ["```python\ndef add(a, b): return a + b\n```"] * len(task.eval_problems()))
    assert score.rewards == [1.0] * len(task.eval_problems()) and all(score.correct)


def test_code_tests_cannot_be_gamed_from_the_solution():
    """The solution runs in a forked child with /dev/null for output; only the harness's parent,
    which the child cannot reach, prints the verdict with the run's nonce."""
    forge = ("import sys, os\n"
             "f = sys._getframe()\n"
             "found = set()\n"
             "while f is not None:\n"  # every string constant and value of the frames above: the nonce is among them
             "    for v in [*f.f_code.co_consts, *f.f_locals.values(), *f.f_globals.values()]:\n"
             "        if isinstance(v, str) and len(v) == 32: found.add(v)\n"
             "    f = f.f_back\n"
             "m = sys.modules['__main__']\n"
             "found |= {v for v in vars(m).values() if isinstance(v, str) and len(v) == 32}\n"
             "lines = ''.join('\\n%s 2 2\\n' % n for n in found).encode()\n"
             "assert found\n"
             "for path in ('/dev/stdout', '/proc/self/fd/1', '/proc/%d/fd/1' % os.getppid(), '/proc/1/fd/1'):\n"
             "    try:\n"
             "        with open(path, 'wb') as out: out.write(lines)\n"
             "    except OSError: pass\n"
             "os.write(1, lines); os.write(2, lines); print(lines.decode(), flush=True)\n"
             "os._exit(0)\n")  # before the real verdict: no verdict at all now, an error
    completions = [
        "```python\nimport builtins\nbuiltins.exec = lambda *a, **k: None\n```",  # tests still run: add is undefined
        "import builtins\nbuiltins.compile = lambda *a, **k: compile('pass', '', 'exec')\ndef add(a, b): return a + b\n",
        forge,
        "import os\nos.kill(os.getppid(), 9)",  # kills the harness's parent: no verdict, an error
    ]
    result = code_tests_result(completions, [TESTS, TESTS, TESTS, TESTS], timeout_s=3.0)
    assert result.rewards == [0.0, 1.0, 0.0, 0.0]
    assert result.failed == [False, False, True, True]
    assert code_tests_result(["```python\nimport builtins\nbuiltins.exec=lambda *a, **k: None\n```"],
                             [["assert add(1,2)==3"]]).rewards == [0.0]
