"""Reading one action from a model turn, in the tag format or the Hermes/Qwen tool-call format.

Tag format (tiny models, tools described in the prompt)::

    <state>what I know so far</state><search>Zorvia</search>
    <answer>Quelm</answer>

Code, for tiny models, is one more tag: `<code>print(1234*567)</code>` calls the tool named `code`
(`tools/python_tool.py`) with the block's source, dedented (a block indented as a whole runs);
chat models call the `python` tool in their own format. The code segment is exactly the text
between `<code>` and `</code>`, the markers the engine's per-segment sampling looks for.

Hermes/Qwen chat format (real chat models, tools rendered by the chat template's `tools=`)::

    <tool_call>
    {"name": "search", "arguments": {"query": "Zorvia"}}
    </tool_call>
    <tool_call>
    {"name": "search", "arguments": {"query": "Kuvi"}}
    </tool_call>

A tag-format turn holds one action, and the env's stop strings (`stop_strings`) end generation
right after it. A Hermes turn may make several tool calls (parallel calls, as Qwen and Hermes
models write them), so it ends at the model's end-of-turn token instead; the env runs them all
at once and answers with one tool message per call, in order. A `<state>…</state>` block
(MEM1's internal state) may come before the action; the last one is returned with it. A turn
that is not one well-formed action (or, in Hermes, well-formed calls only) becomes
`Malformed(reason)`, which the env answers with an error observation (and counts).

Model output is untrusted input: both parsers are total. Whatever the text (any length, NUL
bytes, nested or unbalanced tags, JSON nested thousands deep, numbers with thousands of digits,
`NaN`), they return a `ParsedTurn` and never raise, and their work grows linearly with the text
(no regex that backtracks, no search that restarts from every tag). A tool call's JSON must be
standard JSON with finite numbers and strings that are text (no lone surrogates), nested at
most `MAX_ARGUMENT_DEPTH` deep (deeper values would reach Python's recursion limit where the
episode is logged or sent between processes); anything else is a malformed turn. Model text
quoted in a reason is clipped to `MAX_ECHO_CHARS`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import textwrap
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policyflow.tools.base import Tool

ANSWER_TAG = "answer"
STATE_TAG = "state"
CODE_TAG = "code"  # the code tool's tag (`<code>print(1)</code>`); its content keeps its line structure (dedented, not stripped per line)
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_FORMATS = ("tags", "hermes")
MAX_ARGUMENT_DEPTH = 32  # nesting of a tool call's JSON (the call object is level 1): far above any tool's schema, far below the recursion limit
MAX_ECHO_CHARS = 80  # model text quoted in a malformed turn's reason (an unknown tool's name) is clipped to this


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCalls:
    """The tool calls of one turn, in the order written (one in the tag format)."""

    calls: tuple[ToolCall, ...]


@dataclass(frozen=True)
class FinalAnswer:
    text: str


@dataclass(frozen=True)
class Malformed:
    reason: str


Action = ToolCalls | FinalAnswer | Malformed


@dataclass(frozen=True)
class ParsedTurn:
    """The action of one model turn and the `<state>` text written before it (None if none)."""

    action: Action
    state: str | None = None


def _open_tags(text: str, names: Collection[str]) -> list[tuple[int, str]]:
    """(position, name) of every opening `<name>` in `text`, in order."""
    pattern = re.compile("<(" + "|".join(re.escape(n) for n in sorted(names)) + ")>")
    return [(m.start(), m.group(1)) for m in pattern.finditer(text)]


def _block(text: str, name: str, start: int) -> tuple[str, int] | None:
    """The content of the `<name>…</name>` block opening at `start`, and the index after it; None if unclosed."""
    begin = start + len(name) + 2
    end = text.find(f"</{name}>", begin)
    return None if end < 0 else (text[begin:end], end + len(name) + 3)


def _last_state(text: str) -> tuple[str | None, str | None]:
    """(the last `<state>` content, an error) for the text before the action: the error when
    the last `<state>` is not closed (then none before it is either). One pass over the text."""
    opens = _open_tags(text, [STATE_TAG])
    if not opens:
        return None, None
    block = _block(text, STATE_TAG, opens[-1][0])
    if block is None:
        return None, f"<{STATE_TAG}> is not closed"
    return block[0].strip(), None


def _clip(value: object) -> str:
    """`repr(value)`, clipped to `MAX_ECHO_CHARS` characters."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 3] + "..."


def _total(parse: Callable[..., ParsedTurn]) -> Callable[..., ParsedTurn]:
    """Make a parser of model output total: anything it raises (it should raise nothing; this is
    the net for what was not foreseen) becomes a malformed turn naming the exception type."""

    @functools.wraps(parse)
    def parse_or_malformed(text: str, tools: Any) -> ParsedTurn:
        try:
            return parse(text, tools)
        except Exception as err:  # deliberate containment: model output never ends a run
            return ParsedTurn(Malformed(f"the turn could not be read ({type(err).__name__})"))

    return parse_or_malformed


@_total
def parse_tags(text: str, tools: Mapping[str, str]) -> ParsedTurn:
    """Read a tag-format turn. `tools` maps each tool's tag to the argument its content fills
    (`{"search": "query"}` turns `<search>q</search>` into `ToolCall("search", {"query": "q"})`)."""
    opens = _open_tags(text, [*tools, ANSWER_TAG])
    if not opens:
        expected = " or ".join(f"<{n}>" for n in [*tools, ANSWER_TAG])  # short ASCII: models see this within agent.max_obs_tokens
        return ParsedTurn(Malformed(f"no action; write {expected}"))
    if len(opens) > 1:
        return ParsedTurn(Malformed(f"{len(opens)} actions; write one"))
    start, name = opens[0]
    state, error = _last_state(text[:start])
    if error:
        return ParsedTurn(Malformed(error))
    block = _block(text, name, start)
    if block is None:
        return ParsedTurn(Malformed(f"<{name}> is not closed"), state)
    content = textwrap.dedent(block[0]).strip() if name == CODE_TAG else block[0].strip()
    if name == ANSWER_TAG:
        return ParsedTurn(FinalAnswer(content), state)
    if not content:
        return ParsedTurn(Malformed(f"empty <{name}>"), state)
    return ParsedTurn(ToolCalls((ToolCall(name, {tools[name]: content}),)), state)


@_total
def parse_hermes(text: str, tools: Collection[str]) -> ParsedTurn:
    """Read a Hermes/Qwen turn: each `<tool_call>{"name", "arguments"}</tool_call>` is a tool call
    (several make parallel calls); a turn without one is the final answer (the content of
    `<answer>` if present, else the text). One bad call, or text after a call other than white
    space (an invented `<tool_response>`, an answer in the same turn), makes the whole turn malformed."""
    starts = [m.start() for m in re.finditer(re.escape(TOOL_CALL_OPEN), text)]
    state, error = _last_state(text[: starts[0]] if starts else text)
    if error:
        return ParsedTurn(Malformed(error))
    if not starts:
        answer = _open_tags(text, [ANSWER_TAG])
        if answer:
            block = _block(text, ANSWER_TAG, answer[-1][0])
            if block is None:
                return ParsedTurn(Malformed(f"<{ANSWER_TAG}> is not closed"), state)
            return ParsedTurn(FinalAnswer(block[0].strip()), state)
        return ParsedTurn(FinalAnswer(re.sub(r"<state>.*?</state>", "", text, flags=re.DOTALL).strip()), state)
    calls = []
    for k, start in enumerate(starts):
        call = _hermes_call(text, start, starts[k + 1] if k + 1 < len(starts) else len(text), tools)
        if isinstance(call, Malformed):
            return ParsedTurn(Malformed(f"tool call {k + 1}: {call.reason}") if len(starts) > 1 else call, state)
        calls.append(call)
    return ParsedTurn(ToolCalls(tuple(calls)), state)


def _hermes_call(text: str, start: int, limit: int, tools: Collection[str]) -> ToolCall | Malformed:
    """The call in the `<tool_call>` block opening at `start`, which must close before `limit` (the
    next block, or the end of the turn) with nothing but white space after it."""
    end = text.find(TOOL_CALL_CLOSE, start, limit)
    if end < 0:
        return Malformed(f"{TOOL_CALL_OPEN} is not closed")
    if text[end + len(TOOL_CALL_CLOSE) : limit].strip():
        return Malformed(f"text after {TOOL_CALL_CLOSE}; end the turn after the tool calls")
    body = text[start + len(TOOL_CALL_OPEN) : end]
    try:
        call = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        return Malformed(f"tool call is not valid JSON ({err.msg} at char {err.pos})")
    except RecursionError:
        return Malformed(f"tool call JSON is nested deeper than {MAX_ARGUMENT_DEPTH} levels")
    except ValueError as err:  # a non-finite number, or an integer over Python's digit limit
        return Malformed(f"tool call JSON has a number that is not a finite JSON number ({str(err)[:MAX_ECHO_CHARS]})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not isinstance(call.get("arguments", {}), dict):
        return Malformed('a tool call must be {"name": <string>, "arguments": <object>}')
    problem = _json_problem(call)
    if problem:
        return Malformed(problem)
    if call["name"] not in tools:
        return Malformed(f"unknown tool {_clip(call['name'])}; available: {sorted(tools)}")
    return ToolCall(call["name"], dict(call.get("arguments", {})))


def _refuse_constant(name: str) -> Any:
    """`json.loads(parse_constant=...)`: `NaN`, `Infinity` and `-Infinity` are not JSON."""
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    """`json.loads(parse_float=...)`: a float literal, refused when it overflows (`1e999`)."""
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"{literal[:MAX_ECHO_CHARS]} overflows a float")
    return value


def _json_problem(value: Any) -> str | None:
    """What makes parsed JSON unfit for a tool call (None: nothing): lists/objects nested more
    than `MAX_ARGUMENT_DEPTH` deep, or a string holding a lone surrogate (`"\\ud800"` is valid
    JSON but not text: it cannot be encoded, logged as UTF-8 or tokenized). Iterative, so no
    depth reaches the recursion limit."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return "tool call JSON holds a lone surrogate (a \\ud800-\\udfff escape not in a pair), which is not text"
        elif isinstance(item, (dict, list)):
            if depth > MAX_ARGUMENT_DEPTH:
                return f"tool call JSON is nested deeper than {MAX_ARGUMENT_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def tag_arguments(tools: Sequence[Tool]) -> dict[str, str]:
    """For the tag format: each tool's tag -> its one required argument, which must be a string."""
    mapping = {}
    for tool in tools:
        required = list(tool.parameters.get("required", ()))
        props = tool.parameters["properties"]
        if len(required) != 1 or props[required[0]].get("type") != "string":
            raise ValueError(f"tool {tool.name!r} cannot be called with tags: it needs exactly one required string argument, has required={required}")
        if tool.name in (ANSWER_TAG, STATE_TAG):
            raise ValueError(f"a tool cannot be named {tool.name!r}: <{tool.name}> is reserved in the tag format")
        mapping[tool.name] = required[0]
    return mapping


def stop_strings(tool_format: str, tools: Sequence[Tool]) -> tuple[str, ...]:
    """The strings that end a turn right after its action: `</tool>` / `</answer>` tags; none
    for Hermes, whose turns may hold several calls and end at the model's end-of-turn token."""
    if tool_format == "tags":
        return tuple(f"</{name}>" for name in [*tag_arguments(tools), ANSWER_TAG])
    if tool_format == "hermes":
        return ()
    raise ValueError(f"unknown tool format {tool_format!r}; choose one of {list(TOOL_FORMATS)}")


def parse_turn(tool_format: str, text: str, tools: Sequence[Tool]) -> ParsedTurn:
    """Parse `text` in `tool_format` ('tags' or 'hermes') against `tools`; never raises for any
    `text` (a bad `tool_format` or tool definition raises: those are configuration errors)."""
    if tool_format not in TOOL_FORMATS:
        raise ValueError(f"unknown tool format {tool_format!r}; choose one of {list(TOOL_FORMATS)}")
    if tool_format == "tags":
        return parse_tags(text, tag_arguments(tools))  # tag_arguments outside the parser's net: a bad tool is the user's error, loud
    return parse_hermes(text, [t.name for t in tools])

