"""Tool pool: argument checks, error containment (raise, hang, bad result), concurrency limit,
tools run off the event loop (tests/test_model_output.py: a tool that blocks the thread it runs on)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from policyflow.tools import Tool, ToolPool, argument_errors, tool_stats
from tests.conftest import eventually

ECHO_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "times": {"type": "integer"}, "mode": {"type": "string", "enum": ["up", "low"]}},
    "required": ["text"],
    "additionalProperties": False,
}


async def _echo(text: str, times: int = 1, mode: str = "low") -> str:
    out = text * times
    return out.upper() if mode == "up" else out


async def _boom(text: str) -> str:
    raise RuntimeError("index corrupted")


async def _hang(text: str) -> str:
    await asyncio.sleep(3600)
    return text


async def _number(text: str) -> str:
    return 42  # type: ignore[return-value]


def _tool(name, fn, schema=ECHO_SCHEMA):
    return Tool(name=name, description=f"{name} tool", parameters=schema, fn=fn)


def test_argument_validation():
    tool = _tool("echo", _echo)
    assert argument_errors(tool, {"text": "a", "times": 2, "mode": "up"}) == []
    assert argument_errors(tool, {}) == ["missing required argument 'text'"]
    assert argument_errors(tool, {"text": "a", "times": True}) == ["argument 'times' must be integer, got bool"]
    assert argument_errors(tool, {"text": 3}) == ["argument 'text' must be string, got int"]
    assert argument_errors(tool, {"text": "a", "mode": "mid"}) == ["argument 'mode' must be one of ['up', 'low'], got 'mid'"]
    assert argument_errors(tool, {"text": "a", "colour": 1}) == ["unknown argument 'colour'; allowed ['mode', 'text', 'times']"]
    assert argument_errors(tool, ["a"]) == ["arguments must be an object, got list"]
    open_schema = {"type": "object", "properties": {"x": {"type": ["number", "null"]}}}
    loose = _tool("loose", _echo, open_schema)
    assert argument_errors(loose, {"x": 1.5, "extra": 1}) == [] and argument_errors(loose, {"x": None}) == []


def test_arguments_are_checked_by_the_whole_json_schema_standard():
    """Keywords the old hand-written subset ignored (bounds, patterns, lengths, nested items,
    const, oneOf) are checked by jsonschema's Draft 2020-12 validator; each problem is one short
    line naming the argument (nested ones by path), and a call lists at most 3 of them."""
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "maximum": 10},
            "id": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
            "xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
            "point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
            "mode": {"const": "fast"},
            "size": {"oneOf": [{"type": "integer"}, {"enum": ["small", "large"]}]},
        },
        "additionalProperties": False,
    }
    tool = _tool("strict", _echo, schema)
    assert argument_errors(tool, {"n": 3, "id": "abc", "xs": [1, 2], "point": {"x": 1.5}, "mode": "fast", "size": "small"}) == []
    assert argument_errors(tool, {"n": 0}) == ["argument 'n': 0 is less than the minimum of 1"]
    assert argument_errors(tool, {"id": "AB"}) == ["argument 'id': 'AB' does not match '^[a-z]+$'"]
    assert argument_errors(tool, {"id": "abcdefg"}) == ["argument 'id': 'abcdefg' is too long"]
    assert argument_errors(tool, {"xs": [1, "b"]}) == ["argument 'xs[1]' must be integer, got str"]
    assert argument_errors(tool, {"point": {}}) == ["missing required argument 'x' in 'point'"]
    assert argument_errors(tool, {"mode": "slow"}) == ["argument 'mode': 'fast' was expected"]
    assert argument_errors(tool, {"size": "huge"})[0].startswith("argument 'size': 'huge' is not valid under any of the given schemas")
    pool = ToolPool([tool])
    result = asyncio.run(pool.call("strict", {"n": 0, "id": "AB", "xs": [1, 2, 3, 4], "mode": 1, "extra": 2}))
    assert result.error == "bad_arguments" and "\n" not in result.text
    assert result.text.startswith("error: bad arguments for strict: ") and result.text.endswith("; and 2 more")


def test_tool_definition_errors():
    with pytest.raises(TypeError, match="async"):
        Tool("sync", "", ECHO_SCHEMA, lambda text: text)
    with pytest.raises(ValueError, match="required argument 'q'"):
        Tool("t", "", {"type": "object", "properties": {}, "required": ["q"]}, _echo)
    with pytest.raises(ValueError, match=r"not a valid JSON schema \(Draft 2020-12\) at properties.q.type: 'str' is not valid"):
        Tool("t", "", {"type": "object", "properties": {"q": {"type": "str"}}}, _echo)
    with pytest.raises(ValueError, match=r"at properties.n.minimum: 'zero' is not of type 'number'"):
        Tool("t", "", {"type": "object", "properties": {"n": {"type": "integer", "minimum": "zero"}}}, _echo)
    with pytest.raises(ValueError, match="unique"):
        ToolPool([_tool("a", _echo), _tool("a", _boom)])


def test_schema_is_function_format():
    assert _tool("echo", _echo).schema() == {
        "type": "function",
        "function": {"name": "echo", "description": "echo tool", "parameters": ECHO_SCHEMA},
    }


def test_failures_become_counted_observations():
    pool = ToolPool([_tool("echo", _echo), _tool("boom", _boom), _tool("hang", _hang), _tool("number", _number)], timeout_s=0.05)

    async def run():
        return [
            await pool.call("echo", {"text": "ab", "times": 2, "mode": "up"}),
            await pool.call("boom", {"text": "x"}),
            await pool.call("hang", {"text": "x"}),
            await pool.call("echo", {"times": 2}),
            await pool.call("search", {"text": "x"}),
            await pool.call("number", {"text": "x"}),
        ]

    ok, raised, hung, bad_args, unknown, bad_result = asyncio.run(run())
    assert ok.ok and ok.text == "ABAB"
    assert raised.error == "raised" and raised.text == "error: boom failed: RuntimeError: index corrupted"
    assert hung.error == "timeout" and hung.text == "error: hang timed out after 0.05 s" and hung.seconds >= 0.05
    assert bad_args.error == "bad_arguments" and "missing required argument 'text'" in bad_args.text
    assert unknown.error == "unknown_tool" and "available: ['boom', 'echo', 'hang', 'number']" in unknown.text
    assert bad_result.error == "bad_result" and bad_result.text == "error: number returned int, expected text"
    stats = pool.stats
    assert (stats.calls, stats.errors, stats.timeouts) == (6, 5, 1)
    assert stats.errors_by_kind == {"raised": 1, "timeout": 1, "bad_arguments": 1, "unknown_tool": 1, "bad_result": 1}
    assert stats.seconds >= 0.05
    assert stats.metrics(episodes=4) == {"agent/tool_calls_mean": 1.5, "agent/tool_errors": 5.0, "agent/tool_timeouts": 1.0, "perf/tool_seconds": stats.seconds}
    # one env step's record of the same results (what travels with the episode), plus a malformed turn
    step = tool_stats([ok, raised, hung, bad_args, unknown, bad_result], malformed=1)
    assert (step.calls, step.errors, step.timeouts) == (6, 6, 1) and step.errors_by_kind == stats.errors_by_kind | {"malformed": 1}
    assert step.seconds == pytest.approx(sum(r.seconds for r in (ok, raised, hung, bad_args, unknown, bad_result)))


def test_concurrency_limit_is_respected():
    """12 calls through 3 slots: the tools (each in its own thread) meet in rounds of exactly 3 at
    a barrier, which a fourth concurrent call would break and fewer could never pass."""
    limit, calls = 3, 12
    state = {"now": 0, "peak": 0}
    lock, barrier = threading.Lock(), threading.Barrier(limit)

    async def meet(text: str) -> str:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        barrier.wait(timeout=60)  # blocking on purpose: tools run off the loop
        with lock:
            state["now"] -= 1
        return text

    pool = ToolPool([_tool("meet", meet)], max_concurrency=limit, timeout_s=60)

    async def run():
        return await asyncio.gather(*(pool.call("meet", {"text": str(i)}) for i in range(calls)))

    results = asyncio.run(run())
    assert [r.text for r in results] == [str(i) for i in range(calls)]
    assert state["peak"] == limit == pool.max_in_flight  # the limit is reached and never exceeded
    assert pool.stats.errors == 0
    # the same pool under a second event loop (a semaphore is bound to the loop that first waited on it)
    state["peak"] = 0
    assert [r.text for r in asyncio.run(run())] == [str(i) for i in range(calls)] and state["peak"] == limit


def test_cancelling_the_caller_cancels_the_tool():
    """The tool's coroutine (on its own loop, in its own thread) is cancelled with the caller, so its thread ends."""
    pool = ToolPool([_tool("hang", _hang)], timeout_s=60)

    async def run():
        task = asyncio.create_task(pool.call("hang", {"text": "x"}))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert pool.stats.errors == 0 and pool._in_flight == 0
    assert eventually(lambda: pool.threads == 0) and pool.overrunning == 0


def test_a_timed_out_tool_is_cancelled_and_gives_its_slot_back():
    """A tool that awaits (here: forever) is cancelled at the timeout; its thread ends and its slot
    is free again, so a one-slot pool keeps serving."""
    pool = ToolPool([_tool("hang", _hang), _tool("echo", _echo)], max_concurrency=1, timeout_s=0.05)

    async def run():
        hung = await pool.call("hang", {"text": "x"})
        assert eventually(lambda: pool.threads == 0)
        return hung, await pool.call("echo", {"text": "y"})

    hung, echoed = asyncio.run(run())
    assert hung.error == "timeout" and echoed.text == "y" and pool.overrunning == 0


