"""The OpenAI API's records as `policyflow serve` reads and writes them (layer 1): request bodies,
their validation into `SamplingParams`, error bodies, and the pieces of a response choice.

Pure functions and pydantic records only; the app that uses them is `openai_api.py`.

Request bodies are strict (a string is not a number, `true` is not 1) and refuse unknown fields,
as OpenAI does; messages inside a chat are lenient (a client may send back the assistant message
it got, with fields such as `refusal`). OpenAI parameters the engine cannot honour exactly
(penalties, logit bias, `echo`, alternatives in `top_logprobs`, forced tool choice) are refused
with a 400 that says so, never ignored: a trainer needs the policy's own distribution.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from policyflow.agent.parse import TOOL_CALL_OPEN, ToolCalls, parse_hermes
from policyflow.engine.generator import SamplingParams
from policyflow.types import Sample

MAX_N = 128  # choices per prompt
DEFAULT_MAX_TOKENS = 1024  # a completion's or chat's max_tokens when the request gives none (`policyflow serve --max-tokens`)
MAX_ECHO_CHARS = 80  # a request value quoted in an error message is clipped to this
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # engine -> OpenAI


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else text[: MAX_ECHO_CHARS - 3] + "..."


def validation_error(errors: Sequence[dict]) -> ApiError:
    """The 400 for pydantic's first error (FastAPI's RequestValidationError): malformed JSON, a
    body that is not an object, a wrong type, a value out of range or an unknown field."""
    first = errors[0]
    loc = [str(p) for p in first["loc"][1:]] if first["loc"][:1] == ("body",) else [str(p) for p in first["loc"]]
    kind = first["type"]
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", first["msg"])
        return ApiError(400, f"the request body is not valid JSON ({reason})", None, "json_invalid")
    if not loc or loc[0].isdigit():
        return ApiError(400, "the request body must be a JSON object (send Content-Type: application/json)", None, kind)
    param = loc[0]
    if kind == "extra_forbidden" and len(loc) == 1:
        return ApiError(400, f"unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"{'.'.join(loc)} is required", param, "missing_required_parameter")
    where = ".".join(loc)
    return ApiError(400, f"invalid {where}: {first['msg']} (got {_clip(first.get('input'))})", param, kind)


# -- request bodies --------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """The fields both endpoints share (OpenAI's, plus vLLM's `top_k`, `ignore_eos`, `stop_token_ids`)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="extension: keep the k most probable tokens (0 or -1: off)")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension: never stop on the model's end token")
    stop_token_ids: list[int] | None = Field(None, description="extension: stop on these token ids too (on these only with ignore_eos)")


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class FunctionCall(_Lenient):
    name: str
    arguments: str


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class ChatRequest(_SamplingFields):
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


# -- validation into the engine's terms -------------------------------------------------------------


def refuse_unsupported(req: CompletionRequest | ChatRequest) -> None:
    """A 400 for each OpenAI parameter whose value the engine cannot honour exactly."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is not supported: the server samples the policy's own distribution (training needs its exact log-probs); leave it 0", name, "unsupported_parameter")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported: the server samples the policy's own distribution; leave it empty", "logit_bias", "unsupported_parameter")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise ApiError(400, "echo is not supported (prompt log-probs are not computed); send echo=false", "echo", "unsupported_parameter")
        if req.suffix:
            raise ApiError(400, "suffix is not supported (no insertion); leave it empty", "suffix", "unsupported_parameter")
        if req.best_of not in (None, req.n):
            raise ApiError(400, f"best_of={req.best_of} is not supported; leave it empty (or equal to n)", "best_of", "unsupported_parameter")
        if (req.logprobs or 0) > 1:
            raise ApiError(400, f"logprobs={req.logprobs}: only the sampled token's log-prob is recorded, not alternatives; send logprobs=0 or 1", "logprobs", "unsupported_parameter")
        return
    if req.top_logprobs:
        raise ApiError(400, f"top_logprobs={req.top_logprobs}: only the sampled token's log-prob is recorded, not alternatives; send logprobs=true and top_logprobs=0", "top_logprobs", "unsupported_parameter")
    if req.tool_choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice={_clip(req.tool_choice)} is not supported (the model is not forced); use 'auto' or 'none'", "tool_choice", "unsupported_parameter")
    if req.response_format not in (None, {"type": "text"}):
        raise ApiError(400, f"response_format={_clip(req.response_format)} is not supported (no constrained decoding); use {{'type': 'text'}}", "response_format", "unsupported_parameter")


def stop_strings(req: CompletionRequest | ChatRequest) -> tuple[str, ...]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must be non-empty", "stop", "invalid_value")
    return tuple(stops)


def sampling_params(
    req: CompletionRequest | ChatRequest, prompt_len: int, context: int | None, eos_ids: Collection[int], default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> SamplingParams:
    """The engine's `SamplingParams` for one prompt of `prompt_len` tokens (seed left None: see `with_seed`).

    max_tokens: the request's (chat: max_completion_tokens first), which with the prompt must fit
    `context` (400 `context_length_exceeded`); else `default_max_tokens` (the server's
    `--max-tokens`, for both endpoints: OpenAI's completions default of 16 is too short for a
    reasoning model, and the whole context left would reserve its KV cache for every request)
    cut to the room the context leaves. Stop token ids follow
    vLLM: the model's end tokens (`eos_ids`) and `stop_token_ids`, or with `ignore_eos` only the latter.
    """
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if context is not None and prompt_len >= context:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's maximum context length is {context} tokens, which leaves no room for a completion", "messages" if isinstance(req, ChatRequest) else "prompt", "context_length_exceeded")
    max_tokens = asked or (default_max_tokens if context is None else min(default_max_tokens, context - prompt_len))
    if context is not None and prompt_len + max_tokens > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has {prompt_len} and max_tokens={max_tokens} asks for {prompt_len + max_tokens} in all; lower max_tokens or shorten the prompt", "max_tokens", "context_length_exceeded")
    stop_ids: tuple[int, ...] | None = None
    if req.stop_token_ids is not None:
        stop_ids = tuple(req.stop_token_ids) if req.ignore_eos else tuple(sorted(set(eos_ids) | set(req.stop_token_ids)))
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            max_new_tokens=max_tokens,
            stop=stop_strings(req),
            stop_token_ids=stop_ids,
            ignore_eos=req.ignore_eos and stop_ids is None,
        )
    except ValueError as err:
        raise ApiError(400, str(err), None, "invalid_value") from None


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` of a request with `seed` s: s itself for choice 0 (a one-choice
    request equals `SamplingParams(seed=s)` run locally), else the first 64 bits of
    sha256("s/choice"), so that no choice of one request repeats a choice of another (s + i did:
    choice 1 of seed 5 was choice 0 of seed 6)."""
    if choice == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{choice}".encode()).digest()[:8], "little")


def with_seed(params: SamplingParams, seed: int | None, choice: int) -> SamplingParams:
    """Choice `choice` of a request with `seed` draws with `choice_seed(seed, choice)`."""
    return params if seed is None else dataclasses.replace(params, seed=choice_seed(seed, choice))


def check_token_ids(ids: Sequence[int], vocab: int, where: str) -> None:
    if not ids:
        raise ApiError(400, f"{where} has no tokens; send at least one", "prompt", "invalid_value")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{where} holds token id {bad}, outside this model's vocabulary [0, {vocab})", "prompt", "invalid_value")


def message_content(content: str | list[ContentPart] | None, k: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.type != "text" or part.text is None for part in content):
        raise ApiError(400, f"messages[{k}].content: only text parts are supported", "messages", "invalid_value")
    return "".join(part.text for part in content)


def _arguments(text: str) -> Any:
    """A tool call's arguments as the chat template expects them: the JSON object, when they are one."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def template_messages(messages: Sequence[Message]) -> list[dict]:
    """The chat as dicts for `tokens.render_messages` (Hugging Face's message format)."""
    out = []
    for k, m in enumerate(messages):
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": message_content(m.content, k)}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            item["name"] = m.name
        out.append(item)
    return out


# -- response pieces ---------------------------------------------------------------------------------


def visible_text(sample: Sample, stops: Sequence[str]) -> tuple[str, str | int | None]:
    """(the text OpenAI returns, the `stop_reason`): a stop string ends the text but is not part
    of it; `stop_reason` is that string, the stop token id that ended it, or None ("length")."""
    if sample.finish_reason == "stop":
        stop = max((s for s in stops if sample.text.endswith(s)), key=len, default="")
        return sample.text[: len(sample.text) - len(stop)], stop or None
    if sample.finish_reason == "eos" and sample.token_ids:
        return sample.text, sample.token_ids[-1]
    return sample.text, None


def split_tool_calls(text: str, tool_names: Collection[str], call_id: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an assistant turn: Hermes `<tool_call>{json}</tool_call>` blocks
    (`agent.parse.parse_hermes`) become OpenAI tool calls, the text before them the content
    (None when blank). A turn whose calls are not all well-formed, known tools stays text."""
    at = text.find(TOOL_CALL_OPEN)
    if not tool_names or at < 0:
        return text, []
    action = parse_hermes(text, list(tool_names)).action
    if not isinstance(action, ToolCalls):
        return text, []
    calls = [
        {"id": f"{call_id}-{j}", "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
        for j, c in enumerate(action.calls)
    ]
    return (text[:at] if text[:at].strip() else None), calls


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text (special tokens shown)."""
    return tokenizer.batch_decode([[t] for t in ids]) if ids else []


def completion_logprobs(texts: Sequence[str], logprobs: Sequence[float], top: int, offset: int) -> dict:
    """OpenAI's completions `logprobs` object; `top_logprobs` holds the sampled token only (when `top` is 1)."""
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": list(texts),
        "token_logprobs": list(logprobs),
        "top_logprobs": [{t: lp} for t, lp in zip(texts, logprobs)] if top else None,
        "text_offset": offsets,
    }


def chat_logprobs(texts: Sequence[str], logprobs: Sequence[float]) -> dict:
    """OpenAI's chat `logprobs` object (no alternatives: `top_logprobs` lists are empty)."""
    return {
        "content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []} for t, lp in zip(texts, logprobs)],
        "refusal": None,
    }
