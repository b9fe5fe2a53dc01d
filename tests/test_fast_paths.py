"""Fast paths give the plain path's numbers: the trainer's forward (shared prompts, length
buckets, no attention mask, logits only where needed) against one full masked forward, the
fast decoder's prefill against HF's forward, and `collate` against a row-by-row copy."""

import copy

import pytest
import torch

from policyflow import trainer as trainer_module
from policyflow.config import SamplingConfig
from policyflow.model import build_tiny
from policyflow.trainer import sequence_logprobs


def right_padded_batch(lengths: list[int], prompt_lens: list[int], vocab: int, seed: int = 0):
    """Random tokens, right-padded; `needed` marks the completion positions (prompt_len .. len-1)."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    ids = torch.randint(2, vocab, (B, T), generator=gen)
    positions = torch.arange(T)
    attention = (positions[None, :] < torch.tensor(lengths)[:, None]).long()
    needed = attention.bool() & (positions[None, :] >= torch.tensor(prompt_lens)[:, None])
    return ids * attention, attention, needed


POLICIES = [None, SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9, top_k=7)]


@pytest.mark.parametrize("policy", POLICIES, ids=["model", "t1", "t0.7-p0.9-k7"])
def test_bucketed_logprobs_and_gradients_match_the_full_masked_forward(policy) -> None:
    model, _ = build_tiny(seed=3)
    lengths = [5, 17, 9, 12, 3, 17, 8, 14, 6, 11]
    prompt_lens = [2, 6, 4, 4, 1, 9, 3, 5, 2, 7]
    ids, attention, needed = right_padded_batch(lengths, prompt_lens, model.config.vocab_size)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))

    results = []
    for buckets in (0, 1, 3, 4, 10):
        m = copy.deepcopy(model)
        lp = sequence_logprobs(m, ids, attention, policy, needed_BT=needed, buckets=buckets)
        (torch.where(needed, lp, 0.0) * weights).sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in m.parameters()]))
    plain_lp, plain_grads = results[0]
    assert torch.isfinite(plain_lp[needed]).all()
    for lp, grads in results[1:]:
        assert (lp[needed] - plain_lp[needed]).abs().max() < 1e-5
        for g, ref in zip(grads, plain_grads):
            assert (g - ref).abs().max() <= 1e-5 * ref.abs().max().clamp(min=1)  # float rounding only


def test_default_needed_covers_every_real_position_and_left_padding_falls_back() -> None:
    model, _ = build_tiny(seed=4)
    ids, attention, _ = right_padded_batch([4, 10, 7], [1, 1, 1], model.config.vocab_size, seed=2)
    with torch.no_grad():
        plain = sequence_logprobs(model, ids, attention, buckets=0)
        fast = sequence_logprobs(model, ids, attention)
        real = attention.bool()
        real[:, 0] = False
        assert (fast[real] - plain[real]).abs().max() < 1e-5
        assert (fast[:, 0] == 0).all()
        # Left padding is not right padding: the plain masked forward, bit for bit.
        left_mask = attention.flip(1)
        left_ids = ids.flip(1)
        assert torch.equal(sequence_logprobs(model, left_ids, left_mask), sequence_logprobs(model, left_ids, left_mask, buckets=0))


def test_nothing_needed_gives_zeros_without_a_forward() -> None:
    model, _ = build_tiny(seed=5)
    ids, attention, needed = right_padded_batch([4, 6], [4, 6], model.config.vocab_size)
    assert not needed.any()
    out = sequence_logprobs(model, ids, attention, needed_BT=needed)
    assert torch.equal(out, torch.zeros(ids.shape))


def test_trainer_step_with_buckets_matches_the_plain_forward(small_config, monkeypatch) -> None:
    from tests.test_trainer import make_trainer, one_batch

    cfg = small_config()
    session, batch = one_batch(cfg)
    start = copy.deepcopy(session.model.state_dict())
    after = {}
    for buckets in (0, trainer_module.LENGTH_BUCKETS):
        session.model.load_state_dict(start)
        monkeypatch.setattr(trainer_module, "LENGTH_BUCKETS", buckets)
        metrics = make_trainer(session, cfg).step(batch)
        after[buckets] = ({k: v for k, v in metrics.items() if k.startswith("loss/")}, copy.deepcopy(session.model.state_dict()))
    (m0, w0), (m1, w1) = after.values()
    for key in m0:
        assert m1[key] == pytest.approx(m0[key], rel=1e-4, abs=1e-6), key
    for key in w0:
        assert (w0[key] - w1[key]).abs().max() <= 1e-5 * w0[key].abs().max().clamp(min=1), key


@pytest.mark.parametrize("long", [False, True], ids=["short-prompts", "long-prompts-sdpa"])
def test_fast_prefill_last_position_logits_match_the_hf_forward(long: bool) -> None:
    """The prefill's last layer runs only at each prompt's last position: the same next-token
    logits as HF's full forward, and the same K/V (the following decode step agrees too)."""
    from policyflow.engine.fast_decoder import FastDecoder

    model, tokenizer = build_tiny(seed=6)
    model.eval()
    texts = ["1+2=", "345+6789=", "12*3=", "9"] if not long else ["12345678+" * 9, "1+2=", "98765+" * 12]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    decoder = FastDecoder(model)
    assert (max(map(len, prompts)) > decoder.short_prompt) == long
    with torch.no_grad():
        first = decoder.prefill(prompts, reserve=max(map(len, prompts)) + 2)
        nxt = first.argmax(-1)
        second = decoder.decode(nxt)
        for i, p in enumerate(prompts):
            ids = torch.tensor([p + [int(nxt[i])]])
            ref = model(input_ids=ids).logits[0]
            assert (first[i] - ref[-2]).abs().max() < 1e-5
            assert (second[i] - ref[-1]).abs().max() < 1e-5


@pytest.mark.parametrize("policy", POLICIES, ids=["model", "t1", "t0.7-p0.9-k7"])
def test_short_rows_attention_gives_sdpas_logprobs_and_gradients(policy, monkeypatch) -> None:
    """Batches of at most SHORT_ATTENTION_MAX_KEYS tokens attend with `short_attention` (it is
    called, and the model's setting is back to sdpa afterwards): log-probs and gradients equal
    SDPA's, through the shared-prompt path, the buckets and a left-padded masked forward
    (whose padding queries see no key at all)."""
    from transformers import AttentionInterface

    from policyflow import model as model_module

    model, tokenizer = build_tiny(seed=8)
    vocab = len(tokenizer)
    shared_ids, shared_mask, shared_needed = right_padded_batch([9, 12, 7, 10, 9, 11], [5, 5, 5, 4, 4, 4], vocab, seed=3)
    shared_ids[1:3, :5] = shared_ids[0, :5]  # two groups of three rows sharing a prompt
    shared_ids[4:6, :4] = shared_ids[3, :4]
    bucket_ids, bucket_mask, bucket_needed = right_padded_batch([5, 9, 12, 7], [2, 3, 4, 1], vocab, seed=4)
    left_mask = bucket_mask.flip(1)
    left_needed = left_mask.bool() & (left_mask.cumsum(1) > 1)  # a row's first token is predicted from padding
    batches = [(shared_ids, shared_mask, shared_needed), (bucket_ids, bucket_mask, bucket_needed),
               (bucket_ids.flip(1), left_mask, left_needed)]
    calls = []
    real = AttentionInterface._global_mapping[model_module.SHORT_ATTENTION]
    monkeypatch.setitem(AttentionInterface._global_mapping, model_module.SHORT_ATTENTION,
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(ids, mask, needed):
        model.zero_grad()
        lp = sequence_logprobs(model, ids, mask, policy, needed_BT=needed)
        (lp * needed).sum().backward()
        return lp.detach() * needed, {n: p.grad.clone() for n, p in model.named_parameters()}

    short = [run(*b) for b in batches]
    assert len(calls) == 4 * (2 + 4 + 1)  # 4 layers x (shared: prompts + continuations; a bucket per row; masked)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(model_module, "SHORT_ATTENTION_MAX_KEYS", 0)
    for (lp, grads), batch in zip(short, batches):
        ref_lp, ref_grads = run(*batch)
        assert torch.isfinite(lp).all() and (lp - ref_lp).abs().max() < 1e-5
        for name, g in grads.items():
            assert (g - ref_grads[name]).abs().max() <= 1e-5 * ref_grads[name].abs().max().clamp(min=1), name
    assert len(calls) == 28  # SDPA did the reference runs


def test_fast_prefill_runs_repeated_prompts_once_and_every_row_matches_the_hf_forward(monkeypatch) -> None:
    """Repeated prompts (a group's samples), admitted next to a row already in flight and split
    over sub-batches: each distinct prompt is computed once, and every row's prefill logits
    and its next two decode steps (different tokens per row) equal HF's forward of that row."""
    from policyflow.engine.fast_decoder import FastDecoder

    model, tokenizer = build_tiny(seed=7)
    model.eval()
    a, b, c, d = (tokenizer(t)["input_ids"] for t in ["1+2=", "345+6789=", "12*3=", "77-5="])
    prompts = [a, b, a, c, b, a]
    decoder = FastDecoder(model, prefill_tokens=10)  # one prompt per sub-batch
    computed = []
    real_prefill = decoder._prefill
    monkeypatch.setattr(decoder, "_prefill", lambda ps: computed.extend(map(tuple, ps)) or real_prefill(ps))
    with torch.no_grad():
        decoder.prefill([d], reserve=16)
        first = decoder.prefill(prompts, reserve=16)
        assert computed == [tuple(d), tuple(a), tuple(b), tuple(c)]
        seqs = [list(d)] + [list(p) for p in prompts]
        steps = [first]
        for t in range(2):
            tokens = torch.tensor([(5 * i + 3 * t) % 90 + 3 for i in range(len(seqs))])
            for seq, tok in zip(seqs, tokens.tolist()):
                seq.append(tok)
            steps.append(decoder.decode(tokens)[1:])
        for i, seq in enumerate(seqs[1:], start=1):
            ref = model(input_ids=torch.tensor([seq])).logits[0]
            for t, got in enumerate(steps):
                assert (got[i - 1] - ref[len(prompts[i - 1]) - 1 + t]).abs().max() < 1e-5, (i, t)


@pytest.mark.parametrize("policy", POLICIES, ids=["model", "t1", "t0.7-p0.9-k7"])
def test_shared_prompt_forward_matches_the_full_masked_forward(policy, monkeypatch) -> None:
    """Groups of rows with one prompt each (prompts of 3 lengths, completions of many): the
    prompt runs once per group, and log-probs and gradients are the full forward's."""
    model, _ = build_tiny(seed=7)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, model.config.vocab_size, (n,), generator=gen).tolist() for n in (3, 5, 5, 8)]
    rows, firsts = [], []
    for g, prompt in enumerate(prompts):
        for j in range(4):
            completion = torch.randint(2, model.config.vocab_size, (1 + (3 * g + 5 * j) % 9,), generator=gen).tolist()
            rows.append(prompt + completion)
            firsts.append(len(prompt))
    order = torch.randperm(len(rows), generator=gen).tolist()  # groups need not be contiguous
    rows, firsts = [rows[i] for i in order], [firsts[i] for i in order]
    lengths = torch.tensor([len(r) for r in rows])
    T = int(lengths.max())
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    positions = torch.arange(T)
    attention = (positions[None, :] < lengths[:, None]).long()
    needed = attention.bool() & (positions[None, :] >= torch.tensor(firsts)[:, None])
    assert trainer_module._shared_prompts(ids, lengths, needed) is not None  # the shared path runs...

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to the bucketed forward")

    monkeypatch.setattr(trainer_module, "_bucketed_logprobs", no_fallback)  # ...and does not fall back
    weights = torch.randn(ids.shape, generator=gen)
    results = []
    for buckets in (0, 1, 4):
        m = copy.deepcopy(model)
        lp = sequence_logprobs(m, ids, attention, policy, needed_BT=needed, buckets=buckets)
        (torch.where(needed, lp, 0.0) * weights).sum().backward()
        results.append((lp.detach(), [p.grad.clone() for p in m.parameters()]))
    plain_lp, plain_grads = results[0]
    for lp, grads in results[1:]:
        assert (lp[needed] - plain_lp[needed]).abs().max() < 1e-5
        for g, ref in zip(grads, plain_grads):
            assert (g - ref).abs().max() <= 1e-5 * ref.abs().max().clamp(min=1)


def test_collate_pads_every_row_like_a_row_by_row_copy() -> None:
    """The one-shot padded tensors equal writing each row into a pad-filled batch by hand."""
    from policyflow.tokens import collate, episode_rows
    from policyflow.types import Segment, Trajectory

    def episode(prompt: list[int], gen: list[int], version: int) -> Trajectory:
        segments = [Segment("prompt", tuple(prompt)),
                    Segment("gen", tuple(gen), tuple(-0.25 * (i + 1) for i in range(len(gen))), (version,) * len(gen))]
        return Trajectory(id="e", task_id="t", segments=segments, calls=[], num_turns=1, start_version=0)

    episodes = [episode([5, 6, 7], [8, 9], 3), episode([5], [4, 4, 4, 4], 1), episode([2, 2], [3], 0)]
    batch = collate(episodes, torch.tensor([1.0, -1.0, 0.5]), pad_id=11)
    T = 5
    for b, t in enumerate(episodes):
        (ids, mask, lps, _), = episode_rows(t)
        n = len(ids)
        assert batch.input_ids_BT[b].tolist() == ids + [11] * (T - n)
        assert batch.attention_mask_BT[b].tolist() == [1] * n + [0] * (T - n)
        assert batch.loss_mask_BT[b].tolist() == mask + [0] * (T - n)
        assert batch.behav_logprobs_BT[b].tolist() == lps + [0.0] * (T - n)
    assert batch.loss_mask_BT.dtype == batch.behav_logprobs_BT.dtype == torch.float32
    assert batch.input_ids_BT.dtype == batch.attention_mask_BT.dtype == torch.long
    assert batch.advantages_B.tolist() == [1.0, -1.0, 0.5]


def test_a_group_tokenizes_its_prompt_once_and_gets_render_prompts_ids(monkeypatch) -> None:
    import asyncio

    from policyflow.agent import episode as episode_module
    from policyflow.tokens import render_prompt
    from tests.test_episodes import PROBLEM, ScriptedBuilder, _runner

    model, tokenizer = build_tiny(seed=0)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return render_prompt(*args, **kwargs)

    monkeypatch.setattr(episode_module, "render_prompt", counting)
    runner = _runner((model.eval(), tokenizer))
    group, _ = asyncio.run(runner.run_group(ScriptedBuilder(PROBLEM, turns=2), 4, task_id="t"))
    assert len(calls) == 1
    expected = tuple(render_prompt(tokenizer, calls[0], False))
    assert all(t.segments[0].token_ids == expected for t in group.trajectories)
