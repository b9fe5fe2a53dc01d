"""Tools an agent calls, and the pool that runs them safely.

A `Tool` is an async callable with a JSON schema for its arguments (the OpenAI/Hugging Face
"function" format, which chat templates render with `tools=`). A `ToolPool` runs calls with a
concurrency limit and a per-call timeout, checks arguments against the schema, and turns every
failure (unknown tool, bad arguments, a tool that raises, returns a non-string or runs past its
timeout) into an error observation: the caller always gets a `ToolResult`, never an exception.
Every call is counted in the pool's `ToolStats` (`pool.stats`); what is logged per training
step is the same record summed over the step's episodes (`Trajectory.tools`, filled from each
step's `ToolResult`s by `tool_stats`), so the counts travel with the episodes to the trainer
in every runtime.

Cancelling the caller (an aborted episode) still cancels the tool: `asyncio.CancelledError`
is not a tool failure and propagates.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from policyflow.types import ToolStats

_MAX_ERROR_CHARS = 200  # an exception message in an observation is clipped to this
ToolErrorKind = Literal["unknown_tool", "bad_arguments", "raised", "bad_result", "timeout"]

# JSON-schema type name -> the Python types that satisfy it (bool is not an integer or number here).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
    "null": (type(None),),
}


@dataclass(frozen=True)
class Tool:
    """A named async callable `fn(**arguments) -> str` whose arguments follow `parameters`.

    `parameters` is a JSON schema of type "object" with "properties" and optional "required"
    and "additionalProperties" (only these, and each property's "type" and "enum", are checked).
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., Awaitable[str]]

    def __post_init__(self) -> None:
        if not inspect.iscoroutinefunction(self.fn) and not inspect.iscoroutinefunction(getattr(self.fn, "__call__", None)):
            raise TypeError(f"tool {self.name!r}: fn must be an async function (async def), got {self.fn!r}")
        if self.parameters.get("type") != "object" or not isinstance(self.parameters.get("properties"), Mapping):
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema with type 'object' and 'properties'")
        for key in self.parameters.get("required", ()):
            if key not in self.parameters["properties"]:
                raise ValueError(f"tool {self.name!r}: required argument {key!r} is not among properties {sorted(self.parameters['properties'])}")
        for key, prop in self.parameters["properties"].items():
            for type_name in _type_names(prop):
                if type_name not in _JSON_TYPES:
                    raise ValueError(f"tool {self.name!r}: argument {key!r} has type {type_name!r}; allowed {sorted(_JSON_TYPES)}")

    def schema(self) -> dict[str, Any]:
        """The tool in the function-calling format chat templates take (`apply_chat_template(tools=[...])`)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}}


def _type_names(prop: Mapping[str, Any]) -> list[str]:
    declared = prop.get("type")
    if declared is None:
        return []
    return [declared] if isinstance(declared, str) else list(declared)


def argument_errors(tool: Tool, arguments: Any) -> list[str]:
    """What is wrong with `arguments` for `tool` (empty when they are valid): missing required
    keys, unknown keys when additionalProperties is false, wrong JSON types, values outside an enum."""
    if not isinstance(arguments, Mapping):
        return [f"arguments must be an object, got {type(arguments).__name__}"]
    props = tool.parameters["properties"]
    errors = [f"missing required argument {key!r}" for key in tool.parameters.get("required", ()) if key not in arguments]
    if tool.parameters.get("additionalProperties", True) is False:
        errors += [f"unknown argument {key!r}; allowed {sorted(props)}" for key in arguments if key not in props]
    for key, value in arguments.items():
        if key not in props:
            continue
        names = _type_names(props[key])
        if names and not any(_is_json_type(value, n) for n in names):
            errors.append(f"argument {key!r} must be {' or '.join(names)}, got {type(value).__name__}")
        if "enum" in props[key] and value not in props[key]["enum"]:
            errors.append(f"argument {key!r} must be one of {list(props[key]['enum'])}, got {value!r}")
    return errors


def _is_json_type(value: Any, type_name: str) -> bool:
    if isinstance(value, bool) and type_name in ("integer", "number"):
        return False
    return isinstance(value, _JSON_TYPES[type_name])


@dataclass(frozen=True)
class ToolResult:
    """The observation text of one call; `error` is None on success, else why it failed."""

    text: str
    error: ToolErrorKind | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


class ToolPool:
    """Runs tool calls with at most `max_concurrency` in flight and `timeout_s` per call.

    `seconds` in a result is the time the tool itself ran (after it got a slot), so queueing
    for a slot is not charged to the tool and does not count towards its timeout.
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
        self.max_in_flight = 0  # the most calls ever running at once
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0

    def schemas(self) -> list[dict[str, Any]]:
        """Every tool's function schema, for a chat template's `tools=`."""
        return [t.schema() for t in self.tools.values()]

    async def call(self, name: str, arguments: Any) -> ToolResult:
        """Run one call; every failure comes back as an error observation, counted in `stats`."""
        tool = self.tools.get(name)
        if tool is None:
            return self._fail("unknown_tool", f"unknown tool {name!r}; available: {sorted(self.tools)}", 0.0)
        problems = argument_errors(tool, arguments)
        if problems:
            return self._fail("bad_arguments", f"bad arguments for {name}: " + "; ".join(problems), 0.0)
        async with self._loop_slots():
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            start = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout_s):  # unlike wait_for, no extra task: a tool
                    text = await tool.fn(**arguments)  # that never awaits finishes without yielding
            except TimeoutError:
                return self._fail("timeout", f"{name} timed out after {self.timeout_s:g} s", time.perf_counter() - start)
            except Exception as err:  # deliberate containment: a tool's bug becomes an observation
                detail = f"{type(err).__name__}: {err}"[:_MAX_ERROR_CHARS]
                return self._fail("raised", f"{name} failed: {detail}", time.perf_counter() - start)
            finally:
                self._in_flight -= 1
        seconds = time.perf_counter() - start
        if not isinstance(text, str):
            return self._fail("bad_result", f"{name} returned {type(text).__name__}, expected text", seconds)
        self.stats.count(None, seconds)
        return ToolResult(text=text, error=None, seconds=seconds)

    def _loop_slots(self) -> asyncio.Semaphore:
        """The semaphore of the running event loop (a pool may outlive a loop, e.g. across `asyncio.run`)."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots, self._slots_loop = asyncio.Semaphore(self.max_concurrency), loop
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
