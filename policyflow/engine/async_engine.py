"""The async engine: `await engine.generate(prompt_ids, params)` from any number of coroutines.

    engine = AsyncEngine(model, tokenizer, version=0, max_batch=256)
    sample = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=32))
    engine.update_weights(state_dict, version=1, mode="continue")   # or "abort"

One per rollout worker (and one in the trainer process for evaluation). A background task on
the caller's event loop drives the synchronous core (`core.Engine`): every decode step covers
whatever is in flight, and a finished row's slot is refilled at once (continuous batching on
the fast backend). Between two decode steps the loop runs the waiting coroutines, so an
episode that got its completion can call a tool and come back with its next request while the
others keep decoding; an episode busy with a tool holds no slot.

Weight swaps happen between decode steps (`update_weights` is a plain method, and the loop is
single-threaded):

* continue — in-flight requests keep their KV cache; their later tokens carry the new version;
* abort — in-flight requests are stopped and continued at once from their partial output
  (prefill with the new weights); the caller's `generate` still returns one `Sample`, whose
  early tokens keep the old versions and behaviour log-probs;
* drain — not here: "finish the admitted episodes (all their turns), then swap" is a rule over
  episodes, kept by the rollout worker, which then swaps with `continue`.

If a decode step raises (out of memory...), every waiting `generate` and every later one raises
the same error.

It implements `Generator` (`generator.py`): `generate(..., request_id=)`, `stream(...)` (an
async iterator of `Chunk`s, sent after every decode step that gave the request tokens; the
last carries the Sample) and `cancel(request_id)` (queued or decoding, the request leaves the
batch at once; its awaiting `generate` or `stream` raises `asyncio.CancelledError`). A caller
whose `generate` (or `stream` consumer) is cancelled by asyncio frees its row the same way. A
streamed request keeps streaming across an abort swap: its chunks go on from the resumed
request's tokens. Streamed text is the Sample's text cut at a safe point: it holds back a
trailing incomplete character ("\ufffd") and a trailing beginning of a stop string, so the
chunks' texts add up to the Sample's (the tokenizer's decode of a prefix must be a prefix of
the decode of the whole, which holds for byte-level BPE and SentencePiece tokenizers).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from policyflow.engine.core import BackendName, Engine, Finished, Request, SamplingParams, join_samples
from policyflow.engine.generator import Chunk
from policyflow.types import Sample

T = TypeVar("T")


@dataclass
class _InFlight:
    """One request between submission and delivery."""

    future: asyncio.Future  # the finished Sample (plain `generate`)
    request: Request
    request_id: str | None = None
    chunks: asyncio.Queue | None = None  # a streamed request: its Chunks, then the end (or an error)
    sent_tokens: int = 0  # tokens already sent in chunks
    sent_text: str = ""  # text already sent in chunks
    stops: tuple[str, ...] = ()
    # incremental decoding of the current row's own tokens (vLLM's detokenizer): `decoded` is the
    # text of tokens[:read]; tokens[prefix:read] are decoded again as the context of the new ones
    base: int = -1  # tokens of the partials before the current row (an abort swap starts a row)
    prefix: int = 0
    read: int = 0
    decoded: str = ""


def safe_text_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` a stream can send now: all of it but a trailing run of "\ufffd" (an
    incomplete UTF-8 character) and, before that, the longest trailing piece that begins one
    of the `stops` strings (it may yet become one, which the Sample's text cuts after)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.startswith(stop[:k], end - k):
                hold = k
                break
    return end - hold


class AsyncEngine:
    """Continuous batching behind `await generate(...)` (a `Generator`). Use it from one event loop at a time."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        version: int = 0,
        max_batch: int = 256,
        backend: BackendName = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        self.core = Engine(model, tokenizer, version=version, max_batch=max_batch, backend=backend, generator=generator)
        self._waiting: dict[int, _InFlight] = {}  # by internal key (the core's request id)
        self._keys: dict[str, int] = {}  # caller's request_id -> key
        self._streams: dict[int, _InFlight] = {}  # the streamed ones
        self._partials: dict[int, Sample] = {}  # request key -> output before an abort
        self._next_key = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self.stats = {"busy_s": 0.0, "steps": 0.0, "aborted_sequences": 0.0, "aborted_tokens": 0.0}

    # -- state ------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self.core.version

    @property
    def generator(self) -> torch.Generator | None:
        return self.core.generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self.core.generator = generator

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def backend_name(self) -> str:
        return self.core.backend_name

    @property
    def device(self) -> torch.device:
        return next(self.core.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence (prompt + completion) the model takes, if its config says."""
        return getattr(self.core.model.config, "max_position_embeddings", None)

    @property
    def error(self) -> BaseException | None:
        """The error that stopped the decode loop (every later request raises it), else None."""
        return self._error

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet returned (queued or decoding)."""
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        """Requests holding a decode slot now."""
        return self.core.num_active

    # -- requests ---------------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample:
        """One completion of `prompt_ids`: token ids, behaviour log-probs and per-token versions.

        Raises `asyncio.CancelledError` when `cancel(request_id)` stops it; cancelling the
        awaiting task frees its row too."""
        entry = self._submit(prompt_ids, params, request_id, streamed=False)
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._drop(entry.request.id)
            raise

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> AsyncIterator[Chunk]:
        """`generate` as it happens: an async iterator of `Chunk`s (the request is submitted now).

        Close it (`contextlib.aclosing`, or let the consumer task be cancelled) to free the row
        of a stream you stop reading early."""
        return self._chunks(self._submit(prompt_ids, params, request_id, streamed=True))

    async def _chunks(self, entry: _InFlight) -> AsyncIterator[Chunk]:
        try:
            while True:
                item = await entry.chunks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.sample is not None:
                    return
        finally:
            self._drop(entry.request.id)

    def cancel(self, request_id: str) -> bool:
        """Stop request `request_id` (queued or decoding: its row leaves the batch now). True when it was in flight."""
        key = self._keys.get(request_id)
        entry = self._waiting.get(key) if key is not None else None
        if entry is None:
            return False
        self._drop(key)
        if entry.chunks is not None:
            entry.chunks.put_nowait(asyncio.CancelledError(f"request {request_id!r} was cancelled"))
        entry.future.cancel()
        return True

    def _submit(self, prompt_ids: Sequence[int], params: SamplingParams | None, request_id: str | None, *, streamed: bool) -> _InFlight:
        self._ensure_running()
        if request_id is not None and request_id in self._keys:
            raise ValueError(f"request_id {request_id!r} is already in flight; give each request its own id")
        params = params or SamplingParams()
        request = Request(tuple(prompt_ids), params, id=self._next_key)
        self._next_key += 1
        entry = _InFlight(self._loop.create_future(), request, request_id, asyncio.Queue() if streamed else None, stops=params.stop)
        self.core.submit(request)
        self._waiting[request.id] = entry
        if request_id is not None:
            self._keys[request_id] = request.id
        if streamed:
            self._streams[request.id] = entry
        self._wake.set()
        return entry

    def _drop(self, key: int) -> None:
        """Forget request `key` and take it out of the core (a cancelled or abandoned caller)."""
        entry = self._waiting.pop(key, None)
        if entry is None:
            return
        self.core.cancel(key)
        self._partials.pop(key, None)
        self._streams.pop(key, None)
        if entry.request_id is not None:
            self._keys.pop(entry.request_id, None)

    async def generate_many(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Sample]:
        """`generate` for each prompt at once (they share the running batch); results in order."""
        return list(await asyncio.gather(*(self.generate(p, params) for p in prompts)))

    # -- weights ----------------------------------------------------------------------------
    def update_weights(self, state_dict: Mapping[str, torch.Tensor] | None, version: int, mode: str = "continue") -> None:
        """Swap weights between two decode steps (`continue` or `abort`; see the module docstring)."""
        if mode not in ("continue", "abort"):
            raise ValueError(f"AsyncEngine.update_weights mode must be 'continue' or 'abort', got {mode!r}; a drain is kept by the rollout worker (finish the episodes, then swap with continue)")
        if mode == "abort":
            self.stats["aborted_sequences"] += self.core.num_active
        self.core.update_weights(state_dict, version, mode=mode)
        if mode == "abort" and self._wake is not None:
            self._wake.set()  # deliver and resume the aborted rows

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # -- the decode loop --------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        if self._waiting:
            raise RuntimeError("this AsyncEngine has requests in flight on another event loop; use it from one loop at a time")
        self._loop, self._wake = loop, asyncio.Event()
        self._task = loop.create_task(self._run(), name="engine")

    async def _run(self) -> None:
        try:
            while True:
                if not self.core.has_work:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                start = time.perf_counter()
                finished = self.core.step()
                self.stats["busy_s"] += time.perf_counter() - start
                self.stats["steps"] += 1
                for done in finished:
                    self._deliver(done)
                if self._streams:
                    self._send_progress()
                await asyncio.sleep(0)  # the waiting coroutines run between decode steps
        except Exception as err:  # every waiting and later generate raises it
            self._error = err
            for entry in self._waiting.values():
                if entry.chunks is not None:
                    entry.chunks.put_nowait(err)
                elif not entry.future.done():
                    entry.future.set_exception(err)
            self._waiting.clear()
            self._keys.clear()
            self._streams.clear()

    def _deliver(self, done: Finished) -> None:
        key, sample = done.request.id, done.sample
        entry = self._waiting.get(key)
        if entry is None:  # dropped meanwhile
            return
        if key in self._partials:
            sample = join_samples(self._partials.pop(key), sample)
        if sample.finish_reason == "aborted" and not entry.future.done():  # an abort swap: continue from the partial output
            self.stats["aborted_tokens"] += len(done.sample.token_ids)  # the KV cache thrown away
            self._partials[key] = sample
            resumed = entry.request.resume(sample)
            self.core.submit(resumed)
            return
        del self._waiting[key]
        self._streams.pop(key, None)
        if entry.request_id is not None:
            self._keys.pop(entry.request_id, None)
        if entry.chunks is not None:
            tokens, text = slice(entry.sent_tokens, None), sample.text[len(entry.sent_text):]
            entry.chunks.put_nowait(Chunk(sample.token_ids[tokens], sample.logprobs[tokens], text, sample))
        elif not entry.future.done():  # a cancelled caller (a closed worker) is simply dropped
            entry.future.set_result(sample)

    def _send_progress(self) -> None:
        """A Chunk for every streamed request that got tokens in this step (texts decoded in one
        batch, incrementally: each request's new tokens with a few before them, never its whole completion).

        After an abort the request's output is the partial Sample joined with the resumed
        request's tokens, and its text is the partial's text + the decode of the rest, as in
        `join_samples`."""
        moved: list[tuple[_InFlight, Sample | None, list[int], list[float]]] = []  # (entry, partial before an abort, own tokens, own log-probs)
        for key, entry in self._streams.items():
            got = self.core.generated(key)
            before = self._partials.get(key)
            base = len(before.token_ids) if before else 0
            if got is not None and len(got[0]) + base > entry.sent_tokens:
                if entry.base != base:  # a new row: decode its own tokens from their start
                    entry.base, entry.prefix, entry.read, entry.decoded = base, 0, 0, ""
                moved.append((entry, before, *got))
        if not moved:
            return
        tokenizer = self.core.tokenizer
        if tokenizer is not None:  # incremental: only the tokens since the last complete text, with their context
            windows = tokenizer.batch_decode([m[2][m[0].prefix : m[0].read] for m in moved] + [m[2][m[0].prefix :] for m in moved], skip_special_tokens=True)
            for k, (entry, _, tokens, _) in enumerate(moved):
                context, window = windows[k], windows[len(moved) + k]
                if len(window) > len(context) and not window.endswith("\ufffd"):  # held while a character is incomplete
                    entry.decoded += window[len(context) :]
                    entry.prefix, entry.read = entry.read, len(tokens)
        for entry, before, tokens, logprobs in moved:
            text = entry.decoded
            if before is not None:
                tokens, logprobs, text = list(before.token_ids) + tokens, list(before.logprobs) + logprobs, before.text + text
            end = max(safe_text_end(text, entry.stops), len(entry.sent_text))
            chunk = Chunk(tuple(tokens[entry.sent_tokens :]), tuple(logprobs[entry.sent_tokens :]), text[len(entry.sent_text) : end])
            entry.sent_tokens, entry.sent_text = len(tokens), entry.sent_text + chunk.text
            entry.chunks.put_nowait(chunk)


# -- blocking use (evaluation, SFT checks, scripts) ----------------------------------------------


@contextlib.contextmanager
def using_generator(engine: AsyncEngine, generator: torch.Generator | None) -> Iterator[None]:
    """Sample with `generator` inside the block (None: keep the engine's); the engine must be idle."""
    if generator is None:
        yield
        return
    if not isinstance(engine, AsyncEngine):
        raise ValueError(f"a torch.Generator override needs a local AsyncEngine, got {type(engine).__name__}; seed the requests instead (SamplingParams.seed)")
    if engine.num_in_flight:
        raise RuntimeError("a generator override needs an idle engine (nothing in flight)")
    saved, engine.generator = engine.generator, generator
    try:
        yield
    finally:
        engine.generator = saved


def run_blocking(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, even inside a running event loop.

    A component's synchronous method (the trainer's `evaluate`) runs on its host's loop thread;
    there the coroutine runs on a fresh loop in a helper thread, which the caller waits for.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1, thread_name_prefix="policyflow-blocking") as pool:
        return pool.submit(asyncio.run, coro).result()


def generate_blocking(
    engine: AsyncEngine, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *, generator: torch.Generator | None = None
) -> list[Sample]:
    """One `Sample` per prompt, in order, from synchronous code (see `run_blocking`)."""
    with using_generator(engine, generator):
        return run_blocking(engine.generate_many(prompts, params))
