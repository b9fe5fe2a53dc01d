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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from policyflow.engine.core import BackendName, Engine, Finished, Request, SamplingParams, join_samples
from policyflow.types import Sample

T = TypeVar("T")


class AsyncEngine:
    """Continuous batching behind `await generate(...)`. Use it from one event loop at a time."""

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
        self._waiting: dict[int, tuple[asyncio.Future, Request]] = {}
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
    def num_in_flight(self) -> int:
        """Requests submitted and not yet returned (queued or decoding)."""
        return len(self._waiting)

    @property
    def num_active(self) -> int:
        """Requests holding a decode slot now."""
        return self.core.num_active

    # -- requests ---------------------------------------------------------------------------
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Sample:
        """One completion of `prompt_ids`: token ids, behaviour log-probs and per-token versions."""
        self._ensure_running()
        request = Request(tuple(prompt_ids), params or SamplingParams(), id=self._next_key)
        self._next_key += 1
        future = self._loop.create_future()
        self._waiting[request.id] = (future, request)
        self.core.submit(request)
        self._wake.set()
        return await future

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
                await asyncio.sleep(0)  # the waiting coroutines run between decode steps
        except Exception as err:  # every waiting and later generate raises it
            self._error = err
            for future, _ in self._waiting.values():
                if not future.done():
                    future.set_exception(err)
            self._waiting.clear()

    def _deliver(self, done: Finished) -> None:
        key, sample = done.request.id, done.sample
        if key in self._partials:
            sample = join_samples(self._partials.pop(key), sample)
        future, request = self._waiting[key]
        if sample.finish_reason == "aborted" and not future.done():  # an abort swap: continue from the partial output
            self.stats["aborted_tokens"] += len(done.sample.token_ids)  # the KV cache thrown away
            self._partials[key] = sample
            self.core.submit(request.resume(sample))
            return
        del self._waiting[key]
        if not future.done():  # a cancelled caller (a closed worker) is simply dropped
            future.set_result(sample)


# -- blocking use (evaluation, SFT checks, scripts) ----------------------------------------------


@contextlib.contextmanager
def using_generator(engine: AsyncEngine, generator: torch.Generator | None) -> Iterator[None]:
    """Sample with `generator` inside the block (None: keep the engine's); the engine must be idle."""
    if generator is None:
        yield
        return
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
