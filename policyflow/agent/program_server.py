"""The server side of agent-program episodes (issue 19 §7): each episode's own OpenAI endpoint, and
the recording of every call it answers as the episode's segments and `Call`s.

    calls = ProgramCalls(runner)                       # the episode's Generator: limits + recording
    async with episode_route(calls, tokenizer, chat_template) as base_url:
        ...                                            # http://127.0.0.1:PORT/episodes/<route>/v1
    calls.close()                                      # calls.segments, calls.calls: the Trajectory's

**One server per event loop.** The first episode of a loop starts uvicorn on a free port of
127.0.0.1 (no signal handlers, no lifespan, no logging set-up); the last one to leave stops it,
so a loop that ends (an evaluation's `asyncio.run`) leaves nothing behind. Requests under
`/episodes/<route>/` go to the app of `engine/openai_api.py` (`build_app`: the endpoints, exact
ids, log-probs and error bodies of `policyflow serve`), built once per server start, tokenizer
and chat-template setting. The generator that app sees is the requesting episode's: the router
puts it in a context variable for the request, and every task the request starts inherits it.
A route exists only inside its episode's block; a request to any other path gets a 404 body.
Any model name is answered (a harness keeps the one it has); `/v1/models` lists `MODEL_NAME`.

**Recording** (`ProgramCalls`). Every call's exact prompt ids and Sample (completion ids,
behaviour log-probs, per-token versions and policies) become segments: when a call's prompt
starts with the previous call's context followed by its output (a program that appends the
assistant's message and renders the chat again), only the new tokens become an `obs` segment
and the call extends the same training row; otherwise its whole prompt is a fresh `prompt`
segment and it starts a new row (`tokens.episode_rows`, as MEM1's pruned contexts do).

**Sampling and limits.** Calls sample with the run's policy (`sampling.temperature`, top_p,
top_k, GRPO-ATS segment policies, the evaluation's seeds) whatever the program asks, so that
training and evaluation sample as configured; the program's stop strings, stop token ids and
`max_tokens` are kept, its `max_tokens` cut to `sampling.max_new_tokens` and to the room
`agent.max_total_tokens` (and the model's context) leaves. Past `agent.max_turns` calls, or with
no room left, a call gets a 400 error body and the episode ends `truncated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from policyflow.engine.generator import Chunk, Generator, SamplingParams
from policyflow.engine.openai_api import bound_socket, build_app
from policyflow.engine.openai_schema import ApiError
from policyflow.types import Call, FinishReason, Sample, Segment

if TYPE_CHECKING:
    from policyflow.agent.episode import EpisodeRunner

MODEL_NAME = "policy"  # the name /v1/models lists (POLICYFLOW_MODEL in the program's environment)
HOST = "127.0.0.1"
ROUTE_PREFIX = "/episodes/"


def call_params(asked: SamplingParams, run: SamplingParams, room: float) -> SamplingParams:
    """The params a program's call is sampled with: the run's (policy, segment policies, seed),
    the program's stop strings first, then the run's; the program's stop token ids and
    ignore_eos; max_new_tokens = min(asked, run's, room)."""
    return dataclasses.replace(
        run, max_new_tokens=int(min(asked.max_new_tokens, run.max_new_tokens, room)), stop=tuple(dict.fromkeys(asked.stop + run.stop)),
        stop_token_ids=asked.stop_token_ids, ignore_eos=asked.ignore_eos,
    )


class ProgramCalls:
    """The `Generator` one program episode's requests reach: the runner's generator under the run's
    sampling policy and the episode's limits, recording every call (module docstring).

    `segments` and `calls` are the episode's; `truncated_by` names the limit a call hit
    ("max_turns", "max_total_tokens") or is None; after `close()` nothing more is recorded or answered.
    """

    def __init__(self, runner: EpisodeRunner) -> None:
        self.inner, self.tokenizer = runner.generator, runner.tokenizer
        self.params = dataclasses.replace(runner.params, segment_policies=runner.segment_policies)
        self.max_turns, self.max_total_tokens = runner.agent.max_turns, runner.max_total_tokens
        self.segments: list[Segment] = []
        self.calls: list[Call] = []
        self.truncated_by: str | None = None
        self.finish_reason: FinishReason = "eos"
        self.closed = False
        self._admitted = 0
        self._row: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # the last call's (context + output) segment indices and token ids

    @property
    def version(self) -> int:
        return self.inner.version

    @property
    def max_positions(self) -> int | None:
        """None: the server leaves every length check to `_admit`, which cuts max_tokens to fit."""
        return None

    def _admit(self, prompt_ids: Sequence[int], asked: SamplingParams | None) -> SamplingParams:
        if self.closed:
            raise ApiError(400, "this episode is over; its endpoint takes no more calls", None, "episode_over")
        if self._admitted >= self.max_turns:
            self.truncated_by = "max_turns"
            raise ApiError(400, f"this episode has made agent.max_turns={self.max_turns} model calls; no more are allowed (the episode ends truncated)", None, "max_turns_exceeded")
        room = self.max_total_tokens - len(prompt_ids)
        if room < 1:
            self.truncated_by = "max_total_tokens"
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, which leaves no room under this episode's limit of {self.max_total_tokens} tokens per call (agent.max_total_tokens, the model's context); the episode ends truncated", "messages", "context_length_exceeded")
        self._admitted += 1
        return call_params(asked or SamplingParams(), self.params, room)

    def _cut_by_room(self, asked: SamplingParams | None, params: SamplingParams, sample: Sample) -> bool:
        """Whether the room left, not the program's max_tokens or the run's, cut this completion (an episode limit)."""
        wanted = min((asked or SamplingParams()).max_new_tokens, self.params.max_new_tokens)
        return sample.finish_reason == "length" and params.max_new_tokens < wanted

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample:
        sampled = self._admit(prompt_ids, params)
        sample = await self.inner.generate(prompt_ids, sampled, request_id=request_id)
        self._record(prompt_ids, sample, self._cut_by_room(params, sampled, sample))
        return sample

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> AsyncIterator[Chunk]:
        """Admitted now (a refusal raises `ApiError` before the server starts its response), then streamed."""
        sampled = self._admit(prompt_ids, params)
        return self._stream(prompt_ids, params, sampled, request_id)

    async def _stream(self, prompt_ids: Sequence[int], params: SamplingParams | None, sampled: SamplingParams, request_id: str | None) -> AsyncIterator[Chunk]:
        async for chunk in self.inner.stream(prompt_ids, sampled, request_id=request_id):
            if chunk.sample is not None:
                self._record(prompt_ids, chunk.sample, self._cut_by_room(params, sampled, chunk.sample))
            yield chunk

    def cancel(self, request_id: str) -> bool:
        return self.inner.cancel(request_id)

    def close(self) -> None:
        """End the episode: later calls are refused and nothing more is recorded."""
        self.closed = True

    def _record(self, prompt_ids: Sequence[int], sample: Sample, cut_by_room: bool) -> None:
        """Append the call's segments and its `Call`: an extension of the last call's row adds only
        its new tokens (an `obs` segment), any other prompt is a fresh `prompt` segment."""
        if self.closed:
            return
        prompt, turn = tuple(prompt_ids), len(self.calls)
        if self._row is not None and prompt[: len(self._row[1])] == self._row[1]:
            context, new = self._row[0], prompt[len(self._row[1]):]
            if new:
                self.segments.append(Segment("obs", new, turn=turn - 1, text=self.tokenizer.decode(new)))
                context += (len(self.segments) - 1,)
        else:
            self.segments.append(Segment("prompt", prompt, turn=turn, text=self.tokenizer.decode(prompt)))
            context = (len(self.segments) - 1,)
        self.segments.append(Segment("gen", sample.token_ids, sample.logprobs, sample.versions, turn=turn, text=sample.text, policies=sample.policies))
        produced = len(self.segments) - 1
        self.calls.append(Call(context=context, produced=produced))
        self._row = (context + (produced,), prompt + tuple(sample.token_ids))
        self.finish_reason = sample.finish_reason
        if cut_by_room:
            self.truncated_by = "max_total_tokens"


# -- one server per event loop ---------------------------------------------------------------------

_EPISODE: ContextVar[Generator | None] = ContextVar("policyflow_program_episode", default=None)


class _RequestEpisode:
    """The `Generator` the shared app calls: the one of the episode whose request is running."""

    @staticmethod
    def _current() -> Generator:
        generator = _EPISODE.get()
        if generator is None:
            raise RuntimeError("a program episode's app was called outside its episode's route")
        return generator

    @property
    def version(self) -> int:
        return self._current().version

    @property
    def max_positions(self) -> int | None:
        return self._current().max_positions

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample:
        return await self._current().generate(prompt_ids, params, request_id=request_id)

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> AsyncIterator[Chunk]:
        return self._current().stream(prompt_ids, params, request_id=request_id)

    def cancel(self, request_id: str) -> bool:
        return self._current().cancel(request_id)


class EpisodeServer:
    """The HTTP server of one event loop: an ASGI router from `/episodes/<route>/` to the episode's app."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[FastAPI, Generator]] = {}
        self._apps: dict[tuple[int, bool], tuple[object, FastAPI]] = {}  # (id(tokenizer), chat_template) -> (tokenizer, app)
        self._starting: asyncio.Task | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._sock: socket.socket | None = None

    def app_for(self, tokenizer, chat_template: bool) -> FastAPI:
        key = (id(tokenizer), chat_template)
        if key not in self._apps:
            app = build_app(_RequestEpisode(), tokenizer, MODEL_NAME, chat_template, any_model=True)  # any model name is the policy
            self._apps[key] = (tokenizer, app)  # the tokenizer is kept so that its id is not reused
        return self._apps[key][1]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        route = path[len(ROUTE_PREFIX):].split("/", 1)[0] if path.startswith(ROUTE_PREFIX) else ""
        served = self.routes.get(route)
        if served is None or not path[len(ROUTE_PREFIX) + len(route):].startswith("/"):
            body = ApiError(404, f"{scope['method']} {path}: no episode is served here (an episode's endpoint exists only while it runs)", None, "not_found").body()
            await JSONResponse(body, status_code=404)(scope, receive, send)
            return
        app, generator = served
        token = _EPISODE.set(generator)
        try:
            await app({**scope, "root_path": scope.get("root_path", "") + ROUTE_PREFIX + route}, receive, send)
        finally:
            _EPISODE.reset(token)

    async def port(self) -> int:
        """The port, once the server listens (started by the first caller)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> int:
        sock = bound_socket(HOST, 0)
        try:
            config = uvicorn.Config(self, lifespan="off", log_config=None, log_level="warning", access_log=False, proxy_headers=False, server_header=False)
            config.load()
            server = uvicorn.Server(config)
            server.lifespan = config.lifespan_class(config)
            self._uvicorn, self._sock = server, sock
            await server.startup(sockets=[sock])  # no main loop: nothing is left running but the listener
        except BaseException:
            sock.close()
            raise
        return sock.getsockname()[1]

    def stop(self) -> None:
        """Stop listening, close the connections and cancel what their requests still run."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
        server = self._uvicorn
        if server is not None:
            for listener in getattr(server, "servers", []):
                listener.close()
            for connection in list(server.server_state.connections):
                connection.shutdown()
            for task in list(server.server_state.tasks):
                task.cancel()
        if self._sock is not None:
            self._sock.close()


_SERVERS: dict[asyncio.AbstractEventLoop, EpisodeServer] = {}


def running_servers() -> int:
    """How many loops have an episode server up (0 once every episode has left)."""
    return len(_SERVERS)


@contextlib.asynccontextmanager
async def episode_route(generator: Generator, tokenizer, chat_template: bool) -> AsyncIterator[str]:
    """Serve `generator` under a fresh route of this loop's server for the block; yields the base
    URL, `http://127.0.0.1:PORT/episodes/<route>/v1`. The route is removed afterwards, and the
    server stopped when it was the last."""
    loop = asyncio.get_running_loop()
    server = _SERVERS.setdefault(loop, EpisodeServer())
    route = uuid.uuid4().hex
    server.routes[route] = (server.app_for(tokenizer, chat_template), generator)
    try:
        port = await server.port()
        yield f"http://{HOST}:{port}{ROUTE_PREFIX}{route}/v1"
    finally:
        del server.routes[route]
        if not server.routes:
            if _SERVERS.get(loop) is server:
                del _SERVERS[loop]
            server.stop()
