"""The `code_tests` reward: a completion's code run against hidden unit tests in the sandbox,
scored by the fraction passed (how verl and prime-rl use sandboxes for code RL)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from policyflow.tasks.base import last_tagged
from policyflow.tasks.reward_fn import RewardResult, _FailureLog

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
