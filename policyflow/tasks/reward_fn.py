"""Reward functions: the built-in `exact` and `numeric` matches, user functions, and their containment.

A reward function has the signature TRL uses::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float]

where each column is a list aligned with `prompts`. Users name theirs by import path,
`"my_rewards:length_bonus"`; the module must be importable (installed, or on PYTHONPATH; the
`policyflow` command does not add the current folder to `sys.path`).

`call_reward_fn` runs a function so that one bad sample cannot stop training:

1. the whole batch is called once in a worker thread, waited for at most `timeout_s`;
2. if it raises or returns the wrong number of values, each sample is called alone (sharing one
   more `timeout_s` budget) to find the failing ones;
3. a sample whose call raised, timed out, or produced a value that is not a finite real number
   gets reward 0.0, is logged (prompt and completion truncated) and is counted in `errors`.

A batch that times out counts every sample as an error and is not retried one by one (that
could take batch size x timeout). A hung call cannot be killed in-process: Python has no way to
stop a thread. Its daemon thread keeps running (and holding whatever it holds) until the call
returns or the process exits; it never blocks exit. Run untrusted or slow graders in a separate
service if that matters.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policyflow.tasks.base import TaskError, last_tagged

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]
BUILTIN_REWARDS = ("exact", "numeric")
NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-6
_CLIP_CHARS = 200
_LOGGED_FAILURES = 5
_NUMBER = r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?(?:/[0-9]+)?"
_NUMBER_RE = re.compile(_NUMBER)


# ----------------------------------------------------------------------------- answers


def answer_to_text(value: Any) -> str | None:
    """A reference answer cell as text: strings as they are, ints and floats printed; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def extract_final_answer(completion: str) -> str:
    """The content of the last `<answer>...</answer>` tag if there is one, else the whole
    completion; stripped of surrounding whitespace."""
    tagged = last_tagged(completion, "answer")
    return (completion if tagged is None else tagged).strip()


def _number_value(token: str) -> float | None:
    """The value of one number token (`"1,234.5"`, `"-3e2"`, `"3/4"`); None if not finite."""
    token = token.replace(",", "")
    numerator, _, denominator = token.partition("/")
    try:
        value = float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def parse_number(text: str) -> float | None:
    """The value of `text` if all of it (stripped) is one number written with ASCII digits."""
    text = text.strip()
    return _number_value(text) if re.fullmatch(_NUMBER, text) else None


def last_number(text: str) -> float | None:
    """The value of the last number written in `text` (the usual final-answer convention)."""
    found = _NUMBER_RE.findall(text)
    return _number_value(found[-1]) if found else None


def exact_match(completion: str, answer: str) -> bool:
    """Whether the completion's final answer equals the reference, both stripped."""
    return extract_final_answer(completion) == answer.strip()


def numeric_match(completion: str, answer: str) -> bool:
    """Whether the last number in the completion's final answer equals the reference number
    within NUMERIC_REL_TOL / NUMERIC_ABS_TOL."""
    expected = parse_number(answer)
    got = last_number(extract_final_answer(completion))
    if expected is None or got is None:
        return False
    return math.isclose(got, expected, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL)


def builtin_reward(match: Callable[[str, str], bool], answer_column: str) -> RewardFn:
    """A reward function giving 1.0 where `match(completion, answer)` holds, else 0.0."""

    def reward(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        answers = columns[answer_column]
        return [float(match(c, answer_to_text(a) or "")) for c, a in zip(completions, answers)]

    reward.__name__ = f"{match.__name__}_reward"
    return reward


# ----------------------------------------------------------------------------- resolving


def resolve_reward_fn(spec: str, *, answer_column: str = "answer") -> RewardFn:
    """`"exact"`, `"numeric"` (reading `answer_column`), or a user function `"module:function"`."""
    if spec == "exact":
        return builtin_reward(exact_match, answer_column)
    if spec == "numeric":
        return builtin_reward(numeric_match, answer_column)
    if spec == CODE_TESTS:
        return code_tests_reward
    return load_reward_fn(spec)


def load_reward_fn(path: str) -> RewardFn:
    """Import `"package.module:function"` (the function part may be dotted: `"mod:Class.method"`)."""
    module_name, colon, attr_path = path.partition(":")
    if not colon or not module_name.strip() or not attr_path.strip():
        raise TaskError(
            f"reward {path!r} is not one of {list(BUILTIN_REWARDS)} or an import path 'module:function' "
            "(e.g. 'my_rewards:length_bonus' for a function length_bonus in my_rewards.py)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name != module_name and not module_name.startswith(err.name + "."):
            raise TaskError(f"reward {path!r}: module {module_name!r} imports {err.name!r} ({raised_at(err)}), which is not installed; install it") from err
        raise TaskError(
            f"reward {path!r}: cannot import module {module_name!r} ({err}); install it or put its folder on PYTHONPATH"
        ) from err
    except Exception as err:
        message = err.msg if isinstance(err, SyntaxError) else repr(err)
        raise TaskError(f"reward {path!r}: importing module {module_name!r} failed at {raised_at(err)}: {message}") from err
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise TaskError(f"reward {path!r}: {module_name!r} has no attribute {attr_path!r}; check the name after the ':'")
        target = getattr(target, part)
    if not callable(target):
        raise TaskError(f"reward {path!r}: {attr_path!r} is a {type(target).__name__}, not a function")
    return target


def raised_at(err: BaseException, caller: str = __file__) -> str:
    """`file:line` where an import (or a call) of user code failed: the bad line of a SyntaxError,
    else the user's line that began it (the first frame past the import machinery and the
    calling module `caller`), and where it was raised if elsewhere."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<frozen") and "importlib" not in f.filename and f.filename != caller]
    if not frames:
        return "an unknown place"
    first, last = (f"{f.filename}:{f.lineno}" for f in (frames[0], frames[-1]))
    return first if first == last else f"{first} (raised in {last})"


def check_reward_signature(fn: RewardFn, spec: str, columns: Mapping[str, Any]) -> None:
    """Raise TaskError if `fn` cannot be called as `fn(prompts, completions, **columns)`."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; the call will tell
        return
    try:
        signature.bind([], [], **dict.fromkeys(columns, []))
    except TypeError as err:
        raise TaskError(
            f"reward {spec!r} cannot be called as fn(prompts, completions, **columns) with columns {list(columns)}: {err}; "
            "define it as fn(prompts, completions, **kwargs) -> list[float]"
        ) from err


# ----------------------------------------------------------------------------- containment


@dataclass(frozen=True)
class RewardResult:
    """One reward per sample; `failed[i]` marks samples that got 0.0 because the function failed."""

    rewards: list[float]
    failed: list[bool]

    @property
    def errors(self) -> int:
        return sum(self.failed)


@dataclass(frozen=True)
class _Outcome:
    """What a call in a worker thread did: returned `value`, raised `error`, or timed out."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False


def run_with_timeout(thunk: Callable[[], Any], timeout_s: float) -> _Outcome:
    """Call `thunk` in a daemon thread and wait at most `timeout_s` (see the module docstring)."""
    box: list[_Outcome] = []

    def target() -> None:
        try:
            box.append(_Outcome(value=thunk()))
        except BaseException as err:  # deliberate containment: a user's grader may raise anything
            box.append(_Outcome(error=err))

    thread = threading.Thread(target=target, name="policyflow-reward", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    return box[0] if box else _Outcome(timed_out=True)


def _as_values(result: Any, expected: int) -> tuple[list[Any] | None, str]:
    """The result as a list of `expected` items, or None and what is wrong with it."""
    if hasattr(result, "tolist"):  # numpy arrays, torch tensors
        result = result.tolist()
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        return None, f"returned a {type(result).__name__}, not a list of floats"
    if len(result) != expected:
        return None, f"returned {len(result)} rewards for {expected} samples"
    return list(result), ""


def _as_reward(value: Any) -> float | None:
    """A finite real number as float, else None."""
    if not isinstance(value, numbers.Real):
        return None
    try:
        reward = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return reward if math.isfinite(reward) else None


def _clip(text: str) -> str:
    return repr(text if len(text) <= _CLIP_CHARS else text[:_CLIP_CHARS] + "...")


class _FailureLog:
    """Logs the first few failing samples of a call in full and summarises the rest."""

    def __init__(self, name: str):
        self.name = name
        self.count = 0

    def add(self, why: str, prompt: str, completion: str) -> None:
        self.count += 1
        if self.count <= _LOGGED_FAILURES:
            logger.warning("reward %s failed on a sample (reward 0.0): %s; prompt=%s completion=%s", self.name, why, _clip(prompt), _clip(completion))

    def close(self) -> None:
        if self.count > _LOGGED_FAILURES:
            logger.warning("reward %s failed on %d more samples (reward 0.0), not logged one by one", self.name, self.count - _LOGGED_FAILURES)


def call_reward_fn(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    *,
    timeout_s: float,
    name: str = "",
) -> RewardResult:
    """Rewards for a batch, containing exceptions, hangs and malformed returns (module docstring)."""
    n = len(prompts)
    if len(completions) != n or any(len(values) != n for values in columns.values()):
        raise ValueError("call_reward_fn needs prompts, completions and every column of the same length")
    name = name or getattr(fn, "__name__", repr(fn))
    log = _FailureLog(name)
    outcome = run_with_timeout(lambda: fn(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()}), timeout_s)
    if outcome.timed_out:
        logger.warning(
            "reward %s did not return within %.3gs for a batch of %d; all count as errors with reward 0.0 "
            "(its thread cannot be stopped and may keep running)", name, timeout_s, n
        )
        return RewardResult([0.0] * n, [True] * n)
    if outcome.error is None:
        values, problem = _as_values(outcome.value, n)
        if values is not None:
            result = _checked(values, prompts, completions, log)
            log.close()
            return result
        logger.warning("reward %s %s; calling it one sample at a time to find the failures", name, problem)
    else:
        logger.warning("reward %s raised %r on a batch of %d; calling it one sample at a time to find the failures", name, outcome.error, n)
    result = _per_sample(fn, prompts, completions, columns, timeout_s, log)
    log.close()
    return result


def _checked(values: list[Any], prompts: Sequence[str], completions: Sequence[str], log: _FailureLog) -> RewardResult:
    """Rewards from a returned list: entries that are not finite real numbers fail."""
    rewards, failed = [], []
    for value, prompt, completion in zip(values, prompts, completions):
        reward = _as_reward(value)
        if reward is None:
            log.add(f"returned {value!r} ({type(value).__name__}); rewards must be finite real numbers", prompt, completion)
        rewards.append(0.0 if reward is None else reward)
        failed.append(reward is None)
    return RewardResult(rewards, failed)


def _per_sample(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    timeout_s: float,
    log: _FailureLog,
) -> RewardResult:
    """Call `fn` on one sample at a time, all within one `timeout_s` budget."""
    deadline = time.monotonic() + timeout_s
    rewards, failed = [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        reward, why = _one_sample(fn, prompt, completion, {k: [v[i]] for k, v in columns.items()}, deadline - time.monotonic())
        if why:
            log.add(why, prompt, completion)
        rewards.append(0.0 if reward is None else reward)
        failed.append(reward is None)
    return RewardResult(rewards, failed)


def _one_sample(fn: RewardFn, prompt: str, completion: str, columns: dict[str, list[Any]], budget_s: float) -> tuple[float | None, str]:
    """The reward of one sample, or None and why it failed."""
    if budget_s <= 0:
        return None, "time budget for one-by-one calls used up"
    outcome = run_with_timeout(lambda: fn([prompt], [completion], **columns), budget_s)
    if outcome.timed_out:
        return None, f"timed out after {budget_s:.3g}s"
    if outcome.error is not None:
        return None, f"raised {outcome.error!r}"
    values, problem = _as_values(outcome.value, 1)
    if values is None:
        return None, problem
    reward = _as_reward(values[0])
    if reward is None:
        return None, f"returned {values[0]!r} ({type(values[0]).__name__}); rewards must be finite real numbers"
    return reward, ""


# ----------------------------------------------------------------------------- code_tests: hidden unit tests in the sandbox

CODE_TESTS = "code_tests"
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)
# Runs inside the sandbox (as main.py). The solution never runs in the process that prints the
# verdict: that process (made non-dumpable, so the child cannot reach its fds or memory through
# /proc or ptrace) forks a child whose stdout and stderr are /dev/null; the child runs the solution,
# then each test in its namespace (with `exec`/`compile`/`os.write` taken before the solution
# runs), and writes one byte per test, b"1" passed or b"0", to a pipe. The parent waits for it and,
# only if it exited normally (status 0) having written exactly one such byte per test, prints the
# one line `<nonce> passed total`: the verdict. No verdict line: no score (an error).
_HARNESS = """\
import os
def _harness(_steps):
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the child cannot open /proc/<us>/fd/1 or ptrace us
    _total = sum(_kind == "test" for _kind, _ in _steps)
    _r, _w = os.pipe()
    _child = os.fork()
    if _child == 0:
        _exec, _compile, _write, _exit = exec, compile, os.write, os._exit
        try:
            os.close(_r)
            _null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(_null, 1)
            os.dup2(_null, 2)
            os.close(_null)
            _g = {{"__name__": "__main__", "__builtins__": __builtins__}}
            try:
                _exec(_compile({solution!r}, "<solution>", "exec"), _g)
                _ran = True
            except BaseException:
                _ran = False
            for _kind, _src in _steps:
                _ok = False
                if _ran:
                    try:
                        _exec(_compile(_src, "<test>", "exec"), _g)
                        _ok = True
                    except BaseException:
                        pass
                if _kind == "test":
                    _write(_w, b"1" if _ok else b"0")
        except BaseException:
            _exit(1)
        _exit(0)
    os.close(_w)
    _status = os.waitpid(_child, 0)[1]
    os.set_blocking(_r, False)
    _bits = b""
    try:
        while len(_bits) <= _total and (_chunk := os.read(_r, 65536)):
            _bits += _chunk
    except BlockingIOError:
        pass
    if os.waitstatus_to_exitcode(_status) == 0 and len(_bits) == _total and not _bits.strip(b"01"):
        _nonce = {nonce!r}
        os.write(1, ("\\n%s %d %d\\n" % (_nonce, _bits.count(b"1"), _total)).encode())
_harness({steps!r})
"""


def extract_code(completion: str) -> str:
    """The code of a completion: its last ```python fenced block (verl's and prime-rl's
    convention), else its last `<code>…</code>` block, else the whole text."""
    blocks = _FENCE.findall(completion)
    if blocks:
        return blocks[-1]
    found = last_tagged(completion, "code")
    return found if found is not None else completion


def split_tests(tests: Any) -> list[tuple[str, str]]:
    """The `tests` cell as ("test" | "setup", source) steps, in order; ValueError when it is not one.

    A list of strings: each one test (e.g. `"assert add(1, 2) == 3"`). A string: test source,
    split into top-level statements; each `assert` is a test, anything else (imports, helper
    functions) is setup run in order. Every test counts the same; the score is the fraction passed."""
    if isinstance(tests, list):
        if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
            raise ValueError("tests must be a non-empty list of non-empty strings (one test each) or a test source string")
        for t in tests:
            compile(t, "<test>", "exec")  # SyntaxError (a ValueError) for a broken test
        return [("test", t) for t in tests]
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError("tests must be a non-empty list of strings (one test each) or a test source string")
    import ast

    tree = ast.parse(tests)
    steps = [("test" if isinstance(node, ast.Assert) else "setup", ast.get_source_segment(tests, node) or "") for node in tree.body]
    if not any(kind == "test" for kind, _ in steps):
        raise ValueError("the test source has no top-level assert statement (each one is a test)")
    return steps


def _verdict(stdout: str, nonce: str) -> tuple[int, int] | None:
    for line in reversed(stdout.splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce and parts[1].isdigit() and parts[2].isdigit():
            return int(parts[1]), int(parts[2])
    return None


async def _run_tests(completion: str, tests: Any, settings: Mapping[str, Any], slots: Any) -> tuple[float | None, str]:
    """(fraction of tests passed, "") or (None, why there is no verdict) for one completion, in a sandbox of its own."""
    import secrets

    from policyflow.tools.code import SandboxUnavailable, run_python_async

    try:
        steps = split_tests(tests)
    except (ValueError, SyntaxError) as err:
        return None, f"bad tests cell: {err}"
    nonce = secrets.token_hex(16)
    source = _HARNESS.format(steps=steps, nonce=nonce, solution=extract_code(completion))
    async with slots:
        try:
            result = await run_python_async(source, **settings)
        except SandboxUnavailable as err:
            return None, str(err).splitlines()[0]
    verdict = _verdict(result.stdout, nonce)
    if verdict is None:
        why = f"timed out after {settings.get('timeout_s', 5.0):g} s" if result.timed_out else f"no verdict (exit code {result.exit_code}, stopped {result.stopped})"
        return None, why
    passed, total = verdict
    return passed / total, ""


def code_tests_result(completions: Sequence[str], tests: Sequence[Any], *, timeout_s: float = 5.0, memory_mb: int = 512,
                      packages: Sequence[str] = (), isolation: str = "namespaces", concurrency: int = 16,
                      prompts: Sequence[str] | None = None) -> RewardResult:
    """The `code_tests` reward: each completion's code (`extract_code`) run against its hidden
    `tests` (`split_tests`) in a sandbox of its own (`tools.code.run_python_async`: no network,
    no host files; `timeout_s` of wall clock, `memory_mb`), at most `concurrency` at once; the
    reward is the fraction of tests passed. A run with no verdict (timed out, killed, memory,
    the solution ending the process, no sandbox) or a bad tests cell scores 0 and is counted
    (`RewardResult.failed`); a solution that does not compile passes no test (0, not an error).

    The solution and the tests run in a forked child whose output goes to /dev/null; only the
    harness's parent process, which the child cannot reach, prints the verdict line, with a random
    nonce per run. The child reports one pass bit per test over a pipe; a solution written to cheat
    can still forge those bits (it runs in the process that writes them: e.g. write them itself and
    `os._exit(0)`), as in verl's and prime-rl's graders; the sandbox bounds what it can reach, not
    what it claims. Patching builtins (`exec`, `compile`) does not stop the tests."""
    import asyncio
    import concurrent.futures

    if len(completions) != len(tests):
        raise ValueError("code_tests needs one tests cell per completion")
    settings = dict(timeout_s=timeout_s, memory_mb=memory_mb, packages=tuple(packages), isolation=isolation)

    async def run_all() -> list[tuple[float | None, str]]:
        slots = asyncio.Semaphore(concurrency)
        return await asyncio.gather(*(_run_tests(c, t, settings, slots) for c, t in zip(completions, tests)))

    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if in_loop:  # called from a coroutine: run on a loop of our own, in another thread
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            outcomes = thread.submit(asyncio.run, run_all()).result()
    else:
        outcomes = asyncio.run(run_all())
    log = _FailureLog(CODE_TESTS)
    prompts = list(prompts) if prompts is not None else [""] * len(completions)
    for (reward, why), prompt, completion in zip(outcomes, prompts, completions):
        if reward is None:
            log.add(why, prompt, completion)
    log.close()
    return RewardResult([reward or 0.0 for reward, _ in outcomes], [reward is None for reward, _ in outcomes])


def code_tests_reward(prompts: list[str], completions: list[str], tests: list[Any], **_: Any) -> list[float]:
    """`code_tests_result` as a TRL-style reward function (default sandbox settings)."""
    return code_tests_result(completions, tests, prompts=prompts).rewards
