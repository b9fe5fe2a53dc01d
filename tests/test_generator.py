"""The one generator interface (issue 19 §1): per-request seeds, cancellation, streaming, whole-chat
rendering, and an episode run against a Generator that is not an AsyncEngine.

All on CPU with the ~1M-parameter tiny model (character tokenizer), on both backends.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

import pytest
import torch

import policyflow.agent.episode as episode_module
from policyflow.agent.episode import EpisodeRunner
from policyflow.agent.tool_env import ToolEnv, ToolSetup
from policyflow.config import AgentConfig
from policyflow.engine import AsyncEngine, Chunk, Engine, Generator, Request, SamplingParams
from policyflow.engine.async_engine import safe_text_end
from policyflow.model import build_char_tokenizer, build_tiny
from policyflow.problems import Problem
from policyflow.tokens import render_messages, render_prompt, render_observation
from policyflow.tools import Tool, ToolPool
from policyflow.types import Sample

BACKENDS = ["fast", "generic"]
PROMPTS = ["123+456=", "7*8=", "1", "99-100=", "(3+4)*5=", "x"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    return [tiny[1](p)["input_ids"] for p in PROMPTS]


def run_core(engine: Engine, requests: list[Request]) -> dict:
    for r in requests:
        engine.submit(r)
    out = {}
    while engine.has_work:
        for done in engine.step():
            out[done.request.id] = done.sample
    return out


async def until(condition, guard: int = 10_000) -> None:
    """Let the engine's loop run until `condition()` holds."""
    for _ in range(guard):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


SEEDED = SamplingParams(temperature=1.0, max_new_tokens=24, ignore_eos=True, seed=7)
OTHERS = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=30, ignore_eos=True)


# -- per-request seeds ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_seeded_request_draws_the_same_tokens_alone_or_batched(tiny, prompt_ids, backend):
    """Its tokens depend on (weights, prompt, params, seed) only: not on the shared generator's
    state nor on what else is in flight (log-probs equal up to float rounding of the batch)."""
    model, tok = tiny
    alone = run_core(Engine(model, tok, backend=backend, generator=torch.Generator().manual_seed(1)), [Request(prompt_ids[0], SEEDED, id="s")])["s"]
    crowd = [Request(p, OTHERS, id=i) for i, p in enumerate(prompt_ids[1:4])] + [Request(prompt_ids[0], SEEDED, id="s")]
    crowd += [Request(p, OTHERS, id=10 + i) for i, p in enumerate(prompt_ids[3:])]
    batched = run_core(Engine(model, tok, backend=backend, generator=torch.Generator().manual_seed(2)), crowd)["s"]
    assert len(alone.token_ids) == 24 and batched.token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(alone.logprobs, batched.logprobs)) < 1e-5
    other_seed = run_core(Engine(model, tok, backend=backend), [Request(prompt_ids[0], dataclasses.replace(SEEDED, seed=8), id="s")])["s"]
    assert other_seed.token_ids != alone.token_ids


def test_unseeded_rows_keep_the_shared_stream(tiny, prompt_ids):
    """With no seeded row the shared generator serves every row as before: same state, same tokens."""
    model, tok = tiny
    params = dataclasses.replace(OTHERS, temperature=1.0)
    runs = [run_core(Engine(model, tok, backend="fast", generator=torch.Generator().manual_seed(3)), [Request(p, params, id=i) for i, p in enumerate(prompt_ids)]) for _ in range(2)]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="seed must be None or an int"):
        SamplingParams(seed=-1)


def test_a_seeded_request_resumed_after_an_abort_goes_on_with_its_own_stream(tiny, prompt_ids):
    """An abort swap to the same weights: the resumed request continues its generator, so the
    tokens are those of the uninterrupted request."""
    model, tok = tiny
    whole = run_core(Engine(model, tok, backend="fast"), [Request(prompt_ids[1], SEEDED, id="s")])["s"]
    engine = Engine(model, tok, backend="fast")
    request = Request(prompt_ids[1], SEEDED, id="s")
    engine.submit(request)
    for _ in range(6):
        assert engine.step() == []
    engine.update_weights(None, version=1, mode="abort")
    [partial] = engine.step()
    assert partial.sample.finish_reason == "aborted" and len(partial.sample.token_ids) == 6
    rest = run_core(engine, [partial.request.resume(partial.sample)])["s"]
    assert partial.sample.token_ids + rest.token_ids == whole.token_ids
    assert rest.versions == (1,) * len(rest.token_ids)


# -- cancellation --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_frees_the_slot_and_leaves_the_others_unaffected(tiny, prompt_ids, backend):
    model, tok = tiny
    params = [dataclasses.replace(SEEDED, seed=s, max_new_tokens=20) for s in (1, 2, 3)]

    async def reference():
        engine = AsyncEngine(model, tok, backend=backend)
        try:
            return await asyncio.gather(*(engine.generate(prompt_ids[i], params[i]) for i in range(3)))
        finally:
            engine.close()

    async def with_cancel():
        engine = AsyncEngine(model, tok, backend=backend)
        tasks = [asyncio.ensure_future(engine.generate(prompt_ids[i], params[i], request_id=f"r{i}")) for i in range(3)]
        await until(lambda: engine.stats["steps"] >= 4)
        before = engine.num_active
        found = engine.cancel("r1")
        after = engine.num_active  # at once, before the next decode step
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        again = engine.cancel("r1")
        engine.close()
        return before, found, after, again, outcomes

    ref = asyncio.run(reference())
    before, found, after, again, outcomes = asyncio.run(with_cancel())
    assert (before, found, after, again) == (3, True, 2, False)
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert outcomes[0].token_ids == ref[0].token_ids and outcomes[2].token_ids == ref[2].token_ids
    assert max(abs(a - b) for a, b in zip(outcomes[2].logprobs, ref[2].logprobs)) < 1e-5


def test_cancel_a_queued_request_and_a_cancelled_caller_task(tiny, prompt_ids):
    """A queued request leaves the queue; a caller whose task asyncio cancels frees its row."""
    model, tok = tiny

    async def main():
        engine = AsyncEngine(model, tok, backend="fast", max_batch=1)
        first = asyncio.ensure_future(engine.generate(prompt_ids[0], SEEDED, request_id="a"))
        queued = asyncio.ensure_future(engine.generate(prompt_ids[1], SEEDED, request_id="b"))
        await until(lambda: engine.stats["steps"] >= 2)
        with pytest.raises(ValueError, match="request_id 'a' is already in flight"):
            await engine.generate(prompt_ids[2], SEEDED, request_id="a")
        state = [engine.core.num_active, engine.core.num_queued, engine.cancel("b"), engine.core.num_queued]
        first.cancel()
        outcomes = await asyncio.gather(first, queued, return_exceptions=True)
        state += [engine.core.num_active, engine.num_in_flight, engine.cancel("a")]
        engine.close()
        return state, outcomes

    state, outcomes = asyncio.run(main())
    assert state == [1, 1, True, 0, 0, 0, False]
    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)


# -- streaming -----------------------------------------------------------------------------------


async def collect(stream: AsyncIterator[Chunk]) -> list[Chunk]:
    return [chunk async for chunk in stream]


def joined(chunks: list[Chunk]) -> tuple[tuple[int, ...], tuple[float, ...], str]:
    return sum((c.token_ids for c in chunks), ()), sum((c.logprobs for c in chunks), ()), "".join(c.text for c in chunks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_equals_generate_for_the_same_seed(tiny, prompt_ids, backend):
    """Chunks arrive step by step while other requests decode; together they are the Sample
    `generate` returns for the same seed, text cut at the stop string included."""
    model, tok = tiny
    params = SamplingParams(temperature=1.0, max_new_tokens=40, seed=205, stop=("00", "Z2"))  # seed 205: a completion the stop string "00" cuts

    async def main():
        engine = AsyncEngine(model, tok, backend=backend)
        assert isinstance(engine, Generator) and engine.tokenizer is tok
        ref = await engine.generate(prompt_ids[0], params)
        others = [asyncio.ensure_future(engine.generate(p, OTHERS)) for p in prompt_ids[1:]]
        chunks = await collect(engine.stream(prompt_ids[0], params, request_id="s"))
        await asyncio.gather(*others)
        engine.close()
        return ref, chunks

    ref, chunks = asyncio.run(main())
    assert ref.finish_reason == "stop" and ref.text.endswith("00")  # the stop string cut the completion
    tokens, logprobs, text = joined(chunks)
    sample = chunks[-1].sample
    assert len(chunks) > 5 and all(c.sample is None for c in chunks[:-1]) and sample is not None
    assert (tokens, logprobs, text) == (sample.token_ids, sample.logprobs, sample.text)
    assert (sample.token_ids, sample.text, sample.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
    assert max(abs(a - b) for a, b in zip(sample.logprobs, ref.logprobs)) < 1e-5  # batched with others: float rounding only
    shown = ""
    for chunk in chunks[:-1]:
        shown += chunk.text
        assert ref.text.startswith(shown) and not shown.endswith("Z")  # a stop string's beginning is held back


def test_a_streamed_request_keeps_streaming_across_an_abort_swap(tiny, prompt_ids):
    model, tok = tiny
    other = build_tiny(seed=1)[0].eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=16, ignore_eos=True, seed=9)

    async def main():
        engine = AsyncEngine(build_tiny(seed=0)[0].eval(), tok, backend="fast")
        chunks = []
        async for chunk in engine.stream(prompt_ids[2], params, request_id="s"):
            chunks.append(chunk)
            if len(chunks) == 5:
                engine.update_weights(other.state_dict(), version=1, mode="abort")
        engine.close()
        return chunks

    chunks = asyncio.run(main())
    sample = chunks[-1].sample
    assert joined(chunks) == (sample.token_ids, sample.logprobs, sample.text)
    assert len(sample.token_ids) == 16 and sample.versions == (0,) * 5 + (1,) * 11 and sample.finish_reason == "length"


def test_safe_text_end_holds_back_incomplete_characters_and_stop_beginnings():
    assert safe_text_end("abc", ()) == 3
    assert safe_text_end("ab\ufffd\ufffd", ()) == 2
    assert safe_text_end("x</ans", ("</answer>",)) == 1
    assert safe_text_end("x</ans\ufffd", ("</answer>", "s")) == 1
    assert safe_text_end("x<", ("</answer>", "<b")) == 1
    assert safe_text_end("answer", ("</answer>",)) == 6


# -- rendering whole chats -----------------------------------------------------------------------

# Tools in a system block before the conversation, then every message with its role (Qwen's shape).
TOOLS_TEMPLATE = (
    "{%- if tools %}[tools]{% for t in tools %}{{ t | tojson }}{% endfor %}<eos>\n{% endif %}"
    "{%- for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}"
    "{%- if add_generation_prompt %}[assistant]{% endif %}"
)
ADD_SCHEMA = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def test_render_messages_with_a_system_message_and_tools():
    tok = build_char_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "<tool_call>add</tool_call>"},
        {"role": "tool", "content": "3"},
    ]
    ids = render_messages(tok, chat, True, tools=[ADD_SCHEMA])
    assert tok.decode(ids) == (
        '[tools]{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}<eos>\n'
        "[system]Be brief.<eos>\n[user]1+2?<eos>\n[assistant]<tool_call>add</tool_call><eos>\n[tool]3<eos>\n[assistant]"
    )
    assert render_prompt(tok, "1+2?", True) == render_messages(tok, [{"role": "user", "content": "1+2?"}], True)
    assert tok.decode(render_prompt(tok, "1+2?", True)) == "[user]1+2?<eos>\n[assistant]"


def test_render_messages_for_plain_models():
    """No template: system messages then one user message, joined by a blank line; chats refused."""
    tok = build_char_tokenizer()
    ids = render_messages(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2?"}], False)
    assert tok.decode(ids) == "Be brief.\n\n1+2?"
    assert render_prompt(tok, "1+2?", False) == tok("1+2?", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"^a model without a chat template takes system messages then one user message, got roles \['user', 'assistant', 'user'\]"):
        render_messages(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], False)
    with pytest.raises(ValueError, match="every message needs a 'role' string"):
        render_messages(tok, [{"content": "a"}], False)


# -- an episode against any Generator ------------------------------------------------------------


class ScriptedGenerator:
    """A Generator that is not an AsyncEngine: each call answers with the next scripted turn
    (character tokens, ending with EOS) and records the prompt it was given."""

    version = 3
    max_positions = None

    def __init__(self, tokenizer, turns: list[str]):
        self.tokenizer, self.turns, self.prompts = tokenizer, list(turns), []

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample:
        self.prompts.append(list(prompt_ids))
        text = self.turns.pop(0)
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + (self.tokenizer.eos_token_id,)
        return Sample(tuple(prompt_ids), ids, (-0.5,) * len(ids), (self.version,) * len(ids), "eos", text)

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> AsyncIterator[Chunk]:
        sample = await self.generate(prompt_ids, params, request_id=request_id)
        yield Chunk(sample.token_ids, sample.logprobs, sample.text, sample)

    def cancel(self, request_id: str) -> bool:
        return False


async def _add(a: int, b: int) -> str:
    return str(a + b)


ADD = Tool("add", "Add two integers.", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}, _add)


def test_an_episode_runs_against_any_generator():
    """A multi-turn tool episode (call the tool, read its result, answer) on the protocol alone."""
    assert "AsyncEngine" not in vars(episode_module)
    tok = build_char_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    turns = ['<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>', "<answer>3</answer>"]
    generator = ScriptedGenerator(tok, turns)
    assert isinstance(generator, Generator)
    setup = ToolSetup(ToolPool([ADD]), "hermes", lambda problem, answer: answer == "3")
    env = ToolEnv(Problem("p", "1+2?", "3"), "1+2?", setup)
    runner = EpisodeRunner(generator, tok, SamplingParams(max_new_tokens=80), AgentConfig(max_turns=4), chat_template=True)
    assert runner.generator is generator
    traj = asyncio.run(runner.run(env, id="e", task_id="t"))
    assert traj.status == "complete" and traj.num_turns == 2 and traj.num_tool_calls == 1 and traj.tools.errors == 0
    assert traj.reward_parts["correct"] == 1.0 and traj.start_version == traj.min_version == 3
    first_turn = tok(turns[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    obs, _ = render_observation(tok, "3", True)
    assert generator.prompts[0] == render_prompt(tok, "1+2?", True, tools=env.tools)
    assert generator.prompts[1] == generator.prompts[0] + first_turn + obs
    assert tok.decode(obs) == "\n[tool]3<eos>\n[assistant]"


# -- counter-based seeded uniforms (review of issue 19, item 7) ----------------------------------


def test_counter_uniforms_are_splitmix64_and_uniform():
    """u(seed, i) is splitmix64 computed in int64 tensor ops (checked against Python integers),
    and 10^5 draws of one seed pass a Kolmogorov-Smirnov bound (deterministic: a fixed seed)."""
    from policyflow.engine.sampling import counter_uniforms, seed_keys

    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    seed = 2**64 - 3  # a seed above 2**63 takes the int64 wrap-around
    key = mix(seed)
    expected = [(mix((key + (i + 1) * 0x9E3779B97F4A7C15) & mask) >> 11) / 2**53 for i in range(5)]
    got = counter_uniforms(seed_keys([seed] * 5), torch.arange(5), torch.float64)
    assert got.tolist() == expected
    n = 100_000
    u = counter_uniforms(seed_keys([12345] * n), torch.arange(n), torch.float32).double().sort().values
    assert 0 <= float(u[0]) and float(u[-1]) < 1
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = max(float((grid - u).max()), float((u - (grid - 1 / n)).max()))
    assert ks < 1.63 / n**0.5  # the 1% critical value
    assert abs(float(u.mean()) - 0.5) < 0.005
    seeds = counter_uniforms(seed_keys(range(n)), torch.zeros(n, dtype=torch.long)).double().sort().values
    assert max(float((grid - seeds).max()), float((seeds - (grid - 1 / n)).max())) < 1.63 / n**0.5  # across seeds too


class ByteTokenizer:
    """Token k's bytes: ASCII for k < 96, else pieces of multi-byte UTF-8 characters (a lead byte
    alone, continuation bytes, whole characters), decoded with errors="replace"; token 1 is EOS."""

    PIECES = [b"\xe4", b"\xb8\xad", b"\xe4\xb8", b"\xad", b"\xc3", b"\xa9", b"\xf0\x9f", b"\x98\x80", "é".encode(), "中".encode(), "😀".encode()]
    eos_token_id = 1
    pad_token_id = 0

    def piece(self, k: int) -> bytes:
        return bytes([32 + k]) if k < 96 else self.PIECES[k % len(self.PIECES)]

    def __len__(self) -> int:
        return 160

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return b"".join(self.piece(k) for k in ids if not (skip_special_tokens and k < 2)).decode("utf-8", errors="replace")

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def test_streamed_text_decoded_incrementally_equals_the_full_decode():
    """Streaming decodes each step's new tokens with a short context, never the whole completion;
    on a long stream of multi-byte characters (and broken ones) the chunks still add up to the
    full decode, and no chunk ends inside a character."""
    from policyflow.model import build_tiny_model

    tok = ByteTokenizer()
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=1, init_std=0.5, seed=3).eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=400, ignore_eos=True, seed=11)
    decoded: list[int] = []
    real = tok.batch_decode

    def counting(batch, skip_special_tokens=False):
        decoded.extend(len(ids) for ids in batch)
        return real(batch, skip_special_tokens)

    async def main():
        engine = AsyncEngine(model, tok, backend="fast")
        tok.batch_decode = counting
        try:
            return await collect(engine.stream([5, 6, 7], params))
        finally:
            engine.close()

    chunks = asyncio.run(main())
    del tok.batch_decode
    sample = chunks[-1].sample
    assert len(sample.token_ids) == 400 and sum(t >= 96 for t in sample.token_ids) > 100
    assert "".join(c.text for c in chunks) == sample.text == tok.decode(sample.token_ids, skip_special_tokens=True)
    assert any(ord(ch) > 127 and ch != "\ufffd" for ch in sample.text)  # whole multi-byte characters were streamed
    assert all(not c.text.endswith("\ufffd") for c in chunks[:-1])
    assert len(chunks) > 50 and max(decoded) < 40  # never the whole completion again
