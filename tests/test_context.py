"""Context policies: full keeps everything (grows linearly), mem1 keeps prompt + latest turn + latest obs (flat)."""

from __future__ import annotations

import random

import pytest

from policyflow.agent.context import CONTEXT_POLICIES, context_policy, context_tokens, full_context, mem1_context
from policyflow.types import Segment

PROMPT, GEN, OBS = 30, 12, 25


def _gen(n: int, turn: int) -> Segment:
    return Segment("gen", tuple(range(n)), logprobs=(-1.0,) * n, versions=(0,) * n, turn=turn, text=f"<state>{turn}</state><search>q</search>")


def _obs(n: int, turn: int) -> Segment:
    return Segment("obs", tuple(range(n)), turn=turn, text="info")


def _episode(turns: int, rng: random.Random | None = None) -> list[Segment]:
    """Prompt, then `turns` × (gen, obs); lengths jitter by ±3 when rng is given."""
    jitter = (lambda: rng.randint(-3, 3)) if rng else (lambda: 0)  # noqa: E731
    segments = [Segment("prompt", tuple(range(PROMPT)), text="Q: ?")]
    for t in range(1, turns + 1):
        segments += [_gen(GEN + jitter(), t), _obs(OBS + jitter(), t)]
    return segments


def _peak_context(policy, turns: int, rng=None) -> int:
    """Largest context over the calls of an episode: call t sees policy(segments before it)."""
    segments = _episode(turns, rng)
    return max(context_tokens(segments, policy(segments[:end])) for end in range(1, len(segments) + 1, 2))


def test_policies_pick_the_right_segments():
    segs = _episode(3)  # 0 prompt, 1 gen, 2 obs, 3 gen, 4 obs, 5 gen, 6 obs
    assert full_context(segs) == tuple(range(7))
    assert mem1_context(segs) == (0, 5, 6)
    assert mem1_context(segs[:1]) == (0,)  # the first call sees the prompt
    assert mem1_context(segs[:3]) == (0, 1, 2)  # after one turn nothing is dropped yet
    # an observation before the first turn counts as prompt; glue after the latest gen is kept
    pre = [Segment("prompt", (1, 2)), Segment("obs", (3,)), _gen(2, 1), _obs(2, 1), _gen(2, 2), _obs(1, 2), _obs(1, 2)]
    assert mem1_context(pre) == (0, 1, 4, 5, 6)


def test_mem1_is_flat_and_full_grows_linearly():
    for rng_seed in (None, 0, 1):
        rng = random.Random(rng_seed) if rng_seed is not None else None
        mem8, mem128 = _peak_context(mem1_context, 8, rng), _peak_context(mem1_context, 128, rng)
        assert mem8 <= mem128 <= 1.5 * mem8
    # without jitter the numbers are exact: mem1 = prompt + one turn; full = prompt + all turns before the last call
    assert _peak_context(mem1_context, 8) == _peak_context(mem1_context, 128) == PROMPT + GEN + OBS
    assert _peak_context(full_context, 8) == PROMPT + 8 * (GEN + OBS)
    assert _peak_context(full_context, 128) == PROMPT + 128 * (GEN + OBS)


def test_full_contexts_extend_each_other_and_mem1_contexts_do_not():
    segs = _episode(4)
    call_ends = range(1, len(segs) + 1, 2)  # call t sees segs[:end]: the prompt and t − 1 turns
    full = [full_context(segs[:end]) for end in call_ends]
    mem = [mem1_context(segs[:end]) for end in call_ends]
    assert all(b[: len(a)] == a for a, b in zip(full, full[1:]))
    assert [b[: len(a)] == a for a, b in zip(mem, mem[1:])] == [True, False, False, False]


def test_registry():
    assert CONTEXT_POLICIES == {"full": full_context, "mem1": mem1_context}
    assert context_policy("mem1") is mem1_context
    with pytest.raises(ValueError, match="unknown context policy 'lru'; choose one of \\['full', 'mem1'\\]"):
        context_policy("lru")
