"""`RemoteGenerator`: the `Generator` protocol over an OpenAI-compatible `/v1/completions` endpoint (layer 1).

    generator = RemoteGenerator("http://127.0.0.1:8000/v1")          # the first model it lists
    sample = await generator.generate(prompt_ids, SamplingParams(max_new_tokens=64, seed=3))

Prompts go as token ids, never text, and the completion's ids come back from the extension field
`token_ids` (`policyflow serve` sends it, with `prompt_token_ids`); an endpoint that returns only
text is refused with one line: training needs the exact ids. Behaviour log-probs come from
`logprobs.token_logprobs` (`logprobs=1`). `SamplingParams` map to OpenAI's fields (`seed`
included) plus vLLM's `top_k`, `ignore_eos` and `stop_token_ids` when they are not the default:
a request's own `stop_token_ids` replace the model's end tokens, so they go with `ignore_eos`.
`segment_policies` cannot be sent and are refused. `stop_reason` (the stop string, else a stop
token) tells "stop" from "eos"; the Sample's text ends with the stop string, as the engine's
does. Against `policyflow serve`, `generate` returns the Sample the local `AsyncEngine` would
(greedy, or with a seed).

`version` is the one given (a remote endpoint does not say which weights it holds);
`max_positions` is the model's `max_model_len` in `/v1/models`, when listed. `cancel(request_id)`
closes the request's connection, which cancels it on the server; the caller's `generate` or
`stream` raises `asyncio.CancelledError`.

Construct it outside the event loop thread of the server it talks to: `__init__` reads
`/v1/models` with a blocking call. One HTTP client per event loop (`generate_blocking` runs each
call on a fresh loop), closed when that loop shuts down (`asyncio.run`'s end: the loop's
`shutdown_asyncgens`), so blocking runs leave no sockets open; `aclose()` closes this loop's
client now and `close()` (from synchronous code) the ones left.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from policyflow.engine.generator import Chunk, SamplingParams
from policyflow.types import FinishReason, Sample


class RemoteError(RuntimeError):
    """An endpoint that refused a request, failed, or cannot give what training needs; one line."""


class RemoteGenerator:
    """A `Generator` for the model `model` (None: the first `/v1/models` lists) served at `base_url` (with `/v1`)."""

    def __init__(self, base_url: str, model: str | None = None, *, timeout_s: float = 600.0, version: int = 0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._version = int(version)
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._closers: dict[asyncio.AbstractEventLoop, AsyncIterator[None]] = {}  # per loop: closes its client at the loop's shutdown
        self._tasks: dict[str, asyncio.Task] = {}  # request id -> the task holding its connection
        try:
            listed = httpx.get(f"{self.base_url}/models", headers=self.headers, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise RemoteError(f"cannot reach {self.base_url}/models ({type(err).__name__}: {err}); give the server's base URL including /v1") from None
        cards = _json(listed, f"{self.base_url}/models").get("data") or []
        names = [c.get("id") for c in cards]
        if not names:
            raise RemoteError(f"{self.base_url}/models lists no model")
        if model is not None and model not in names:
            raise RemoteError(f"{self.base_url} does not serve model {model!r}; it lists {names}")
        self.model = model if model is not None else names[0]
        card = cards[names.index(self.model)]
        positions = card.get("max_model_len")
        self._max_positions = positions if isinstance(positions, int) else None

    # -- the Generator protocol ---------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    @property
    def max_positions(self) -> int | None:
        return self._max_positions

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample:
        """One completion of `prompt_ids` (see the module docstring)."""
        params = params or SamplingParams()
        body = self.request_body(prompt_ids, params, stream=False)
        task = asyncio.ensure_future(self._post(body))
        self._hold(request_id, task)
        try:
            reply = await task
        finally:
            self._release(request_id, task)
        choice = (reply.get("choices") or [None])[0]
        if not isinstance(choice, dict):
            raise RemoteError(f"{self.base_url}/completions returned no choice")
        ids = _ids(choice, self.base_url)
        lps = ((choice.get("logprobs") or {}).get("token_logprobs")) or []
        return self._sample(prompt_ids, params, ids, [float(x) for x in lps], choice.get("text", ""), choice)

    async def generate_many(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Sample]:
        """`generate` for each prompt at once (concurrent requests); results in order."""
        return list(await asyncio.gather(*(self.generate(p, params) for p in prompts)))

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> AsyncIterator[Chunk]:
        """`generate` as it happens: one `Chunk` per server-sent event, the last with the Sample."""
        return self._stream(list(prompt_ids), params or SamplingParams(), request_id)

    def cancel(self, request_id: str) -> bool:
        """Close request `request_id`'s connection (the server cancels it). True when it was in flight."""
        task = self._tasks.pop(request_id, None)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    # -- requests -----------------------------------------------------------------------------
    def request_body(self, prompt_ids: Sequence[int], params: SamplingParams, *, stream: bool) -> dict[str, Any]:
        """The `/v1/completions` body for one request (token-id prompt, log-probs asked)."""
        if params.segment_policies:
            raise ValueError("RemoteGenerator cannot send segment_policies (an OpenAI endpoint has no per-segment sampling); run them on a local AsyncEngine")
        body: dict[str, Any] = {
            "model": self.model, "prompt": [int(t) for t in prompt_ids], "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "n": 1, "logprobs": 1, "stream": stream,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_k:
            body["top_k"] = params.top_k
        if params.ignore_eos:
            body["ignore_eos"] = True
        elif params.stop_token_ids is not None:  # they replace the model's end tokens
            body["ignore_eos"], body["stop_token_ids"] = True, list(params.stop_token_ids)
        return body

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [k for k in self._clients if k.is_closed()]:
                del self._clients[old]
                self._closers.pop(old, None)
            # idle connections are dropped after 1 s, well before a server closes them (uvicorn: 5 s):
            # a request sent on a connection the server is closing fails with ReadError
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=1.0)
            client = self._clients[loop] = httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=self.headers)
            closer = self._closers[loop] = self._close_at_shutdown(loop, client)
            asyncio.ensure_future(anext(closer))  # runs it to its yield: the loop now finalises it at shutdown
        return client

    async def _close_at_shutdown(self, loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> AsyncIterator[None]:
        """Suspended until the loop's `shutdown_asyncgens` closes it, which closes `client`."""
        try:
            yield
        finally:
            if self._clients.get(loop) is client:
                del self._clients[loop]
            self._closers.pop(loop, None)
            await client.aclose()

    async def _post(self, body: dict) -> dict:
        url = f"{self.base_url}/completions"
        try:
            response = await self._client().post(url, json=body)
        except httpx.HTTPError as err:
            raise RemoteError(f"POST {url} failed ({type(err).__name__}: {err})") from None
        return _json(response, url)

    def _hold(self, request_id: str | None, task: asyncio.Task) -> None:
        if request_id is None:
            return
        if request_id in self._tasks and not self._tasks[request_id].done():
            task.cancel()
            raise ValueError(f"request_id {request_id!r} is already in flight; give each request its own id")
        self._tasks[request_id] = task

    def _release(self, request_id: str | None, task: asyncio.Task) -> None:
        if request_id is not None and self._tasks.get(request_id) is task:
            del self._tasks[request_id]
        if not task.done():  # the caller was cancelled: close the connection too
            task.cancel()

    async def _stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None) -> AsyncIterator[Chunk]:
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(self._read_events(self.request_body(prompt_ids, params, stream=True), queue))
        self._hold(request_id, task)
        ids: list[int] = []
        lps: list[float] = []
        text = ""
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, task], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    task.result()  # raises the reader's error, or CancelledError after cancel()
                    raise RemoteError(f"{self.base_url}/completions ended the stream before the last choice")
                choice = getter.result()
                new_ids = _ids(choice, self.base_url)
                new_lps = [float(x) for x in ((choice.get("logprobs") or {}).get("token_logprobs") or [])]
                ids += new_ids
                lps += new_lps
                text += choice.get("text", "")
                if choice.get("finish_reason") is None:
                    yield Chunk(tuple(new_ids), tuple(new_lps), choice.get("text", ""))
                    continue
                sample = self._sample(prompt_ids, params, ids, lps, text, choice)
                yield Chunk(tuple(new_ids), tuple(new_lps), choice.get("text", "") + sample.text[len(text) :], sample)
                return
        finally:
            self._release(request_id, task)

    async def _read_events(self, body: dict, queue: asyncio.Queue) -> None:
        """Put each event's first choice on `queue` until [DONE]."""
        url = f"{self.base_url}/completions"
        try:
            async with self._client().stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    _json(response, url)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise RemoteError(f"POST {url}: {event['error'].get('message', event['error'])}")
                    for choice in event.get("choices") or []:
                        queue.put_nowait(choice)
        except httpx.HTTPError as err:
            raise RemoteError(f"POST {url} failed ({type(err).__name__}: {err})") from None

    def _sample(self, prompt_ids: Sequence[int], params: SamplingParams, ids: list[int], lps: list[float], text: str, choice: dict) -> Sample:
        """The engine's Sample for a finished choice: its text ends with the stop string, as the engine's does."""
        if len(lps) != len(ids):
            raise RemoteError(f"{self.base_url} returned {len(ids)} token ids but {len(lps)} log-probs; it must return logprobs.token_logprobs for every token")
        sent = choice.get("prompt_token_ids")
        if sent is not None and list(sent) != [int(t) for t in prompt_ids]:
            raise RemoteError(f"{self.base_url} saw other prompt ids than were sent ({len(sent)} vs {len(prompt_ids)} tokens); it must take token-id prompts as they are")
        finish = choice.get("finish_reason")
        stop_reason = choice.get("stop_reason")
        reason: FinishReason = "length" if finish == "length" else ("stop" if isinstance(stop_reason, str) else "eos")
        return Sample(
            prompt_ids=tuple(int(t) for t in prompt_ids),
            token_ids=tuple(ids),
            logprobs=tuple(lps),
            versions=(self._version,) * len(ids),
            finish_reason=reason,
            text=text + (stop_reason if reason == "stop" else ""),
            policies=(params.policy,) * len(ids),
        )

    async def aclose(self) -> None:
        """Close this loop's HTTP client."""
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        closer = self._closers.pop(loop, None)
        if closer is not None:
            await closer.aclose()  # its finally closes the client
        elif client is not None:
            await client.aclose()

    def close(self) -> None:
        """Close the HTTP clients still open, from synchronous code (not on a running loop's thread):
        those of loops that are not running are closed on their loop; a running loop's
        (another thread's) is closed there. Clients of loops `asyncio.run` ended are closed already."""
        for loop in list(self._clients):
            if loop.is_closed():
                self._clients.pop(loop, None)
                self._closers.pop(loop, None)
                continue
            closer = self._closers.pop(loop, None)
            client = self._clients.pop(loop)
            done = closer.aclose() if closer is not None else client.aclose()
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(done, loop).result(timeout=30)
            else:
                loop.run_until_complete(done)


def _json(response: httpx.Response, url: str) -> dict:
    """The JSON body of a 200 response; otherwise a RemoteError naming the status and the server's message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else (response.text[:200] or response.reason_phrase)
        raise RemoteError(f"{response.request.method} {url}: HTTP {response.status_code}: {message}")
    if not isinstance(body, dict):
        raise RemoteError(f"{url} did not return a JSON object")
    return body


def _ids(choice: dict, base_url: str) -> list[int]:
    ids = choice.get("token_ids")
    if ids is None:
        raise RemoteError(f"{base_url} returned no token ids (the extension field token_ids); RemoteGenerator needs exact ids for training: serve the model with `policyflow serve`")
    return [int(t) for t in ids]
