"""The one generator interface (issue 19 §1): what an episode, an evaluation or the server needs
from a model that samples, whether it runs here or behind an HTTP endpoint.

    sample = await generator.generate(prompt_ids, SamplingParams(max_new_tokens=64, seed=3))
    async for chunk in generator.stream(prompt_ids, params, request_id="r1"):
        ...                                 # chunk.token_ids, chunk.text; chunk.sample on the last
    generator.cancel("r1")                  # the request leaves the batch at once

`SamplingParams` (how to sample one request), `Chunk` (one streaming step) and the `Generator`
protocol live here; `AsyncEngine` implements it (local model, continuous batching) and so does
`engine.remote.RemoteGenerator` (any OpenAI-compatible endpoint). Token ids in and out, never
text: training needs the exact ids and behaviour log-probs (DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from policyflow.engine.segments import SegmentPolicy
from policyflow.types import Sample, TokenPolicy


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request.

    temperature: 0 means greedy (argmax; log-probs are the T=1 model log-softmax).
    top_p: nucleus mass kept (1 keeps everything); log-probs are renormalised over it.
    top_k: keep only the k most probable tokens before top_p (0 = off).
    max_new_tokens: hard cap on generated tokens ("length").
    stop: strings that end the completion when they appear in its decoded text ("stop").
    stop_token_ids: token ids that end it ("eos"); None means the model's EOS ids.
    ignore_eos: never stop on a token id (benchmarks: fixed-length generation).
    segment_policies: text between a rule's open and close markers is sampled with the rule's
        policy instead (`segments.py`; GRPO-ATS: greedy code). Needs a tokenizer, like `stop`.
    seed: None draws from the engine's shared generator; an int draws token i's uniform from a
        hash of (seed, i) (`sampling.counter_uniforms`), whatever else is in flight.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    segment_policies: tuple[SegmentPolicy, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")
        if self.segment_policies:
            object.__setattr__(self, "segment_policies", tuple(self.segment_policies))
            opens = [r.open for r in self.segment_policies]
            if len(set(opens)) != len(opens):
                raise ValueError(f"segment policies share an open marker ({opens}); give each its own")

    @property
    def policy(self) -> TokenPolicy:
        """The request's own policy (outside every segment)."""
        return TokenPolicy(float(self.temperature), float(self.top_p), int(self.top_k))


@dataclass(frozen=True)
class Chunk:
    """One streaming step of one request.

    Concatenating every chunk's `token_ids`, `logprobs` and `text` gives the finished Sample's
    `token_ids`, `logprobs` and `text`. Text is held back while the decoded text ends with an
    incomplete character ("\ufffd") or with the beginning of one of the request's stop
    strings, so no chunk shows text the Sample does not have.
    """

    token_ids: tuple[int, ...]  # tokens new since the previous chunk
    logprobs: tuple[float, ...]  # their behaviour log-probs
    text: str  # text new since the previous chunk
    sample: Sample | None = None  # the finished Sample, on the last chunk only (finish_reason is there)


@runtime_checkable
class Generator(Protocol):
    """A model that samples completions of token-id prompts (`AsyncEngine`, `RemoteGenerator`).

    `version`: the policy version its tokens carry. `max_positions`: the longest prompt +
    completion it takes (None: unknown). `generate` returns one finished Sample; `stream` yields
    its Chunks as tokens are sampled; `cancel` stops an in-flight request (True when it was in
    flight; its awaiting `generate` or `stream` raises `asyncio.CancelledError`). A caller whose
    `generate` task is cancelled frees its request too. `request_id`s must be unique among the
    requests in flight.
    """

    @property
    def version(self) -> int: ...

    @property
    def max_positions(self) -> int | None: ...

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample: ...

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> AsyncIterator[Chunk]: ...

    def cancel(self, request_id: str) -> bool: ...
