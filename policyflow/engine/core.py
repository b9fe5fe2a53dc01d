"""The synchronous engine core: slots, one decode step at a time, versioned tokens.

    engine = Engine(model, tokenizer, version=0)
    engine.submit(Request(prompt_ids, SamplingParams(max_new_tokens=32), id="q1"))
    while engine.has_work:
        for done in engine.step():          # one decode step over all active slots
            ...                             # done.request, done.sample (a types.Sample)
    engine.update_weights(state_dict, version=1)              # continue: swap between steps
    engine.update_weights(state_dict, version=1, mode="abort")  # stop in-flight rows first

Nothing here awaits: callers use `AsyncEngine` (`async_engine.py`), which drives `step()` in
a background task and gives every episode `await engine.generate(...)`. A `drain` swap is not
the core's business: it is an episode-level rule ("finish the admitted episodes, all their
turns, then swap") kept by the rollout worker.

What each token carries (the contract with the trainer, DESIGN.md §3):

* `Sample.logprobs[i]` is the log-probability of `token_ids[i]` under the distribution the
  token was actually drawn from: softmax(logits / temperature), restricted to the top-k then
  top-p set and renormalised (`ops.policy_log_distribution`, the one definition the trainer
  uses too). That is the behaviour policy. The trainer's recomputation
  (`ops.shifted_token_logprobs` at the same temperature, top_p and top_k on a right-padded
  `prompt + completion` batch) matches it to < 1e-4 in float32 (tests/test_engine.py,
  tests/test_trainer.py). At temperature 0 (greedy) the token is the argmax and the
  log-prob is the model's log-softmax at temperature 1 (the greedy "distribution" would give
  log 1 = 0 everywhere, which is useless for training).
* `Sample.policies[i]` is the policy (temperature, top_p, top_k) token i was drawn from: the
  request's own, or a segment policy's (`SamplingParams.segment_policies`, `segments.py`:
  GRPO-ATS samples code greedily inside `<code>…</code>`), switched on the decoded text as
  tokens are produced. The trainer recomputes each token under its own policy.
* `Sample.versions[i]` is the engine's `version` when token i was sampled. With a
  `continue` weight swap, the in-flight sequences keep their KV cache (computed by the old
  weights) and later tokens carry the new version; this is the accepted practice of AReaL.
* `finish_reason`: "eos" (a stop token id was sampled; it is included in `token_ids`),
  "stop" (a stop string appeared in the decoded completion; the tokens up to and including
  the one that completed it are kept, `text` is cut right after the stop string), "length"
  (`max_new_tokens` reached), "aborted" (cut off by `abort()`; see `Request.resume`).

Backends (chosen by `backend="auto"`): the fast slot decoder for Llama-family models
(`fast_decoder.py`, continuous batching) or the model's own HF forward (`hf_decoder.py`,
any causal LM, static batches). Both keep finished rows out of the compute: the batch is
compacted after every step.

Threads: the library never sets torch's thread count; the caller does.
Reproducibility: with the same `torch.Generator` state (on the model's device), the same
requests submitted in the same order and the same weights, outputs are identical; both
backends draw the same tokens. The shared random stream serves the whole batch, so an
unseeded request's tokens depend on what else is in flight. A request with
`SamplingParams.seed` draws token i's uniform as a hash of (seed, i) instead
(`sampling.counter_uniforms`, all seeded rows in one vectorised draw): its tokens depend only
on the weights, its prompt, its params and its seed (up to float rounding of the batched
forward, which moves a token only when a uniform falls within rounding of a CDF boundary).
Through an abort and `Request.resume` the count goes on (`Request.drawn`).

Cancellation: `cancel(id)` drops a request wherever it is (queued, decoding, finished but not
yet returned); a decoding row leaves the batch at once (the backend rows are compacted).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Container, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from policyflow.engine.fast_decoder import FastDecoder, fast_path_problem
from policyflow.engine.generator import SamplingParams
from policyflow.engine.hf_decoder import HFDecoder
from policyflow.engine.sampling import RowSeeds, sample_tokens
from policyflow.engine.segments import NO_TOKEN, SegmentPolicy, SegmentScanner, SegmentWatch
from policyflow.types import FinishReason, Sample, TokenPolicy

SwapMode = Literal["continue", "abort"]
SWAP_MODES: tuple[str, ...] = ("continue", "drain", "abort")  # as configured (pipeline.swap); drain is the worker's
BackendName = Literal["auto", "fast", "generic"]


@dataclass(frozen=True)
class Request:
    """One generation request; `id` is the caller's key, echoed back in `Finished`.

    `text_before`: the decoded completion that came before this request's own tokens (a
    request resumed after an abort): segment policies start from the state it ends in.
    `drawn`: the tokens generated before this request's own (a resumed request's partial): a
    seeded request's token i draws at position `drawn + i`, so `resume` continues its stream.
    """

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: Hashable = None
    text_before: str = ""
    drawn: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        if not self.prompt_ids:
            raise ValueError("a request needs at least one prompt token")

    def resume(self, partial: Sample) -> Request:
        """The request that continues an aborted `partial`: its tokens become prompt.

        Join the two outputs with `join_samples(partial, rest)`. A stop string that straddles
        the boundary is not detected (each part is checked on its own text); segment policies
        go on from the state the partial text ends in (`text_before`).
        """
        left = self.params.max_new_tokens - len(partial.token_ids)
        if left < 1:
            raise ValueError("the partial output already used all max_new_tokens; nothing to resume")
        params = dataclasses.replace(self.params, max_new_tokens=left)
        before = self.text_before + partial.text if self.params.segment_policies else ""
        return Request(self.prompt_ids + tuple(partial.token_ids), params, self.id, before, self.drawn + len(partial.token_ids))


@dataclass(frozen=True)
class Finished:
    """A finished (or aborted) request and what was generated for it."""

    request: Request
    sample: Sample


def join_samples(first: Sample, rest: Sample) -> Sample:
    """One sample from an aborted `first` and the `rest` generated by `Request.resume`."""
    both = first.policies is not None and rest.policies is not None
    return Sample(
        prompt_ids=first.prompt_ids,
        token_ids=first.token_ids + rest.token_ids,
        logprobs=first.logprobs + rest.logprobs,
        versions=first.versions + rest.versions,
        finish_reason=rest.finish_reason,
        text=first.text + rest.text,
        policies=first.policies + rest.policies if both else None,
    )


@dataclass
class _Row:
    """Book-keeping of one in-flight sequence (one cache row)."""

    request: Request
    stop_ids: frozenset[int]
    policy: TokenPolicy  # what the next token is drawn from
    scanner: SegmentScanner | None = None  # the segment state (requests with segment policies)
    watch: Container[int] = NO_TOKEN  # new tokens after which the scanner reads the text
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    policy_runs: list[tuple[int, TokenPolicy]] = field(default_factory=list)  # (first token, its policy) per stretch
    text: str = ""  # decoded completion, kept only when the request has stop strings

    def __post_init__(self) -> None:
        self.policy_runs.append((0, self.policy))

    def switch(self) -> None:
        """Take the scanner's new state: the next token's policy and watch list."""
        self.watch = self.scanner.watching
        if self.scanner.policy != self.policy:
            self.policy = self.scanner.policy
            self.policy_runs.append((len(self.tokens), self.policy))

    def policies(self) -> tuple[TokenPolicy, ...]:
        """The policy of every token so far."""
        ends = [start for start, _ in self.policy_runs[1:]] + [len(self.tokens)]
        return sum(((policy,) * (end - start) for (start, policy), end in zip(self.policy_runs, ends)), ())


def _eos_ids(model: torch.nn.Module, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    return frozenset(int(i) for i in ids)


class Engine:
    """Slot-based generation engine: a request queue, active rows, one decode step at a time.

    Rows are admitted from the queue into free slots at the start of every `step()` (with the
    fast backend; the generic backend admits only when the batch is empty). `max_batch` is the
    number of slots. Not thread-safe: call it from one thread (an asyncio actor wraps it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer=None,
        *,
        version: int = 0,
        max_batch: int = 256,
        backend: BackendName = "auto",
        generator: torch.Generator | None = None,
    ):
        if backend not in ("auto", "fast", "generic"):
            raise ValueError(f"backend must be 'auto', 'fast' or 'generic', got {backend!r}")
        problem = fast_path_problem(model)
        if backend == "fast" and problem:
            raise ValueError(f"the fast backend cannot run this model: {problem}; use backend='generic'")
        use_fast = backend == "fast" or (backend == "auto" and problem is None)
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(model.config, "pad_token_id", None) if pad is None else pad
        self.backend: FastDecoder | HFDecoder = FastDecoder(model) if use_fast else HFDecoder(model, pad or 0)
        self.backend_name = "fast" if use_fast else "generic"
        self.fast_path_problem = problem  # why auto chose the generic backend (None if fast)
        self.model, self.tokenizer = model, tokenizer
        self.version = int(version)
        self.max_batch = int(max_batch)
        self.generator = generator
        self.eos_ids = _eos_ids(model, tokenizer)
        self._queue: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._outbox: list[Finished] = []
        self._row_params: tuple[float | torch.Tensor, float | torch.Tensor, int | torch.Tensor] | None = None
        self._row_seeds: RowSeeds | None | bool = None  # the seeded rows' keys (False: no row is seeded; None: to compute)
        self._row_of: dict[Hashable, _Row] = {}  # active rows by request id (progress of a streamed request)
        self._last_tokens = torch.zeros(0, dtype=torch.long)  # one pending token per active row
        self._watches: dict[tuple[SegmentPolicy, ...], SegmentWatch] = {}  # per rule set
        self._pieces: list[str] | None = None  # every token id's own text (for the watch lists)

    # -- state --------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self._rows)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    @property
    def has_work(self) -> bool:
        return bool(self._rows or self._queue or self._outbox)

    # -- requests -----------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; it starts at a later `step()` when a slot is free."""
        if (request.params.stop or request.params.segment_policies) and self.tokenizer is None:
            raise ValueError("stop strings and segment policies need a tokenizer: pass tokenizer= to the engine")
        self._queue.append(request)

    def abort(self) -> None:
        """Stop every in-flight sequence; the next `step()` returns them, finish_reason "aborted".

        Queued requests stay queued. Requeue a partial output with `request.resume(sample)`.
        """
        for row in self._rows:
            self._outbox.append(self._finish(row, "aborted"))
        self._rows = []
        self._row_of.clear()
        self._row_params = None
        self._row_seeds = None
        self.backend.select_rows([])

    def cancel(self, request_id: Hashable) -> bool:
        """Drop every request with id `request_id`: queued, decoding (its row leaves the batch
        now and the backend rows are compacted, so the next step no longer computes it) or
        finished and not yet returned by `step()`. True when one was found. Other rows' outputs
        are unaffected (seeded rows exactly; unseeded ones draw from the shared stream, which
        then serves one row less)."""
        found = False
        if any(r.id == request_id for r in self._queue):
            self._queue = deque(r for r in self._queue if r.id != request_id)
            found = True
        gone = {i for i, row in enumerate(self._rows) if row.request.id == request_id}
        if gone:
            self._compact(gone)
            found = True
        kept = [f for f in self._outbox if f.request.id != request_id]
        found = found or len(kept) < len(self._outbox)
        self._outbox = kept
        return found

    def generated(self, request_id: Hashable) -> tuple[list[int], list[float]] | None:
        """The token ids and log-probs generated so far by the active request `request_id`
        (None when it holds no row). Live lists: copy what you keep. Needs unique ids."""
        row = self._row_of.get(request_id)
        return None if row is None else (row.tokens, row.logprobs)

    def step(self) -> list[Finished]:
        """Admit queued requests into free slots, run one decode step, return what finished."""
        finished, self._outbox = self._outbox, []
        parts = []
        if self._rows:
            parts.append(self.backend.decode(self._last_tokens))
        admitted = self._admit()
        if admitted:
            reserve = max(len(r.prompt_ids) + r.params.max_new_tokens for r in admitted)
            parts.append(self.backend.prefill([r.prompt_ids for r in admitted], reserve=reserve))
            for r in admitted:
                self._rows.append(row := self._new_row(r))
                self._row_of[r.id] = row
            self._row_params = None
            self._row_seeds = None
        if not parts:
            return finished
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        temperature, top_p, top_k = self._sampling_params()
        tokens, logprobs = sample_tokens(logits, temperature, top_p, self.generator, top_k, self._seeds())
        self._last_tokens = tokens  # fed to the next decode step
        done = self._record(tokens.tolist(), logprobs.tolist())
        if done:
            finished.extend(self._finish(self._rows[i], reason) for i, reason in done.items())
            self._compact(set(done))
        return finished

    # -- weights ------------------------------------------------------------------------
    def update_weights(
        self, state_dict: Mapping[str, torch.Tensor] | None, version: int, mode: SwapMode = "continue"
    ) -> None:
        """Swap to `state_dict` (None: the module was already updated in place) as `version`.

        continue: swap now; in-flight sequences go on with their old KV cache, later tokens
                  carry the new version.
        abort:    stop in-flight sequences (returned by the next `step()` as "aborted"), swap.
        Always called between decode steps (the engine is single-threaded). `drain` is an
        episode-level rule, kept by the caller (see the module docstring).
        """
        if mode not in ("continue", "abort"):
            raise ValueError(f"Engine.update_weights mode must be 'continue' or 'abort', got {mode!r} (drain is kept by the rollout worker)")
        if mode == "abort":
            self.abort()
        self._load(state_dict, int(version))

    def _load(self, state_dict: Mapping[str, torch.Tensor] | None, version: int) -> None:
        if state_dict is not None:
            load_weights(self.model, state_dict)
        self.backend.refresh()
        self.version = version

    # -- internals ----------------------------------------------------------------------
    def _new_row(self, request: Request) -> _Row:
        params = request.params
        if not params.segment_policies:
            return _Row(request, self._stop_ids(params), params.policy)
        scanner = SegmentScanner(params.segment_policies, params.policy, self._watch(params.segment_policies), request.text_before)
        return _Row(request, self._stop_ids(params), scanner.policy, scanner, scanner.watching)

    def _seeds(self) -> RowSeeds | None:
        """The seeded rows and the position each draws at now; None when no row is seeded (the cheap path)."""
        if self._row_seeds is None:
            seeds = [row.request.params.seed for row in self._rows]
            self._row_seeds = RowSeeds.of(seeds, [0] * len(seeds), self.backend.device) if any(s is not None for s in seeds) else False
        if self._row_seeds is False:
            return None
        return self._row_seeds.at([row.request.drawn + len(row.tokens) for row in self._rows])

    def _watch(self, rules: tuple[SegmentPolicy, ...]) -> SegmentWatch:
        """The watch lists of a rule set (`segments.SegmentWatch`), from every token's own text, decoded once."""
        if rules not in self._watches:
            if self._pieces is None:
                self._pieces = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))], skip_special_tokens=True)
            vocab = int(getattr(self.model.config, "vocab_size", 0) or 0)
            self._watches[rules] = SegmentWatch.of(rules, self._pieces, vocab)
        return self._watches[rules]

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        if params.ignore_eos:
            return frozenset()
        return frozenset(params.stop_token_ids) if params.stop_token_ids is not None else self.eos_ids

    def _admit(self) -> list[Request]:
        if not self._queue:
            return []
        if self._rows and not self.backend.continuous:
            return []
        free = self.max_batch - len(self._rows)
        return [self._queue.popleft() for _ in range(min(free, len(self._queue)))]

    def _sampling_params(self) -> tuple[float | torch.Tensor, float | torch.Tensor, int | torch.Tensor]:
        """Per-row temperature, top_p and top_k: numbers when every row shares them (cheap path)."""
        if self._row_params is None:
            temps = [row.policy.temperature for row in self._rows]
            top_ps = [row.policy.top_p for row in self._rows]
            top_ks = [row.policy.top_k for row in self._rows]
            if len(set(temps)) == 1 and len(set(top_ps)) == 1 and len(set(top_ks)) == 1:
                self._row_params = (temps[0], top_ps[0], top_ks[0])
            else:
                device = self.backend.device
                self._row_params = (
                    torch.tensor(temps, dtype=torch.float32, device=device),
                    torch.tensor(top_ps, dtype=torch.float32, device=device),
                    torch.tensor(top_ks, dtype=torch.long, device=device),
                )
        return self._row_params

    def _record(self, tokens: list[int], logprobs: list[float]) -> dict[int, FinishReason]:
        """Append each row's new token (with the policy it was drawn from); switch the policy of
        rows whose text just entered or left a segment; return {row index: finish reason} for finished rows."""
        done: dict[int, FinishReason] = {}
        stop_rows: list[int] = []
        switch_rows: list[int] = []  # rows whose new token may complete a segment marker
        version = self.version
        for i, (row, token, logprob) in enumerate(zip(self._rows, tokens, logprobs)):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.versions.append(version)
            if token in row.stop_ids:
                done[i] = "eos"
                continue
            if row.request.params.stop:
                stop_rows.append(i)
            elif len(row.tokens) >= row.request.params.max_new_tokens:
                done[i] = "length"
            if token in row.watch:
                switch_rows.append(i)
        texts: dict[int, str] = {}
        decode = stop_rows + [i for i in switch_rows if i not in done and not self._rows[i].request.params.stop]
        if decode:
            texts = dict(zip(decode, self.tokenizer.batch_decode([self._rows[i].tokens for i in decode], skip_special_tokens=True)))
        for i in stop_rows:
            row, text = self._rows[i], texts[i]
            cut = _stop_cut(text, row.request.params.stop, len(row.text))
            row.text = text if cut is None else text[:cut]
            if cut is not None:
                done[i] = "stop"
            elif len(row.tokens) >= row.request.params.max_new_tokens:
                done[i] = "length"
        for i in switch_rows:
            row = self._rows[i]
            if i not in done and row.scanner.scan(texts[i]):
                row.switch()
                self._row_params = None
        return done

    def _finish(self, row: _Row, reason: FinishReason) -> Finished:
        if reason == "stop" or self.tokenizer is None:
            text = row.text
        else:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        sample = Sample(
            prompt_ids=row.request.prompt_ids,
            token_ids=tuple(row.tokens),
            logprobs=tuple(row.logprobs),
            versions=tuple(row.versions),
            finish_reason=reason,
            text=text,
            policies=row.policies(),
        )
        return Finished(row.request, sample)

    def _compact(self, gone: set[int]) -> None:
        """Drop finished rows; tail rows move into the holes so active rows stay a prefix."""
        n_keep = len(self._rows) - len(gone)
        tail = iter(i for i in range(n_keep, len(self._rows)) if i not in gone)
        keep = [next(tail) if i in gone else i for i in range(n_keep)]
        for i in gone:
            if self._row_of.get(self._rows[i].request.id) is self._rows[i]:
                del self._row_of[self._rows[i].request.id]
        self.backend.select_rows(keep)
        self._rows = [self._rows[k] for k in keep]
        self._last_tokens = self._last_tokens[torch.tensor(keep, dtype=torch.long, device=self._last_tokens.device)]
        self._row_params = None
        self._row_seeds = None


def _stop_cut(text: str, stops: Sequence[str], checked: int) -> int | None:
    """End index (exclusive) of the earliest stop string in `text`, or None.

    Only matches that end after `checked` (the text length seen at the previous step) can be
    new, so the search starts just before it.
    """
    best: int | None = None
    for s in stops:
        at = text.find(s, max(0, checked - len(s) + 1))
        if at >= 0 and (best is None or at + len(s) < best):
            best = at + len(s)
    return best


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place; a tied `lm_head.weight` may be absent."""
    with torch.no_grad():
        result = model.load_state_dict(dict(state_dict), strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"state_dict does not match the model: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}; pass the full model.state_dict() of the same architecture"
        )
