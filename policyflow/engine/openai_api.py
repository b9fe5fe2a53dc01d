"""An OpenAI-compatible HTTP API over any `Generator` (layer 1): `build_app` makes the FastAPI app.

    app = build_app(engine, tokenizer, model_name="runs/demo/checkpoints/step-40", chat_template=True)
    # `policyflow serve --model DIR` (serve.py) runs it with uvicorn

Endpoints: `GET /v1/models`, `POST /v1/completions` (prompt as text, token ids, or a list of
either), `POST /v1/chat/completions` (the chat template, `tools=`, Hermes tool calls parsed into
`tool_calls`), both with `n`, `stop`, `seed`, `stream` (server-sent events) and `logprobs`;
`GET /health`. Request records and their validation are in `openai_schema.py`.

Every request runs on the server's one event loop, where the generator (an `AsyncEngine`)
decodes: concurrent requests share its running batch. A client that disconnects cancels its
requests (`Generator.cancel`: their rows leave the batch at once).

Exact ids (what a trainer needs): every choice carries the extension fields `prompt_token_ids`
(what the model saw) and `token_ids` (what it produced, the stop token included; in a stream,
the tokens new in that chunk), and with `logprobs` the behaviour log-prob of every token.
`stop_reason` is the stop string or stop token id that ended a "stop" choice. The text follows
OpenAI: a stop string ends it but is not part of it (the ids keep the tokens that made it).
Choice 0 of a request with `seed` s samples with seed s, choice i > 0 with a hash of (s, i)
(`openai_schema.choice_seed`). A request without `max_tokens` gets the server's default
(`build_app(max_tokens=)`, `policyflow serve --max-tokens`, 1024) cut to the room the context leaves.

Errors are OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for a bad request
(never FastAPI's 422), 404 for an unknown model or path, 500 when the generator fails; the
server keeps serving. A stream's calls are admitted before the response starts, so a generator
that refuses one (`ApiError`: an agent-program episode's limits) answers with its own status and
body. `GET /health` answers 503 with the error once the generator has failed for good (an
`AsyncEngine` whose decode step raised, e.g. out of memory).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from policyflow.agent.parse import TOOL_CALL_OPEN
from policyflow.engine.async_engine import safe_text_end
from policyflow.engine.generator import Chunk, Generator, SamplingParams
from policyflow.engine.openai_schema import (
    DEFAULT_MAX_TOKENS,
    FINISH_REASONS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    check_token_ids,
    completion_logprobs,
    refuse_unsupported,
    sampling_params,
    split_tool_calls,
    stop_strings,
    template_messages,
    token_texts,
    validation_error,
    visible_text,
    with_seed,
)
from policyflow.tokens import render_messages, render_prompt
from policyflow.types import Sample

CLIENT_GONE = 499  # the status logged for a request whose client disconnected (nginx's convention)


@dataclass(frozen=True)
class Job:
    """One choice to generate: its request id, prompt ids and sampling parameters."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams


@dataclass
class _Streamed:
    """What one streamed choice has sent so far."""

    text: str = ""  # the chunks' text so far
    sent: int = 0  # characters of `text` already sent
    offset: int = 0  # characters of token texts sent (completions' text_offset)
    started: bool = False


class _EventStream(StreamingResponse):
    """Server-sent events from `events(gone)`, where `gone` is a future that completes when the
    client disconnects; the iterator is closed however the response ends (closing it cancels the
    requests). Starlette's own disconnect watch cancels the response through an anyio cancel
    scope, which never lands while every loop turn wakes the response (a decode step per turn)."""

    media_type = "text/event-stream"

    def __init__(self, events: Callable[[asyncio.Future], AsyncIterator[str]], on_close: Callable[[], None]):
        self.gone = asyncio.get_running_loop().create_future()
        self.on_close = on_close  # cancels the requests, even when the response never started
        super().__init__(events(self.gone), headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        watch = asyncio.ensure_future(_disconnected(receive, self.gone))
        try:
            await self.stream_response(send)
        finally:
            watch.cancel()
            await self.body_iterator.aclose()
            self.on_close()


def _event(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _disconnected(receive: Callable, gone: asyncio.Future | None = None) -> None:
    """Return when the client has gone (the body is read: the next ASGI message is the
    disconnect), completing `gone` if given. `receive`: the ASGI receive (`request.receive`)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if gone is not None and not gone.done():
        gone.set_result(None)


class OpenAIServer:
    """The endpoints' logic over one generator; `build_app` routes to it."""

    def __init__(self, generator: Generator, tokenizer, model_name: str, chat_template: bool, eos_token_ids: Collection[int] | None = None, any_model: bool = False, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.generator, self.tokenizer, self.model_name, self.chat_template = generator, tokenizer, model_name, chat_template
        self.any_model, self.max_tokens = any_model, max_tokens
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = frozenset(eos_token_ids if eos_token_ids is not None else ([eos] if eos is not None else []))
        self.vocab = len(tokenizer)

    # -- shared -------------------------------------------------------------------------------
    def models(self) -> dict:
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "policyflow", "max_model_len": self.generator.max_positions}
        return {"object": "list", "data": [card]}

    def _check_model(self, name: str) -> None:
        if name != self.model_name and not self.any_model:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} (GET /v1/models)", "model", "model_not_found")

    def _jobs(self, base: str, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], n: int, seed: int | None) -> list[Job]:
        return [Job(f"{base}-{p * n + i}", tuple(ids), with_seed(sp, seed, i)) for p, (ids, sp) in enumerate(zip(prompts, params)) for i in range(n)]

    async def _generate_all(self, jobs: Sequence[Job], http: Request) -> list[Sample] | None:
        """Every job's Sample, in order; None when the client disconnected first (the jobs are cancelled)."""
        tasks = [asyncio.ensure_future(self.generator.generate(j.prompt_ids, j.params, request_id=j.request_id)) for j in jobs]
        everything = asyncio.gather(*tasks)
        everything.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning when cancelled
        gone = asyncio.ensure_future(_disconnected(http.receive))
        try:
            await asyncio.wait([everything, gone], return_when=asyncio.FIRST_COMPLETED)
            return everything.result() if everything.done() else None
        finally:
            gone.cancel()
            everything.cancel()  # a no-op when done; else it cancels the tasks (and is not left unretrieved)
            self._cancel(jobs, tasks)

    def _cancel(self, jobs: Sequence[Job], tasks: Sequence[asyncio.Future]) -> None:
        for job, task in zip(jobs, tasks):
            if not task.done():
                task.cancel()
                self.generator.cancel(job.request_id)

    async def _open_streams(self, jobs: Sequence[Job]) -> list[AsyncIterator[Chunk]]:
        """Every job's `Generator.stream`, opened before the response starts: a generator that
        refuses a call when it is opened (`ApiError`) answers with its own status and body."""
        streams: list[AsyncIterator[Chunk]] = []
        try:
            for job in jobs:
                streams.append(self.generator.stream(job.prompt_ids, job.params, request_id=job.request_id))
        except BaseException:
            self._cancel_all(jobs)
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    def _cancel_all(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.generator.cancel(job.request_id)

    def _event_stream(self, jobs: Sequence[Job], streams: Sequence[AsyncIterator[Chunk]], on_chunk: Callable[[int, Chunk], dict], usage: Callable[[list[Sample]], dict] | None) -> _EventStream:
        return _EventStream(lambda gone: self._stream(jobs, streams, on_chunk, usage, gone), lambda: self._cancel_all(jobs))

    async def _stream(self, jobs: Sequence[Job], streams: Sequence[AsyncIterator[Chunk]], on_chunk: Callable[[int, Chunk], dict], usage: Callable[[list[Sample]], dict] | None, gone: asyncio.Future) -> AsyncIterator[str]:
        """Events of every job's chunks (from its opened `streams`) as they come (`on_chunk(job
        index, chunk)` -> event), the usage event when asked, then [DONE]. It ends when `gone`
        completes (the client left); ending or closing it cancels the jobs still running. A
        stream that fails, or ends without its last chunk (the Sample), ends it with an error event."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int, stream: AsyncIterator[Chunk]) -> None:
            last = False
            try:
                async for chunk in stream:
                    queue.put_nowait((k, chunk))
                    last = chunk.sample is not None
                if not last:
                    queue.put_nowait((k, RuntimeError(f"the generator's stream of choice {k} ended without its last chunk (the Sample)")))
            except Exception as err:  # the generator failed or refused: the client gets an error event
                queue.put_nowait((k, err))

        tasks = [asyncio.ensure_future(pump(k, stream)) for k, stream in enumerate(streams)]
        samples: list[Sample] = []
        try:
            while len(samples) < len(jobs):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, gone], return_when=asyncio.FIRST_COMPLETED)
                if gone.done():  # first, or a busy stream (a chunk every step) would never see it
                    getter.cancel()
                    return
                k, item = getter.result()
                if isinstance(item, ApiError):
                    yield _event(item.body())
                    return
                if isinstance(item, Exception):
                    yield _event(ApiError(500, f"generation failed: {type(item).__name__}: {item}", kind="server_error").body())
                    return
                yield _event(on_chunk(k, item))
                if item.sample is not None:
                    samples.append(item.sample)
            if usage is not None:
                yield _event(usage(samples))
            yield _event("[DONE]")
        finally:
            self._cancel(jobs, tasks)

    def _usage(self, prompts: Sequence[Sequence[int]], samples: Sequence[Sample]) -> dict:
        prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(len(s.token_ids) for s in samples)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def _head(self, kind: str, rid: str, created: int) -> dict:
        return {"id": rid, "object": kind, "created": created, "model": self.model_name}

    # -- /v1/completions ----------------------------------------------------------------------
    def _completion_prompts(self, prompt: str | list) -> list[list[int]]:
        items = [prompt] if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)) else list(prompt)
        if not items:
            raise ApiError(400, "prompt is empty; send text, token ids, or a list of either", "prompt", "invalid_value")
        prompts = [render_prompt(self.tokenizer, p, chat_template=False) if isinstance(p, str) else list(p) for p in items]
        for k, ids in enumerate(prompts):
            check_token_ids(ids, self.vocab, "the prompt" if len(prompts) == 1 else f"prompt {k}")
        return prompts

    async def completions(self, req: CompletionRequest, http: Request) -> dict | Response:
        self._check_model(req.model)
        refuse_unsupported(req)
        prompts = self._completion_prompts(req.prompt)
        context = self.generator.max_positions
        params = [sampling_params(req, len(p), context, self.eos_ids, self.max_tokens) for p in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = self._jobs(rid, prompts, params, req.n, req.seed)
        head = self._head("text_completion", rid, int(time.time()))
        stops, top = stop_strings(req), req.logprobs
        if req.stream:
            states = [_Streamed() for _ in jobs]

            def on_chunk(k: int, chunk: Chunk) -> dict:
                state, sample = states[k], chunk.sample
                text = self._delta(state, chunk, stops, ())
                choice = {"index": k, "text": text, "logprobs": None, "finish_reason": None, "token_ids": list(chunk.token_ids)}
                if top is not None:
                    texts = token_texts(self.tokenizer, chunk.token_ids)
                    choice["logprobs"] = completion_logprobs(texts, chunk.logprobs, top, state.offset)
                    state.offset += sum(map(len, texts))
                if not state.started:
                    state.started, choice["prompt_token_ids"] = True, list(jobs[k].prompt_ids)
                if sample is not None:
                    choice["finish_reason"] = FINISH_REASONS.get(sample.finish_reason, sample.finish_reason)
                    choice["stop_reason"] = visible_text(sample, stops)[1]
                return {**head, "choices": [choice]}

            usage = (lambda samples: {**head, "choices": [], "usage": self._usage(prompts, samples)}) if req.stream_options and req.stream_options.include_usage else None
            return self._event_stream(jobs, await self._open_streams(jobs), on_chunk, usage)
        samples = await self._generate_all(jobs, http)
        if samples is None:
            return Response(status_code=CLIENT_GONE)
        choices = []
        for k, (job, sample) in enumerate(zip(jobs, samples)):
            text, stop_reason = visible_text(sample, stops)
            choice = {"index": k, "text": text, "logprobs": None, "finish_reason": FINISH_REASONS.get(sample.finish_reason, sample.finish_reason), "stop_reason": stop_reason}
            if top is not None:
                choice["logprobs"] = completion_logprobs(token_texts(self.tokenizer, sample.token_ids), sample.logprobs, top, 0)
            choices.append({**choice, "prompt_token_ids": list(job.prompt_ids), "token_ids": list(sample.token_ids)})
        return {**head, "choices": choices, "usage": self._usage(prompts, samples)}

    def _delta(self, state: _Streamed, chunk: Chunk, stops: Sequence[str], holds: Sequence[str]) -> str:
        """The text a chunk adds to a streamed choice: held back while it may still turn out to be
        a stop string or one of `holds` (chat: the start of a tool call); the last chunk sends the
        rest of the choice's visible text (no stop string)."""
        state.text += chunk.text
        if chunk.sample is None:
            end = safe_text_end(state.text, (*stops, *holds))
            for hold in holds:
                at = state.text.find(hold)
                end = min(end, at) if at >= 0 else end
        else:
            visible = visible_text(chunk.sample, stops)[0]
            end = len(visible) if visible.startswith(state.text[: state.sent]) else state.sent
            state.text = visible
        end = max(end, state.sent)
        delta, state.sent = state.text[state.sent : end], end
        return delta

    # -- /v1/chat/completions -----------------------------------------------------------------
    async def chat(self, req: ChatRequest, http: Request) -> dict | Response:
        self._check_model(req.model)
        refuse_unsupported(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            prompt = render_messages(self.tokenizer, template_messages(req.messages), self.chat_template, tools=tools)
        except ValueError as err:
            raise ApiError(400, f"the messages cannot be rendered for this model: {str(err).splitlines()[0]}", "messages", "invalid_value") from None
        except Exception as err:  # the template itself raised (jinja: a role or shape it does not take)
            raise ApiError(400, f"the chat template refused the messages: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", "messages", "invalid_value") from None
        check_token_ids(prompt, self.vocab, "the rendered chat")
        params = sampling_params(req, len(prompt), self.generator.max_positions, self.eos_ids, self.max_tokens)
        key = uuid.uuid4().hex
        rid = f"chatcmpl-{key}"
        jobs = self._jobs(rid, [prompt], [params], req.n, req.seed)
        names = [t["function"]["name"] for t in tools or []] if req.tool_choice != "none" else []
        stops = stop_strings(req)
        if req.stream:
            return self._chat_stream(req, jobs, await self._open_streams(jobs), rid, f"call_{key}", names, stops)
        samples = await self._generate_all(jobs, http)
        if samples is None:
            return Response(status_code=CLIENT_GONE)
        choices = []
        for k, (job, sample) in enumerate(zip(jobs, samples)):
            text, stop_reason = visible_text(sample, stops)
            content, calls = split_tool_calls(text, names, f"call_{key}-{k}")
            message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            finish = "tool_calls" if calls else FINISH_REASONS.get(sample.finish_reason, sample.finish_reason)
            logprobs = chat_logprobs(token_texts(self.tokenizer, sample.token_ids), sample.logprobs) if req.logprobs else None
            choices.append({"index": k, "message": message, "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason,
                            "prompt_token_ids": list(job.prompt_ids), "token_ids": list(sample.token_ids)})
        return {**self._head("chat.completion", rid, int(time.time())), "choices": choices, "usage": self._usage([prompt], samples)}

    def _chat_stream(self, req: ChatRequest, jobs: Sequence[Job], streams: Sequence[AsyncIterator[Chunk]], rid: str, call_id: str, names: Sequence[str], stops: Sequence[str]) -> Response:
        head = self._head("chat.completion.chunk", rid, int(time.time()))
        states = [_Streamed() for _ in jobs]
        holds = (TOOL_CALL_OPEN,) if names else ()

        def on_chunk(k: int, chunk: Chunk) -> dict:
            state, sample, before = states[k], chunk.sample, states[k].sent
            text = self._delta(state, chunk, stops, holds)
            delta: dict = {}
            choice: dict = {"index": k, "delta": delta, "logprobs": None, "finish_reason": None, "token_ids": list(chunk.token_ids)}
            if not state.started:
                state.started, delta["role"], choice["prompt_token_ids"] = True, "assistant", list(jobs[k].prompt_ids)
            calls: list[dict] = []
            if sample is not None:
                _, calls = split_tool_calls(state.text, names, f"{call_id}-{k}")
                if calls:  # the held-back text from the first <tool_call> on is the calls, not content
                    text = state.text[before : max(before, state.text.find(TOOL_CALL_OPEN))]
                choice["finish_reason"] = "tool_calls" if calls else FINISH_REASONS.get(sample.finish_reason, sample.finish_reason)
                choice["stop_reason"] = visible_text(sample, stops)[1]
            if text or "role" in delta:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(calls)]
            if req.logprobs:
                choice["logprobs"] = chat_logprobs(token_texts(self.tokenizer, chunk.token_ids), chunk.logprobs)
            return {**head, "choices": [choice]}

        usage = (lambda samples: {**head, "choices": [], "usage": self._usage([jobs[0].prompt_ids], samples)}) if req.stream_options and req.stream_options.include_usage else None
        return self._event_stream(jobs, streams, on_chunk, usage)


def build_app(
    generator: Generator, tokenizer, model_name: str, chat_template: bool, *,
    eos_token_ids: Collection[int] | None = None, any_model: bool = False, max_tokens: int = DEFAULT_MAX_TOKENS,
) -> FastAPI:
    """The FastAPI app serving `generator` as `model_name` (see the module docstring).

    `chat_template`: render chats with the tokenizer's template (else `tokens.render_messages`'
    plain form: system messages and one user message). `eos_token_ids`: the ids the generator
    stops on by default (the engine's `core.eos_ids`), which `stop_token_ids` adds to; default
    the tokenizer's EOS. `any_model`: answer requests whatever model they name (an agent
    program's episode endpoint, where the policy is the only model); else an unknown name is a 404.
    `max_tokens`: a request's max_tokens when it gives none (cut to the room the context leaves)."""
    server = OpenAIServer(generator, tokenizer, model_name, chat_template, eos_token_ids, any_model, max_tokens)
    app = FastAPI(title="policyflow", summary=f"OpenAI-compatible API serving {model_name}", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        error = validation_error(err.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {err.detail}" + ("; the endpoints are /v1/models, /v1/completions, /v1/chat/completions" if err.status_code in (404, 405) else "")
        return JSONResponse(ApiError(err.status_code, message, None, code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        error = getattr(generator, "error", None)  # AsyncEngine: the error that stopped its decode loop
        if error is not None:
            return JSONResponse({"status": "error", "error": f"{type(error).__name__}: {error}"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return server.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await server.chat(body, request)

    return app


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one (`sock.getsockname()[1]`).

    Made with proto IPPROTO_TCP, so that asyncio sets TCP_NODELAY on every accepted connection
    (it does only for sockets that say they are TCP): without it a reply written in two pieces
    (head, body) waits for the client's delayed ACK, about 40 ms per request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock
