"""Tools an agent calls, and the pool that runs them safely.

A `Tool` is an async callable with a JSON schema for its arguments (the OpenAI/Hugging Face
"function" format, which chat templates render with `tools=`). A `ToolPool` runs calls with a
concurrency limit and a per-call timeout, checks arguments against the schema (with the
`jsonschema` library's Draft 2020-12 validator: the whole standard, not a subset), and turns every
failure (unknown tool, bad arguments, a tool that raises, returns a non-string or runs past its
timeout) into an error observation: the caller always gets a `ToolResult`, never an exception.
Every call is counted in the pool's `ToolStats` (`pool.stats`); what is logged per training
step is the same record summed over the step's episodes (`Trajectory.tools`, filled from each
step's `ToolResult`s by `tool_stats`), so the counts travel with the episodes to the trainer
in every runtime.

Tools run off the event loop. Each call's coroutine runs on its own event loop in its own
(daemon) thread, and the caller's loop only waits for its result under `asyncio.timeout`, so
every tool is bounded by the pool's timeout, even one that blocks without ever awaiting (an
`async def` calling `time.sleep`, a slow index lookup), and the loop (every other episode's
decoding) never waits behind a tool. The price is one loop turn and one thread per call, and
one rule for tool authors: a tool must not await objects bound to the caller's loop (a client
session, lock or queue made there); make them inside the call, or use thread-safe clients.

A thread cannot be killed. At the timeout the caller gets its error observation at once and the
tool's coroutine is cancelled at its next `await`; a tool blocked in a call keeps its thread
until that call returns. Such a thread keeps its slot, so at most `max_concurrency` threads ever
run tools, and `ToolPool.overrunning` counts the threads still running calls that timed out.
While every slot is held by one of them, a call is not run: it fails as a timeout (within one
`timeout_s` of waiting) instead of waiting for ever.

Cancelling the caller (an aborted episode) still cancels the tool (at its next `await`):
`asyncio.CancelledError` is not a tool failure and propagates.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

from policyflow.types import ToolStats

_MAX_ERROR_CHARS = 200  # an exception message in an observation is clipped to this
_MAX_VALUE_CHARS = 80  # an argument's name or value quoted in an error is clipped to this
ToolErrorKind = Literal["unknown_tool", "bad_arguments", "raised", "bad_result", "timeout"]

_MAX_ARGUMENT_ERRORS = 3  # problems listed in one bad-arguments observation (the rest are counted)


@dataclass(frozen=True)
class Tool:
    """A named async callable `fn(**arguments) -> str` whose arguments follow `parameters`.

    `parameters` is a JSON schema (Draft 2020-12) of type "object" with "properties" (the
    function-calling format chat templates render); every keyword of the standard is checked
    (`argument_errors`). A schema that is not valid JSON schema is refused here, loudly.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., Awaitable[str]]
    _validator: Draft202012Validator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not inspect.iscoroutinefunction(self.fn) and not inspect.iscoroutinefunction(getattr(self.fn, "__call__", None)):
            raise TypeError(f"tool {self.name!r}: fn must be an async function (async def), got {self.fn!r}")
        if self.parameters.get("type") != "object" or not isinstance(self.parameters.get("properties"), Mapping):
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema with type 'object' and 'properties'")
        for key in self.parameters.get("required", ()):
            if key not in self.parameters["properties"]:
                raise ValueError(f"tool {self.name!r}: required argument {key!r} is not among properties {sorted(self.parameters['properties'])}")
        try:
            Draft202012Validator.check_schema(self.parameters)
        except SchemaError as err:  # already the validator's best match among the schema's problems
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path).lstrip(".")
            raise ValueError(f"tool {self.name!r}: parameters is not a valid JSON schema (Draft 2020-12){f' at {where}' if where else ''}: {err.message}") from None
        object.__setattr__(self, "_validator", Draft202012Validator(dict(self.parameters)))

    def schema(self) -> dict[str, Any]:
        """The tool in the function-calling format chat templates take (`apply_chat_template(tools=[...])`)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}


def argument_errors(tool: Tool, arguments: Any) -> list[str]:
    """What is wrong with `arguments` for `tool` (empty when they are valid), one short line per
    problem naming the argument: every violation of the tool's JSON schema the `jsonschema`
    validator reports (missing required keys, unknown keys when additionalProperties is false,
    wrong types, values outside an enum, bounds, patterns, nested items...). Model text quoted
    in a message is clipped (`_MAX_VALUE_CHARS`)."""
    try:
        errors = sorted(tool._validator.iter_errors(arguments), key=lambda e: [str(p) for p in e.absolute_path])
    except Exception as err:  # deliberate containment: a schema that cannot be applied (an unresolvable $ref) is the tool's bug, reported per call
        return [f"arguments could not be checked against the schema ({type(err).__name__}: {err})"[:_MAX_ERROR_CHARS]]
    messages: list[str] = []
    for error in errors:
        for message in _describe(error):
            if message not in messages:
                messages.append(message)
    return messages


def _describe(error: ValidationError) -> list[str]:
    """One validation error as short messages that name the argument (its path: `xs[1].name`)."""
    path = list(error.absolute_path)
    name = _clip("".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if k else str(p)) for k, p in enumerate(path)))
    kind, expected = error.validator, error.validator_value
    if not path and kind == "type":
        return [f"arguments must be an object, got {_json_type(error.instance)}"]
    if kind == "required" and isinstance(error.instance, Mapping):
        where = "" if not path else f" in {name}"
        return [f"missing required argument {_clip(key)}{where}" for key in expected if key not in error.instance]
    if kind == "additionalProperties" and isinstance(error.instance, Mapping):
        allowed, patterns = sorted(error.schema.get("properties", {})), list(error.schema.get("patternProperties", {}))
        unknown = [key for key in error.instance if key not in allowed and not any(re.search(p, key) for p in patterns)]
        return [f"unknown argument {_clip(key)}; allowed {allowed}" for key in unknown]
    if kind == "type":
        names = [expected] if isinstance(expected, str) else list(expected)
        return [f"argument {name} must be {' or '.join(names)}, got {_json_type(error.instance)}"]
    if kind == "enum":
        return [f"argument {name} must be one of {list(expected)}, got {_clip(error.instance)}"]
    subject = f"argument {name}" if path else "arguments"
    return [f"{subject}: {error.message}"[:_MAX_ERROR_CHARS]]


def _json_type(value: Any) -> str:
    """The Python type name of a parsed JSON value (bool, int, float, str, list, dict, NoneType)."""
    return type(value).__name__


def _clip(value: Any) -> str:
    """`repr(value)` clipped to `_MAX_VALUE_CHARS` characters (arguments are model output)."""
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


@dataclass(frozen=True)
class ToolResult:
    """The observation text of one call; `error` is None on success, else why it failed."""

    text: str
    error: ToolErrorKind | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class _ThreadCall:
    """One tool call run to completion on its own event loop, in its own daemon thread.

    `future` (on the caller's loop) gets `(True, result)` or `(False, exception)`; `cancel()`
    cancels the tool's coroutine at its next `await`. `on_exit(self)` runs in the thread when it
    ends, whether or not anyone still waits for the result.
    """

    def __init__(self, fn: Callable[..., Awaitable[str]], arguments: Mapping[str, Any], on_exit: Callable[[_ThreadCall], None]) -> None:
        self._fn, self._arguments, self._on_exit = fn, dict(arguments), on_exit
        self._caller = asyncio.get_running_loop()
        self.future: asyncio.Future[tuple[bool, Any]] = self._caller.create_future()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._cancelled = False
        self.timed_out = False  # set by the pool (under its lock) when the caller stopped waiting at the timeout
        self.ended = False  # set by the pool (under its lock) when the thread is done

    def start(self, name: str) -> None:
        threading.Thread(target=self._run, name=f"tool-{name}", daemon=True).start()

    def _run(self) -> None:
        try:
            outcome: tuple[bool, Any] = (True, asyncio.run(self._main()))
        except BaseException as err:  # everything the tool raised goes back to the caller, as data
            outcome = (False, err)
        self._on_exit(self)
        try:
            self._caller.call_soon_threadsafe(self._deliver, outcome)
        except RuntimeError:  # the caller's loop is closed: nobody waits for this result
            pass

    async def _main(self) -> Any:
        with self._lock:
            self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
            if self._cancelled:
                self._task.cancel()
        return await self._fn(**self._arguments)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._loop is not None and self._task is not None:
                try:
                    self._loop.call_soon_threadsafe(self._task.cancel)
                except RuntimeError:  # its loop has finished: the tool already returned
                    pass

    def _deliver(self, outcome: tuple[bool, Any]) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


class ToolPool:
    """Runs tool calls with at most `max_concurrency` in flight and `timeout_s` per call, each
    off the event loop in a thread of its own (see the module docstring).

    `seconds` in a result is the time the tool itself ran (after it got a slot), so queueing
    for a slot is not charged to the tool and does not count towards its timeout. A slot is
    held until the tool's thread ends, which for a blocking tool that timed out is after the
    caller got its timeout error: `overrunning` is the number of such threads right now.
    """

    def __init__(self, tools: Sequence[Tool], *, max_concurrency: int = 16, timeout_s: float = 30.0):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        self.timeout_s = timeout_s
        self.stats = ToolStats()
        self.max_concurrency = max_concurrency
        self.max_in_flight = 0  # the most tool threads ever running at once (never above max_concurrency)
        self.threads = 0  # tool threads running now, timed-out ones included
        self.overrunning = 0  # tool threads still running a call whose caller got a timeout error
        self._lock = threading.Lock()  # guards the counts above and the slots' identity: threads end off the loop
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0  # callers waiting for a tool's result now

    def schemas(self) -> list[dict[str, Any]]:
        """Every tool's function schema, for a chat template's `tools=`."""
        return [t.schema() for t in self.tools.values()]

    async def call(self, name: str, arguments: Any) -> ToolResult:
        """Run one call; every failure comes back as an error observation, counted in `stats`."""
        tool = self.tools.get(name)
        if tool is None:
            return self._fail("unknown_tool", f"unknown tool {_clip(name)}; available: {sorted(self.tools)}", 0.0)
        problems = argument_errors(tool, arguments)
        if problems:
            more = f"; and {len(problems) - _MAX_ARGUMENT_ERRORS} more" if len(problems) > _MAX_ARGUMENT_ERRORS else ""
            return self._fail("bad_arguments", f"bad arguments for {name}: " + "; ".join(problems[:_MAX_ARGUMENT_ERRORS]) + more, 0.0)
        if not await self._take_slot():
            return self._fail("timeout", f"{name} not run: all {self.max_concurrency} tool slots are held by calls still running past their {self.timeout_s:g} s timeout", 0.0)
        run = _ThreadCall(tool.fn, arguments, self._thread_ended)
        with self._lock:
            self.threads += 1
            self.max_in_flight = max(self.max_in_flight, self.threads)
        try:
            run.start(name)
        except RuntimeError as err:  # the system has no thread to give
            self._thread_ended(run)
            return self._fail("raised", f"{name} could not start: {err}"[:_MAX_ERROR_CHARS], 0.0)
        self._in_flight += 1
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                ok, value = await run.future
        except TimeoutError:
            self._stop_waiting(run)
            return self._fail("timeout", f"{name} timed out after {self.timeout_s:g} s", time.perf_counter() - start)
        except BaseException:  # the caller was cancelled: stop the tool too
            self._stop_waiting(run, timed_out=False)
            raise
        finally:
            self._in_flight -= 1
        seconds = time.perf_counter() - start
        if not ok:
            detail = f"{type(value).__name__}: {value}"[:_MAX_ERROR_CHARS]
            return self._fail("raised", f"{name} failed: {detail}", seconds)
        if not isinstance(value, str):
            return self._fail("bad_result", f"{name} returned {type(value).__name__}, expected text", seconds)
        self.stats.count(None, seconds)
        return ToolResult(text=value, error=None, seconds=seconds)

    async def _take_slot(self) -> bool:
        """Wait for a free slot (False: every slot is held by a thread overrunning its timeout).

        The wait is re-checked every `timeout_s`, so a call queued behind calls that then got
        stuck fails within one `timeout_s` instead of waiting for ever."""
        slots = self._loop_slots()
        while self.overrunning < self.max_concurrency:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await slots.acquire()
                return True
            except TimeoutError:
                continue
        return False

    def _stop_waiting(self, run: _ThreadCall, *, timed_out: bool = True) -> None:
        """The caller stops waiting for `run`: cancel its tool, and count its thread as
        overrunning (after a timeout) until it ends."""
        run.cancel()
        with self._lock:
            if timed_out and not run.ended:
                run.timed_out = True
                self.overrunning += 1

    def _thread_ended(self, run: _ThreadCall) -> None:
        """In the tool's thread, as it ends: give its slot back to the current loop's slots."""
        with self._lock:
            run.ended = True
            self.threads -= 1
            self.overrunning -= int(run.timed_out)
            loop, slots = self._slots_loop, self._slots
        if loop is not None and slots is not None:
            try:
                loop.call_soon_threadsafe(slots.release)
            except RuntimeError:  # that loop is closed: the next loop's slots start without this thread
                pass

    def _loop_slots(self) -> asyncio.Semaphore:
        """The slots of the running event loop (a pool may outlive a loop, e.g. across
        `asyncio.run`): a new loop's slots start with the threads still running taken."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._slots is None or self._slots_loop is not loop:
                self._slots, self._slots_loop = asyncio.Semaphore(self.max_concurrency - self.threads), loop
            return self._slots

    def _fail(self, kind: ToolErrorKind, message: str, seconds: float) -> ToolResult:
        self.stats.count(kind, seconds)
        return ToolResult(text=f"error: {message}", error=kind, seconds=seconds)


def tool_stats(results: Sequence[ToolResult], malformed: int = 0) -> ToolStats:
    """The counts of one env step: its calls' results, and `malformed` turns that made no call."""
    stats = ToolStats()
    for result in results:
        stats.count(result.error, result.seconds)
    for _ in range(malformed):
        stats.count("malformed", call=False)
    return stats
