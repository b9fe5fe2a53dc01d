"""GRPO-ATS (Thyme, arXiv 2508.11630): the sampling policy is per-token data.

The engine switches to a segment's policy (greedy code) in the middle of a sequence and records
each token's (temperature, top_p, top_k); the trainer recomputes every log-prob under its own
token's policy on every fast path; greedy tokens stay out of the loss; and the first on-policy
step has ratio 1 and clips nothing in every mode, with text at T = 0.8, top_p = 0.9 and code at
T = 0 (and at T = 0.3, where code tokens are trained under their own policy).
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch

from policyflow import coordinator, model as model_module
from policyflow.config import ConfigError, SamplingConfig, load_config
from policyflow.engine import AsyncEngine, Engine, Request, SamplingParams, SegmentPolicy, generate_blocking
from policyflow.engine.segments import EVERY_TOKEN, SegmentScanner, SegmentWatch, watched_tokens
from policyflow.model import build_tiny
from policyflow.ops import policy_log_distribution, policy_logprobs, shifted_token_logprobs
from policyflow.rollout import build_batch, rollout_groups
from policyflow.session import open_session
from policyflow.tokens import NO_POLICY, collate
from policyflow.trainer import Trainer, TokenPolicies, sequence_logprobs
from policyflow.types import Segment, TokenPolicy, Trajectory
from policyflow.policy import PolicySpec

TEXT = TokenPolicy(0.8, 0.9, 0)  # the text policy; code at T = 0
QUIET = dict(log=lambda *_: None)


def naive_inside(text: str, open_: str, close: str) -> bool:
    """Whether `text` ends inside a segment, scanned from scratch (the reference for the engine's incremental scan)."""
    inside, pos = False, 0
    while (at := text.find(close if inside else open_, pos)) >= 0:
        inside, pos = not inside, at + len(close if inside else open_)
    return inside


def expected_policies(tokenizer, token_ids, rule: SegmentPolicy, base: TokenPolicy) -> list[TokenPolicy]:
    """Token i is drawn from the policy of the state the text of tokens[:i] ends in."""
    return [rule.policy if naive_inside(tokenizer.decode(token_ids[:i], skip_special_tokens=True), rule.open, rule.close) else base
            for i in range(len(token_ids))]


def policy_tensors(rows: list[list[TokenPolicy]], T: int) -> TokenPolicies:
    table = torch.tensor([r + [NO_POLICY] * (T - len(r)) for r in rows], dtype=torch.float64)
    return TokenPolicies(table[..., 0].float(), table[..., 1].float(), table[..., 2].long())


# -- ops: closed form ---------------------------------------------------------------------------


def test_policy_logprobs_per_token_closed_form() -> None:
    """One logits row p = (0.5, 0.3, 0.15, 0.05) at six positions, each under its own policy."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = torch.log(p).expand(2, 3, 4).clone().requires_grad_(True)
    temperature = torch.tensor([[1.0, 0.0, 1.0], [0.5, 1.0, 0.5]], dtype=torch.float64)
    top_p = torch.tensor([[1.0, 0.3, 0.7], [1.0, 1.0, 0.6]], dtype=torch.float64)
    top_k = torch.tensor([[0, 1, 0], [0, 2, 3]])
    targets = torch.tensor([[2, 0, 1], [0, 1, 1]])
    sq = p**2 / (p**2).sum()  # T = 0.5
    expected = torch.tensor([
        [math.log(0.15),               # untruncated T = 1
         math.log(0.5),                # greedy: the T = 1 log-softmax, no truncation
         math.log(0.3 / 0.8)],         # top_p 0.7 keeps {0, 1}
        [math.log(sq[0]),              # T = 0.5
         math.log(0.3 / 0.8),          # top_k 2
         math.log(sq[1] / (sq[0] + sq[1]))],  # top_k 3, then top_p 0.6 keeps {0}; token 1 left it: the finite floor over {0, 1}
    ], dtype=torch.float64)
    got = policy_logprobs(logits, targets, temperature, top_p, top_k)
    torch.testing.assert_close(got, expected)
    assert policy_log_distribution(logits[1, 2:], 0.5, 0.6, 3)[0, 1] == float("-inf")  # the sampler never draws it
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert torch.isfinite(grad).all()
    # one number for every token and a tensor holding it everywhere give the same log-probs
    for t, tp, tk in [(0.8, 0.9, 0), (1.0, 1.0, 0), (0.0, 0.9, 5), (1.3, 1.0, 2)]:
        scalar = policy_logprobs(logits, targets, t, tp, tk)
        full = lambda v: torch.full((2, 3), v, dtype=torch.float64 if isinstance(v, float) else torch.long)  # noqa: E731
        tensors = policy_logprobs(logits, targets, full(t), full(tp), full(tk))
        assert torch.equal(scalar, tensors)
    ids = torch.tensor([[3, 2, 0, 1]])
    shifted = shifted_token_logprobs(torch.log(p).expand(1, 4, 4), ids, torch.tensor([[9.0, 1.0, 0.0, 1.0]]), 1.0, 0)
    torch.testing.assert_close(shifted, torch.tensor([[0.0, math.log(0.15), math.log(0.5), math.log(0.3)]], dtype=torch.float64))


# -- the trainer's forward: every path, per-token policies --------------------------------------


def _batches(vocab: int):
    """(ids, attention, needed) batches: length buckets, and groups sharing a prompt (the shared-prompt path)."""
    gen = torch.Generator().manual_seed(0)
    lengths, prompt_lens = [5, 17, 9, 12, 3, 17, 8, 14], [2, 6, 4, 4, 1, 9, 3, 5]
    T = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), T), generator=gen)
    pos = torch.arange(T)
    attention = (pos[None, :] < torch.tensor(lengths)[:, None]).long()
    bucketed = (ids * attention, attention, attention.bool() & (pos[None, :] >= torch.tensor(prompt_lens)[:, None]))
    shared_lengths, shared_prompts = [9, 12, 7, 10, 9, 11], [5, 5, 5, 4, 4, 4]
    shared = torch.randint(2, vocab, (6, 12), generator=gen)
    shared[1:3, :5] = shared[0, :5]
    shared[4:6, :4] = shared[3, :4]
    pos = torch.arange(12)
    attention = (pos[None, :] < torch.tensor(shared_lengths)[:, None]).long()
    needed = attention.bool() & (pos[None, :] >= torch.tensor(shared_prompts)[:, None])
    return {"buckets": bucketed, "shared": (shared * attention, attention, needed)}


def _random_policies(shape, seed: int) -> TokenPolicies:
    gen = torch.Generator().manual_seed(seed)
    pick = lambda values: torch.tensor(values)[torch.randint(len(values), shape, generator=gen)]  # noqa: E731
    return TokenPolicies(pick([0.0, 0.5, 0.8, 1.3]).float(), pick([1.0, 0.9, 0.6]).float(), pick([0, 0, 3, 7]))


def _run(model, ids, attention, needed, policy, buckets):
    m = copy.deepcopy(model)
    lp = sequence_logprobs(m, ids, attention, policy, needed_BT=needed, buckets=buckets)
    (torch.where(needed, lp, 0.0) * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
    return torch.where(needed, lp.detach(), 0.0), [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("short", [True, False], ids=["short-rows-attention", "sdpa"])
@pytest.mark.parametrize("batch", ["buckets", "shared"])
def test_per_token_policies_equal_to_the_scalar_are_identical_on_every_path(batch, short, monkeypatch) -> None:
    """The per-token path with every token at one policy gives the numbers path's log-probs and
    gradients, on the plain masked forward, the length buckets and the shared-prompt forward."""
    if not short:
        monkeypatch.setattr(model_module, "SHORT_ATTENTION_MAX_KEYS", 0)
    model, _ = build_tiny(seed=3)
    ids, attention, needed = _batches(model.config.vocab_size)[batch]
    for t, tp, tk in [(1.0, 1.0, 0), (0.7, 0.9, 7)]:
        tensors = TokenPolicies(torch.full(ids.shape, t), torch.full(ids.shape, tp), torch.full(ids.shape, tk))
        for buckets in (0, 1, 4):
            lp, grads = _run(model, ids, attention, needed, SamplingConfig(temperature=t, top_p=tp, top_k=tk), buckets)
            lp_t, grads_t = _run(model, ids, attention, needed, tensors, buckets)
            assert torch.equal(lp, lp_t)
            assert all(torch.equal(a, b) for a, b in zip(grads, grads_t))


@pytest.mark.parametrize("short", [True, False], ids=["short-rows-attention", "sdpa"])
@pytest.mark.parametrize("batch", ["buckets", "shared"])
def test_mixed_per_token_policies_are_each_tokens_own_on_every_path(batch, short, monkeypatch) -> None:
    """Tokens under four temperatures (greedy included), three top_p and three top_k, mixed in
    every row: each log-prob is its own policy's, computed from one row's forward at a time
    with scalar policies; every path agrees with it, gradients with the plain path's."""
    if not short:
        monkeypatch.setattr(model_module, "SHORT_ATTENTION_MAX_KEYS", 0)
    model, _ = build_tiny(seed=4)
    ids, attention, needed = _batches(model.config.vocab_size)[batch]
    policy = _random_policies(ids.shape, seed=1)
    reference = torch.zeros(ids.shape)
    with torch.no_grad():
        for b in range(ids.shape[0]):
            n = int(attention[b].sum())
            logits = model(input_ids=ids[b:b + 1, :n]).logits[0]
            for t in range(1, n):
                args = (float(policy.temperature[b, t]), float(policy.top_p[b, t]), int(policy.top_k[b, t]))
                reference[b, t] = policy_logprobs(logits[t - 1], ids[b, t], *args) if needed[b, t] else 0.0
    results = [_run(model, ids, attention, needed, policy, buckets) for buckets in (0, 1, 4)]
    (plain_lp, plain_grads), *fast = results
    assert (plain_lp - reference).abs().max() < 1e-5
    for lp, grads in fast:
        assert (lp - reference).abs().max() < 1e-5
        for g, ref in zip(grads, plain_grads):
            assert (g - ref).abs().max() <= 1e-5 * ref.abs().max().clamp(min=1)


# -- the engine: switching in the middle of a sequence ------------------------------------------


def _generate(model, tokenizer, backend, prompts, rules=(), tokens=40):
    engine = AsyncEngine(model, tokenizer, backend=backend, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(*TEXT, max_new_tokens=tokens, ignore_eos=True, segment_policies=rules)
    return generate_blocking(engine, prompts, params)


@pytest.mark.parametrize("backend", ["fast", "generic"])
def test_engine_samples_code_greedily_and_records_every_tokens_policy(backend) -> None:
    """Markers are single characters the random model writes: the most frequent one opens code;
    the two greedy characters that follow its first appearance close it. Every token carries the
    policy of the state its preceding text ends in (the marker's own tokens belong to the side
    they come from), code tokens are the argmax, and the engine's log-probs are the trainer's
    per-token recomputation."""
    model, tokenizer = build_tiny(seed=0)
    model.eval()
    prompts = [tokenizer(p)["input_ids"] for p in ["123+456=", "7*8=", "1", "99-100=", "(3+4)*5=", "x", "12", "a+b"]]
    plain = _generate(model, tokenizer, backend, prompts)
    open_ = Counter(c for s in plain for c in s.text).most_common(1)[0][0]
    probe = _generate(model, tokenizer, backend, prompts, (SegmentPolicy(open_, "NEVER", 0.0, TEXT.top_p),))
    first = next(s.text for s in probe if open_ in s.text[:-3])
    close = first[first.index(open_) + 1:][:2]
    rule = SegmentPolicy(open_, close, 0.0, TEXT.top_p)
    samples = _generate(model, tokenizer, backend, prompts, (rule,))

    opened = closed = 0
    for s in samples:
        assert list(s.policies) == expected_policies(tokenizer, s.token_ids, rule, TEXT)
        greedy = [i for i, p in enumerate(s.policies) if p.temperature == 0]
        opened += bool(greedy)
        closed += any(p == TEXT for p in s.policies[greedy[0]:]) if greedy else 0
        ids = torch.tensor([list(s.prompt_ids) + list(s.token_ids)])
        P = len(s.prompt_ids)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, P - 1:-1]
            policy = policy_tensors([[NO_POLICY] * P + list(s.policies)], ids.shape[1])
            recomputed = sequence_logprobs(model, ids, torch.ones_like(ids), policy)[0, P:]
        assert all(s.token_ids[i] == int(logits[i].argmax()) for i in greedy)
        assert (recomputed - torch.tensor(s.logprobs)).abs().max() < 1e-4
        if greedy:  # the token completing the open marker was sampled as text
            assert s.policies[greedy[0] - 1] == TEXT and tokenizer.decode(s.token_ids[:greedy[0]]).endswith(open_)
    assert opened >= 2 and closed >= 1
    assert [s.token_ids for s in samples] != [s.token_ids for s in plain]


def test_a_resumed_request_goes_on_in_the_segment_its_text_ended_in() -> None:
    """`text_before` (an abort's partial text) sets the starting state: tokens stay greedy across
    an abort swap inside code, and `join_samples` keeps every token's policy."""
    from policyflow.engine import join_samples

    model, tokenizer = build_tiny(seed=0)
    model.eval()
    rule = SegmentPolicy("<c>", "</c>", 0.0)
    params = SamplingParams(*TEXT, max_new_tokens=8, ignore_eos=True, segment_policies=(rule,))
    engine = Engine(model, tokenizer, generator=torch.Generator().manual_seed(0))
    request = Request(tokenizer("x=<c>")["input_ids"], params, id="q", text_before="x=<c>")
    engine.submit(request)
    engine.step()
    engine.step()
    engine.update_weights(None, version=1, mode="abort")
    (partial,) = engine.step()
    resumed = request.resume(partial.sample)
    assert resumed.text_before == "x=<c>" + partial.sample.text
    engine.submit(resumed)
    rest = []
    while engine.has_work:
        rest += engine.step()
    full = join_samples(partial.sample, rest[0].sample)
    assert full.policies == (rule.policy,) * 8 and full.versions == (0, 0) + (1,) * 6
    greedy = generate_blocking(AsyncEngine(model, tokenizer), [request.prompt_ids], SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    assert full.token_ids == greedy[0].token_ids


def test_segment_scanner_markers_across_tokens_and_several_rules() -> None:
    base = TokenPolicy(1.0, 1.0, 0)
    code, math_ = SegmentPolicy("<code>", "</code>", 0.0), SegmentPolicy("$$", "$/", 0.5)
    everything = SegmentWatch(EVERY_TOKEN, (EVERY_TOKEN, EVERY_TOKEN))
    scanner = SegmentScanner((code, math_), base, everything)
    text = ""
    states = []
    for piece in ["a <co", "de>x=1", "</", "code>", " $", "$y", "$/<code></code>z"]:
        text += piece
        scanner.scan(text)
        states.append(scanner.policy)
    assert states == [base, code.policy, code.policy, base, base, math_.policy, base]
    assert SegmentScanner((code,), base, everything, text_before="q<code>p").policy == code.policy
    # only tokens whose own text holds a marker's last character can complete it (and ids the tokenizer does not name)
    assert watched_tokens(["a", ">", "e>", "x"], "<code>", vocab_size=6) == frozenset({1, 2, 4, 5})
    assert watched_tokens(["a", " "], "end ") is EVERY_TOKEN and watched_tokens(["a"], "ü") is EVERY_TOKEN
    watch = SegmentWatch.of((code, math_), ["a", ">", "$", "/"], 4)
    assert watch.outside == frozenset({1, 2}) and watch.close == (frozenset({1}), frozenset({3}))


def test_segment_policy_and_config_errors_are_loud() -> None:
    for bad in [("", "x"), ("x", ""), ("x", "x")]:
        with pytest.raises(ValueError, match="marker"):
            SegmentPolicy(*bad, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        SegmentPolicy("a", "b", -0.1)
    with pytest.raises(ValueError, match="share an open marker"):
        SamplingParams(segment_policies=(SegmentPolicy("a", "b", 0.0), SegmentPolicy("a", "c", 0.5)))
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(build_tiny(seed=0)[0]).submit(Request([5], SamplingParams(segment_policies=(SegmentPolicy("a", "b", 0.0),))))
    for overrides, message in [
        (["agent.code_open=<c>", "agent.code_close=<c>"], "both '<c>'"),
        (["agent.code_temperature=-0.5"], "greater than or equal to 0"),
        (["agent.code_close="], "agent.code_close"),
        (["sampling.temperature=0"], "greedy tokens carry no policy gradient"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    assert load_config(None, []).agent.code_temperature == 0.0  # the paper's default
    assert load_config(None, ["agent.code_temperature="]).agent.code_temperature is None  # off


# -- batches and the trainer --------------------------------------------------------------------


def test_collate_carries_each_tokens_policy_and_leaves_greedy_tokens_out_of_the_loss() -> None:
    greedy, hot = TokenPolicy(0.0, 0.9, 0), TokenPolicy(1.2, 0.8, 5)
    segments = [Segment("prompt", (5, 6)), Segment("gen", (7, 8, 9), (-0.1, -0.2, -0.3), (0, 0, 0), policies=(TEXT, greedy, hot)),
                Segment("obs", (4,)), Segment("gen", (3,), (-0.4,), (1,), policies=(greedy,))]
    t = Trajectory(id="e", task_id="t", segments=segments, calls=[])
    batch = collate([t], torch.tensor([1.0]), pad_id=0)
    assert batch.loss_mask_BT.tolist() == [[0, 0, 1, 0, 1, 0, 0]]
    assert batch.behav_logprobs_BT[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, -0.3, 0, -0.4])
    assert batch.temperature_BT[0].tolist() == pytest.approx([1, 1, 0.8, 0, 1.2, 1, 0])
    assert batch.top_p_BT[0].tolist() == pytest.approx([1, 1, 0.9, 0.9, 0.8, 1, 0.9])
    assert batch.top_k_BT.tolist() == [[0, 0, 0, 0, 5, 0, 0]]
    untagged = Trajectory(id="u", task_id="t", segments=[Segment("gen", (1,), (0.0,), (0,))], calls=[])
    assert collate([untagged], torch.tensor([1.0]), pad_id=0).temperature_BT is None
    with pytest.raises(ValueError, match="with and without per-token policies"):
        collate([t, untagged], torch.tensor([1.0, 1.0]), pad_id=0)
    # An episode that ended before its first turn (a prompt, nothing generated) trains nothing and needs no policy.
    unstarted = Trajectory(id="p", task_id="t", segments=[Segment("prompt", (5, 6, 7))], calls=[])
    mixed = collate([t, unstarted], torch.tensor([1.0, 1.0]), pad_id=0)
    assert mixed.loss_mask_BT[1].tolist() == [0] * 7 and mixed.temperature_BT[1].tolist() == [1.0] * 7


def _code_config(small_config, code_temperature: str, *overrides: str):
    """Text at T 0.8, top_p 0.9; code opens at the letter the model writes most and closes at the next one."""
    base = ["sampling.temperature=0.8", "sampling.top_p=0.9", "sampling.max_new_tokens=24", "train.prompts_per_step=4",
            "train.group_size=6", "sft.max_steps=0", "eval.every=0", *overrides]
    session = open_session(PolicySpec.of(small_config(*base, "agent.code_temperature=")))
    problems = [session.task.train_problem(i) for i in range(8)]
    groups, _ = rollout_groups(session.runner, session.task, problems, 6, torch.Generator().manual_seed(0))
    counts = Counter(c for g in groups for t in g.trajectories for c in t.completion_text if c.isalpha())  # a letter: plain text in an override
    (open_, _), (close, _) = counts.most_common(2)
    return small_config(*base, f"agent.code_temperature={code_temperature}", f"agent.code_open={open_}", f"agent.code_close={close}")


@pytest.mark.parametrize("code_temperature", ["0", "0.3"])
def test_rollouts_switch_policy_at_the_markers_and_the_first_step_is_on_policy(small_config, code_temperature: str) -> None:
    """The textbook loop: code tokens carry the code policy (greedy: the argmax, out of the loss),
    text tokens (0.8, 0.9); with code at 0.3 the trained tokens mix two policies, and every
    objective's first step still has ratio 1 and clips nothing, which the run's one policy for
    every token (the old trainer) would not give."""
    cfg = _code_config(small_config, code_temperature)
    rule = SegmentPolicy(cfg.agent.code_open, cfg.agent.code_close, float(code_temperature), TEXT.top_p)
    session = open_session(PolicySpec.of(cfg))
    problems = [session.task.train_problem(i) for i in range(cfg.train.prompts_per_step)]
    groups, _ = rollout_groups(session.runner, session.task, problems, cfg.train.group_size, torch.Generator().manual_seed(0))
    code_tokens = 0
    for t in (t for g in groups for t in g.trajectories):
        prompt, gen = t.segments
        assert list(gen.policies) == expected_policies(session.tokenizer, gen.token_ids, rule, TEXT)
        code = [i for i, p in enumerate(gen.policies) if p == rule.policy]
        code_tokens += len(code)
        if rule.temperature == 0:
            ids = torch.tensor([prompt.token_ids + gen.token_ids])
            with torch.no_grad():
                argmax = session.model(input_ids=ids).logits[0, len(prompt.token_ids) - 1:-1].argmax(-1)
            assert all(gen.token_ids[i] == int(argmax[i]) for i in code)
    assert code_tokens >= 5
    batch, _ = build_batch(groups, cfg.train, cfg.advantage, session.tokenizer.pad_token_id)
    trained = batch.loss_mask_BT.bool()
    trained_temperatures = {round(v, 4) for v in batch.temperature_BT[trained].tolist()}
    assert trained_temperatures == ({0.8} if rule.temperature == 0 else {0.8, 0.3})
    greedy = batch.attention_mask_BT.bool() & (batch.temperature_BT == 0)
    assert bool(greedy.any()) == (rule.temperature == 0) and not (greedy & trained).any()  # in the rows, out of the loss
    with torch.no_grad():
        one_policy = sequence_logprobs(session.model, batch.input_ids_BT, batch.attention_mask_BT, cfg.sampling)
    if rule.temperature > 0:  # the run's one policy is not the behaviour policy of code tokens
        assert (one_policy - batch.behav_logprobs_BT)[trained].abs().max() > 0.05
    start = copy.deepcopy(session.model.state_dict())
    for loss in ("grpo", "gspo", "decoupled_ppo"):
        session.model.load_state_dict(start)
        cfg_loss = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"name": loss})})
        out = Trainer(session.model, cfg_loss.train, cfg_loss.loss, cfg_loss.sampling).step(batch)
        assert out["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5), loss
        assert out["loss/clip_frac"] == 0.0, loss


def _rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if "loss/total" in line]


@pytest.mark.parametrize(("code_temperature", "overrides"), [
    ("0", ("pipeline.mode=sync",)),
    ("0", ("pipeline.mode=one_step_off",)),
    ("0", ("pipeline.mode=async", "pipeline.max_staleness=1")),
    ("0", ("pipeline.mode=async", "pipeline.runtime=process")),
    ("0.3", ("pipeline.mode=sync",)),
    ("0.3", ("pipeline.mode=one_step_off",)),
    ("0.3", ("pipeline.mode=async", "pipeline.max_staleness=1")),
], ids=["sync", "one_step_off", "async", "async-process", "sync-code0.3", "one_step_off-code0.3", "async-code0.3"])
def test_first_step_is_on_policy_with_greedy_code_in_every_mode(small_config, code_temperature: str, overrides) -> None:
    """Text at (0.8, 0.9), code at 0 (or 0.3): the first step of every mode has ratio 1 and clips
    nothing, and its fresh tokens have behaviour weight 1 (decoupled PPO: π_prox = π_behav)."""
    cfg = _code_config(small_config, code_temperature, "train.steps=2", *overrides)
    coordinator.train(cfg, **QUIET)
    first = _rows(cfg)[0]
    assert first["async/staleness_max"] == 0
    assert first["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["loss/clip_frac"] == 0.0
    if "loss/behav_weight_mean" in first:
        assert first["loss/behav_weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert first["loss/behav_weight_max"] == pytest.approx(1.0, abs=1e-5)
    assert (first["rollout/greedy_token_fraction"] > 0) == (code_temperature == "0")
