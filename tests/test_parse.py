"""Action parsing: tag and Hermes/Qwen formats, malformed turns, the `<state>` block, tools= rendering."""

from __future__ import annotations

import json

import pytest

from policyflow.agent.parse import (
    FinalAnswer,
    Malformed,
    ParsedTurn,
    ToolCall,
    ToolCalls,
    parse_hermes,
    parse_tags,
    parse_turn,
    stop_strings,
    tag_arguments,
)
from policyflow.model import build_char_tokenizer
from policyflow.tools import Tool

TAGS = {"search": "query"}


async def _noop(query: str) -> str:
    return query


SEARCH = Tool("search", "Look things up.", {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}, _noop)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<search>Zorvia</search>", ParsedTurn(ToolCalls((ToolCall("search", {"query": "Zorvia"}),)))),
        ("I should look. <search> capital of Zorvia </search>", ParsedTurn(ToolCalls((ToolCall("search", {"query": "capital of Zorvia"}),)))),
        ("<answer>Quelm</answer>", ParsedTurn(FinalAnswer("Quelm"))),
        ("<state>pop 48</state><search>Brelk</search>", ParsedTurn(ToolCalls((ToolCall("search", {"query": "Brelk"}),)), "pop 48")),
        ("<state>a</state> <state>b 1</state><answer>49</answer>", ParsedTurn(FinalAnswer("49"), "b 1")),
        ("<answer></answer>", ParsedTurn(FinalAnswer(""))),
    ],
)
def test_tags_well_formed(text, expected):
    assert parse_tags(text, TAGS) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Quelm", "no action; write <search> or <answer>"),
        ("<lookup>Zorvia</lookup>", "no action; write <search> or <answer>"),
        ("<search>Zorvia", "<search> is not closed"),
        ("<search>  </search>", "empty <search>"),
        ("<search>a</search><answer>b</answer>", "2 actions; write one"),
        ("<search>a</search><search>b</search>", "2 actions; write one"),
        ("<state>half <search>a</search>", "<state> is not closed"),
    ],
)
def test_tags_malformed(text, reason):
    assert parse_tags(text, TAGS).action == Malformed(reason)


@pytest.mark.parametrize(
    "text, expected",
    [  # the last <state> decides, read in one pass: its block, or "not closed" (then no earlier one matters)
        ("<state>a<state>b</state><answer>x</answer>", ParsedTurn(FinalAnswer("x"), "b")),
        ("<state>a</state><state>b<answer>x</answer>", ParsedTurn(Malformed("<state> is not closed"))),
        ("<state>" * 1000 + "s</state><search>q</search>", ParsedTurn(ToolCalls((ToolCall("search", {"query": "q"}),)), "s")),
    ],
)
def test_state_blocks_nested_or_unclosed(text, expected):
    assert parse_tags(text, TAGS) == expected
    hermes = parse_hermes(text.replace("<search>q</search>", '<tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>'), ["search"])
    assert hermes == expected


def test_tags_keep_state_when_action_is_unclosed():
    assert parse_tags("<state>x</state><answer>4", TAGS) == ParsedTurn(Malformed("<answer> is not closed"), "x")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<tool_call>\n{"name": "search", "arguments": {"query": "Zorvia"}}\n</tool_call>', ParsedTurn(ToolCalls((ToolCall("search", {"query": "Zorvia"}),)))),
        ('Let me check.<tool_call>{"name": "search"}</tool_call>', ParsedTurn(ToolCalls((ToolCall("search", {}),)))),
        ('<state>s1</state><tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>', ParsedTurn(ToolCalls((ToolCall("search", {"query": "q"}),)), "s1")),
        ("The capital is Quelm.", ParsedTurn(FinalAnswer("The capital is Quelm."))),
        ("<state>s</state>It is <answer>Quelm</answer>.", ParsedTurn(FinalAnswer("Quelm"), "s")),
        ("<state>s</state> Quelm", ParsedTurn(FinalAnswer("Quelm"), "s")),
    ],
)
def test_hermes_well_formed(text, expected):
    assert parse_hermes(text, ["search"]) == expected


def test_hermes_parallel_calls_keep_their_order():
    """Several <tool_call> blocks in one turn (Qwen/Hermes parallel calls) are all read, in the order written."""
    call = lambda q: f'<tool_call>\n{{"name": "search", "arguments": {{"query": "{q}"}}}}\n</tool_call>'  # noqa: E731
    text = "<state>s</state>" + call("Zorvia") + "\n" + call("Kuvi") + "\n" + call("Brelk")
    expected = ToolCalls(tuple(ToolCall("search", {"query": q}) for q in ("Zorvia", "Kuvi", "Brelk")))
    assert parse_hermes(text, ["search"]) == ParsedTurn(expected, "s")
    assert parse_turn("hermes", text, [SEARCH]).action == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ('<tool_call>{"name": "search", "arguments": {"query": "Z"}</tool_call>', "tool call is not valid JSON (Expecting ',' delimiter at char 46)"),
        ('<tool_call>{"name": "browse", "arguments": {}}</tool_call>', "unknown tool 'browse'; available: ['search']"),
        ('<tool_call>{"name": "search", "arguments": {"query": "Z"}}', "<tool_call> is not closed"),
        ('<tool_call>["search"]</tool_call>', 'a tool call must be {"name": <string>, "arguments": <object>}'),
        ('<tool_call>{"name": "search", "arguments": "q"}</tool_call>', 'a tool call must be {"name": <string>, "arguments": <object>}'),
        ('<tool_call>{"name": "search", "arguments": {}}</tool_call><tool_call>{"name": "web"}</tool_call>', "tool call 2: unknown tool 'web'; available: ['search']"),
        ('<tool_call>{"name": "search"}<tool_call>{"name": "search"}</tool_call>', "tool call 1: <tool_call> is not closed"),
        ("It is <answer>Quelm", "<answer> is not closed"),
        ('<tool_call>{"name": "search"}</tool_call><answer>7</answer>', "text after </tool_call>; end the turn after the tool calls"),
        ('<tool_call>{"name": "search"}</tool_call>\n<tool_response>made up</tool_response>', "text after </tool_call>; end the turn after the tool calls"),
        ('<tool_call>{"name": "search"}</tool_call> so <tool_call>{"name": "search"}</tool_call>', "tool call 1: text after </tool_call>; end the turn after the tool calls"),
    ],
)
def test_hermes_malformed(text, reason):
    assert parse_hermes(text, ["search"]).action == Malformed(reason)


def test_parse_turn_stop_strings_and_tag_arguments():
    assert parse_turn("tags", "<search>x</search>", [SEARCH]).action == ToolCalls((ToolCall("search", {"query": "x"}),))
    assert parse_turn("hermes", '<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call>', [SEARCH]).action == ToolCalls((ToolCall("search", {"query": "x"}),))
    assert stop_strings("tags", [SEARCH]) == ("</search>", "</answer>")
    assert stop_strings("hermes", [SEARCH]) == ()  # a Hermes turn may hold several calls: it ends at the end-of-turn token
    assert tag_arguments([SEARCH]) == {"search": "query"}
    two_args = Tool("calc", "", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}, _noop)
    with pytest.raises(ValueError, match="exactly one required string argument"):
        tag_arguments([two_args])
    with pytest.raises(ValueError, match="unknown tool format 'xml'"):
        parse_turn("xml", "", [SEARCH])


# A Qwen-style template written for this test: the tools' JSON inside <tools> in a system turn.
QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n<tools>\n{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_render_prompt_passes_schemas_to_the_chat_template():
    """The one prompt renderer (`tokens.render_prompt`, which the episode runner, SFT and prompt
    fitting share) hands the tools' schemas to the template as `tools=`."""
    from policyflow.tokens import render_prompt

    tok = build_char_tokenizer()
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, "hi", True, tools=[SEARCH.schema()])
    tok.chat_template = QWEN_STYLE
    ids = render_prompt(tok, "Capital of Zorvia?", True, tools=[SEARCH.schema()])
    text = tok.decode(ids)
    tools_block = text.split("<tools>")[1].split("</tools>")[0]
    assert json.loads(tools_block) == SEARCH.schema()
    assert text.endswith("<|im_start|>user\nCapital of Zorvia?<|im_end|>\n<|im_start|>assistant\n")
