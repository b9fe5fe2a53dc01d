"""Engine tests (the async engine and its synchronous core): agreement with the trainer's log-probs, HF parity, finish reasons, versions.

All on CPU with the ~1M-parameter tiny Qwen2 model (and tiny Llama/Qwen3 configs for the fast
path's generality). Tolerances: log-probs < 1e-4 (the trainer contract), logits < 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from policyflow.engine import (
    Engine,
    FastDecoder,
    Request,
    AsyncEngine,
    SamplingParams,
    fast_path_problem,
    generate_blocking,
    join_samples,
    sample_tokens,
)
from policyflow.model import build_tiny, load_pretrained, save_pretrained
from policyflow.ops import shifted_token_logprobs
from policyflow.types import Sample

BACKENDS = ["fast", "generic"]
PROMPTS = ["123+456=", "7*8=", "1", "99-100=", "(3+4)*5=", "x"]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=0)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    _, tokenizer = tiny
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def right_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of right-padded sequences, pad id 0."""
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return ids, mask


def trainer_logprobs(model, samples: list[Sample]) -> list[torch.Tensor]:
    """What the trainer computes: right-padded prompt+completion, one full forward pass."""
    ids, mask = right_pad([list(s.prompt_ids) + list(s.token_ids) for s in samples])
    with torch.no_grad():
        lp = shifted_token_logprobs(model(input_ids=ids, attention_mask=mask).logits, ids)
    return [lp[i, len(s.prompt_ids) : len(s.prompt_ids) + len(s.token_ids)] for i, s in enumerate(samples)]


def max_logprob_error(model, samples: list[Sample]) -> float:
    worst = 0.0
    for sample, ref in zip(samples, trainer_logprobs(model, samples)):
        assert len(sample.logprobs) == len(sample.token_ids) == len(sample.versions)
        worst = max(worst, (ref - torch.tensor(sample.logprobs)).abs().max().item())
    return worst


def run_engine(engine: Engine, requests: list[Request]) -> dict:
    for r in requests:
        engine.submit(r)
    out = {}
    while engine.has_work:
        for done in engine.step():
            out[done.request.id] = done.sample
    return out


# -- agreement with the trainer ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_match_trainer_recompute(tiny, prompt_ids, backend):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, backend=backend, generator=torch.Generator().manual_seed(1))
    stop_id = tokenizer.convert_tokens_to_ids("5")
    # Different caps and a stop token: rows finish at different steps, the batch is compacted
    # (fast path: tail rows move into the holes) while the others go on.
    requests = [
        Request(p, SamplingParams(max_new_tokens=3 + 4 * i, stop_token_ids=(stop_id,)), id=i)
        for i, p in enumerate(prompt_ids)
    ]
    out = run_engine(engine, requests)
    samples = [out[i] for i in range(len(requests))]
    lengths = [len(s.token_ids) for s in samples]
    assert len(set(lengths)) > 2, lengths  # really finished at different times
    assert max_logprob_error(model, samples) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_match_with_refilled_slots(tiny, prompt_ids, backend):
    """Continuous batching (fast) / waves (generic) with 2 slots and 6 requests."""
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, backend=backend, max_batch=2, generator=torch.Generator().manual_seed(2))
    requests = [
        Request(p, SamplingParams(max_new_tokens=2 + 3 * i, ignore_eos=True), id=i) for i, p in enumerate(prompt_ids)
    ]
    out = run_engine(engine, requests)
    samples = [out[i] for i in range(len(requests))]
    assert [len(s.token_ids) for s in samples] == [2 + 3 * i for i in range(len(requests))]
    assert max_logprob_error(model, samples) < 1e-4


def test_long_prompt_uses_sdpa_prefill_and_agrees(tiny):
    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, generator=torch.Generator().manual_seed(3))
    long = tokenizer("12345678+" * 10)["input_ids"]  # 90 tokens > short_prompt (64)
    samples = generate_blocking(engine, [long, long[:5]], SamplingParams(max_new_tokens=6))
    assert max_logprob_error(model, samples) < 1e-4


def test_fast_decoder_logits_match_hf_forward(tiny, prompt_ids):
    model, _ = tiny
    decoder = FastDecoder(model)
    with torch.no_grad():
        logits = decoder.prefill(prompt_ids, reserve=16)
        seqs = [list(p) for p in prompt_ids]
        steps = [logits]
        for t in range(4):
            tokens = torch.tensor([(7 * i + 3 * t) % 90 + 3 for i in range(len(seqs))])
            for seq, tok in zip(seqs, tokens.tolist()):
                seq.append(tok)
            steps.append(decoder.decode(tokens))
        ids, mask = right_pad(seqs)
        ref = model(input_ids=ids, attention_mask=mask).logits
    for t, got in enumerate(steps):
        rows = torch.arange(len(seqs))
        at = torch.tensor([len(p) - 1 + t for p in prompt_ids])
        assert (got - ref[rows, at]).abs().max().item() < 1e-5


@pytest.mark.parametrize(("family", "kv_heads"), [("llama", 2), ("llama", 4), ("llama", 1), ("qwen3", 2)])
def test_fast_path_other_families_match_hf(family, kv_heads):
    """Llama (no biases, rope_theta 500), Qwen3 (q/k norms); MQA, GQA and MHA attention paths."""
    sizes = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes, rope_parameters={"rope_type": "default", "rope_theta": 500.0}))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**sizes, head_dim=32, tie_word_embeddings=True))
    model.eval()
    assert fast_path_problem(model) is None
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    engine = Engine(model, backend="fast", generator=torch.Generator().manual_seed(0))
    out = run_engine(engine, [Request(p, SamplingParams(max_new_tokens=5, ignore_eos=True), id=i)
                              for i, p in enumerate(prompts)])
    assert max_logprob_error(model, [out[i] for i in range(3)]) < 1e-4


def test_unsupported_rope_falls_back_to_generic():
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert "rope_type" in fast_path_problem(model)
    with pytest.raises(ValueError, match="fast backend cannot run"):
        Engine(model, backend="fast")
    engine = Engine(model, generator=torch.Generator().manual_seed(0))
    assert engine.backend_name == "generic"
    out = run_engine(engine, [Request([5, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True), id=0)])
    assert max_logprob_error(model, [out[0]]) < 1e-4


def test_wrapped_projections_fall_back(tiny):
    """A LoRA-style wrapper or quantized subclass must not be read as a plain weight."""
    model, _ = build_tiny(seed=0)

    class WrappedLinear(torch.nn.Linear):
        pass

    old = model.model.layers[0].self_attn.q_proj
    wrapped = WrappedLinear(old.in_features, old.out_features, bias=True)
    wrapped.load_state_dict(old.state_dict())
    model.model.layers[0].self_attn.q_proj = wrapped
    assert "nn.Linear" in fast_path_problem(model)
    assert Engine(model).backend_name == "generic"


# -- HF parity ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_equals_hf_generate(tiny, backend):
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hf = model.generate(**enc, do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=eos)
    expected = []
    for row in hf[:, enc.input_ids.shape[1] :].tolist():  # HF pads after EOS; we stop at it
        expected.append(row[: row.index(eos) + 1] if eos in row else row)
    assert any(row[-1] == eos for row in expected) and any(len(row) == 10 for row in expected)
    engine = AsyncEngine(model, tokenizer, backend=backend)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    samples = generate_blocking(engine, prompts, SamplingParams(temperature=0, max_new_tokens=10))
    assert [list(s.token_ids) for s in samples] == expected
    assert [s.finish_reason for s in samples] == ["eos" if row[-1] == eos else "length" for row in expected]
    # Greedy log-probs are the model's T=1 log-softmax of the chosen tokens.
    assert max_logprob_error(model, samples) < 1e-4


# -- finish reasons, stop strings, lengths ------------------------------------------------


def test_max_new_tokens_and_length_reason(tiny, prompt_ids):
    model, tokenizer = tiny
    samples = generate_blocking(AsyncEngine(model, tokenizer), prompt_ids, SamplingParams(max_new_tokens=7, ignore_eos=True))
    assert all(len(s.token_ids) == 7 and s.finish_reason == "length" for s in samples)
    assert all(s.prompt_ids == tuple(p) for s, p in zip(samples, prompt_ids))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_token_ids_finish_with_eos_reason(tiny, prompt_ids, backend):
    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, backend=backend)
    greedy = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    free = generate_blocking(engine, prompt_ids[:1], greedy)[0]
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop_id,))
    stopped = generate_blocking(engine, prompt_ids[:1], params)[0]
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == free.token_ids[: first + 1]  # the stop token is kept


def test_default_eos_ids_come_from_the_model(tiny):
    model, tokenizer = tiny
    assert Engine(model, tokenizer).eos_ids == frozenset({tokenizer.eos_token_id})


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_string_truncates_text_and_keeps_tokens(tiny, prompt_ids, backend):
    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, backend=backend)
    greedy = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    free = generate_blocking(engine, prompt_ids[:2], greedy)
    text = free[0].text
    stop = text[4:6]  # two characters: spans two tokens of the char-level tokenizer
    end = text.index(stop) + len(stop)
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop=(stop, "never-there"))
    out = generate_blocking(engine, prompt_ids[:2], params)
    assert out[0].finish_reason == "stop"
    assert out[0].text == text[:end] and out[0].text.endswith(stop)
    assert tokenizer.decode(out[0].token_ids) == text[:end]  # tokens up to the stop string
    assert out[0].token_ids == free[0].token_ids[:end]
    if stop not in free[1].text:
        assert out[1].finish_reason == "length" and out[1].token_ids == free[1].token_ids


def test_stop_strings_need_a_tokenizer(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model).submit(Request([5], SamplingParams(stop=("x",))))


# -- sampling semantics -------------------------------------------------------------------


def test_tiny_top_p_keeps_only_the_argmax(tiny, prompt_ids):
    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, generator=torch.Generator().manual_seed(0))
    nucleus = generate_blocking(engine, prompt_ids, SamplingParams(top_p=1e-6, max_new_tokens=6, ignore_eos=True))
    greedy = generate_blocking(engine, prompt_ids, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    for a, b in zip(nucleus, greedy):
        assert a.token_ids == b.token_ids
        assert all(lp == 0.0 for lp in a.logprobs)  # one token keeps all the mass


def _replayed_logits(model, sample):
    """The model's logits at each position that produced one of `sample`'s tokens (one plain forward)."""
    ids = torch.tensor([list(sample.prompt_ids) + list(sample.token_ids)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_and_top_p_logprobs_are_the_sampling_distribution(tiny, prompt_ids, backend):
    model, tokenizer = tiny
    temperature, top_p = 0.7, 0.8
    engine = AsyncEngine(model, tokenizer, backend=backend, generator=torch.Generator().manual_seed(5))
    samples = generate_blocking(engine, prompt_ids, SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=6))
    for s in samples:
        logits = _replayed_logits(model, s)
        for t, (tok, lp) in enumerate(zip(s.token_ids, s.logprobs)):
            probs = torch.softmax(logits[t].double() / temperature, -1)
            order = probs.argsort(descending=True)
            before = probs[order].cumsum(0) - probs[order]
            kept = order[before < top_p]
            assert tok in kept.tolist()
            expected = torch.log(probs[tok] / probs[kept].sum()).item()
            assert abs(lp - expected) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_then_top_p_logprobs_are_the_sampling_distribution(tiny, prompt_ids, backend):
    """top-k first, then top-p over the renormalised top-k mass (HF's and vLLM's order)."""
    model, tokenizer = tiny
    temperature, top_p, top_k = 1.3, 0.9, 4
    engine = AsyncEngine(model, tokenizer, backend=backend, generator=torch.Generator().manual_seed(2))
    samples = generate_blocking(engine, prompt_ids, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=6))
    for s in samples:
        logits = _replayed_logits(model, s)
        for t, (tok, lp) in enumerate(zip(s.token_ids, s.logprobs)):
            probs = torch.softmax(logits[t].double() / temperature, -1)
            top = probs.argsort(descending=True)[:top_k]
            renormalised = probs[top] / probs[top].sum()
            kept = top[(renormalised.cumsum(0) - renormalised) < top_p]
            assert tok in kept.tolist()
            assert abs(lp - torch.log(probs[tok] / probs[kept].sum()).item()) < 1e-4


def test_top_k_frequencies_and_mixed_rows():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]).expand(20000, 4))
    tokens, logprobs = sample_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=2)
    freq = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    assert torch.allclose(freq, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0], dtype=torch.float64), atol=0.015)
    assert torch.allclose(logprobs, torch.log(torch.where(tokens == 0, 4 / 7, 3 / 7)))
    # per-row top_k (0 = off) next to per-row top_p: row 1 keeps 3 tokens, then top_p 0.5 of
    # their mass 0.9 keeps the two whose mass before them is < 0.45
    rows = logits[:3]
    tokens, logprobs = sample_tokens(rows, torch.ones(3), torch.tensor([1.0, 0.5, 1.0]), torch.Generator().manual_seed(1), top_k=torch.tensor([0, 3, 1]))
    assert torch.isclose(logprobs[0], torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))[tokens[0]])
    assert tokens[1] in (0, 1) and torch.isclose(logprobs[1], torch.log(torch.tensor([4 / 7, 3 / 7]))[tokens[1]])
    assert tokens[2] == 0 and logprobs[2] == 0.0


def test_sample_tokens_mixed_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    temperature = torch.tensor([0.0, 1.0, 0.5, 1.0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 1e-6])
    tokens, logprobs = sample_tokens(logits, temperature, top_p, torch.Generator().manual_seed(0))
    base = torch.log_softmax(logits, -1)
    assert tokens[0] == logits[0].argmax() and torch.isclose(logprobs[0], base[0, tokens[0]])
    assert torch.isclose(logprobs[1], base[1, tokens[1]])
    assert torch.isclose(logprobs[2], torch.log_softmax(logits[2] / 0.5, -1)[tokens[2]])
    assert tokens[3] == logits[3].argmax() and logprobs[3] == 0.0


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(20000, 4))
    tokens, logprobs = sample_tokens(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).double() / tokens.numel()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64), atol=0.015)
    assert (tokens != 3).all() and torch.isfinite(logprobs).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_generator_reproduces(tiny, prompt_ids, backend):
    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, backend=backend)
    params = SamplingParams(max_new_tokens=8)
    a = generate_blocking(engine, prompt_ids, params, generator=torch.Generator().manual_seed(11))
    b = generate_blocking(engine, prompt_ids, params, generator=torch.Generator().manual_seed(11))
    c = generate_blocking(engine, prompt_ids, params, generator=torch.Generator().manual_seed(12))
    assert a == b
    assert [s.token_ids for s in a] != [s.token_ids for s in c]


def test_fast_and_generic_backends_sample_the_same_tokens(tiny, prompt_ids):
    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    fast = AsyncEngine(model, tokenizer, backend="fast")
    generic = AsyncEngine(model, tokenizer, backend="generic")
    fast = generate_blocking(fast, prompt_ids, params, generator=torch.Generator().manual_seed(4))
    generic = generate_blocking(generic, prompt_ids, params, generator=torch.Generator().manual_seed(4))
    assert [s.token_ids for s in fast] == [s.token_ids for s in generic]


# -- versions and weight swaps ------------------------------------------------------------


@pytest.fixture()
def two_models():
    model_a, tokenizer = build_tiny(seed=0)
    model_b, _ = build_tiny(seed=1)
    return model_a.eval(), model_b.eval(), tokenizer


@pytest.mark.parametrize("backend", BACKENDS)
def test_versions_tag_tokens_and_set_weights_swaps(two_models, prompt_ids, backend):
    model_a, model_b, tokenizer = two_models
    reference = AsyncEngine(model_b, tokenizer, backend=backend, version=9)
    greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    expected = generate_blocking(reference, prompt_ids, greedy)

    engine = AsyncEngine(model_a, tokenizer, backend=backend, version=3)
    before = generate_blocking(engine, prompt_ids, greedy)
    assert all(s.versions == (3,) * 6 for s in before)
    engine.update_weights(model_b.state_dict(), version=4)
    assert engine.version == 4
    after = generate_blocking(engine, prompt_ids, greedy)
    assert all(s.versions == (4,) * 6 for s in after)
    assert [s.token_ids for s in after] == [s.token_ids for s in expected]
    assert [s.token_ids for s in after] != [s.token_ids for s in before]


def test_set_weights_accepts_state_dict_without_tied_head(two_models, prompt_ids):
    model_a, model_b, tokenizer = two_models
    state = {k: v for k, v in model_b.state_dict().items() if k != "lm_head.weight"}
    engine = AsyncEngine(model_a, tokenizer)
    engine.update_weights(state, version=1)
    assert max_logprob_error(model_b, generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=4))) < 1e-4
    with pytest.raises(ValueError, match="does not match"):
        engine.update_weights({"nonsense.weight": torch.zeros(1)}, version=2)


def test_fast_path_notices_in_place_weight_changes(two_models, prompt_ids):
    """An optimiser step / load_state_dict on the module is seen without set_weights."""
    model_a, model_b, tokenizer = two_models
    engine = AsyncEngine(model_a, tokenizer)
    generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=2))
    model_a.load_state_dict(model_b.state_dict())
    samples = generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=5))
    assert max_logprob_error(model_b, samples) < 1e-4


def test_fast_path_notices_the_trainers_fused_optimizer_step(two_models, prompt_ids):
    """torch's fused AdamW leaves version counters alone; the trainer's optimizer moves them."""
    from policyflow.trainer import make_optimizer

    model, _, tokenizer = two_models
    engine = AsyncEngine(model, tokenizer)
    generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=2))
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.99))
    assert optimizer.defaults["fused"]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    samples = generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=5))
    assert max_logprob_error(model, samples) < 1e-4


def test_fast_path_follows_replaced_parameter_storage(two_models, prompt_ids):
    """`.data = ...` (or `.to()`) swaps a parameter's storage; the decoder re-reads it."""
    model_a, model_b, tokenizer = two_models
    engine = AsyncEngine(model_a, tokenizer)
    generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=2))
    with torch.no_grad():
        for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
            p_a.data = p_b.data.clone()
    samples = generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=5))
    assert max_logprob_error(model_b, samples) < 1e-4


def test_update_weights_continue_mid_flight(two_models, prompt_ids):
    model_a, model_b, tokenizer = two_models
    engine = Engine(model_a, tokenizer, version=0, generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(prompt_ids[:3]):
        engine.submit(Request(p, SamplingParams(max_new_tokens=8, ignore_eos=True), id=i))
    out = {}
    for _ in range(3):
        for done in engine.step():
            out[done.request.id] = done.sample
    engine.update_weights(model_b.state_dict(), version=1, mode="continue")
    while engine.has_work:
        for done in engine.step():
            out[done.request.id] = done.sample
    for s in out.values():
        assert s.versions == (0, 0, 0, 1, 1, 1, 1, 1)


def test_update_weights_abort_returns_partials_that_resume(two_models, prompt_ids):
    model_a, model_b, tokenizer = two_models
    engine = Engine(model_a, tokenizer, generator=torch.Generator().manual_seed(0))
    request = Request(prompt_ids[0], SamplingParams(max_new_tokens=9, ignore_eos=True), id="q")
    engine.submit(request)
    engine.step()
    engine.step()
    engine.update_weights(model_b.state_dict(), version=1, mode="abort")
    assert engine.num_active == 0 and engine.version == 1
    (aborted,) = engine.step()
    partial = aborted.sample
    assert partial.finish_reason == "aborted" and partial.versions == (0, 0)
    out = run_engine(engine, [request.resume(partial)])
    full = join_samples(partial, out["q"])
    assert full.versions == (0, 0) + (1,) * 7 and full.finish_reason == "length"
    assert full.prompt_ids == request.prompt_ids and len(full.token_ids) == 9
    # The resumed part was computed by the new weights from the whole prefix.
    assert max_logprob_error(model_b, [out["q"]]) < 1e-4


def test_core_engine_refuses_drain_which_is_the_workers(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="drain is kept by the rollout worker"):
        Engine(model, tokenizer).update_weights(model.state_dict(), version=1, mode="drain")


# -- loading ------------------------------------------------------------------------------


def test_saved_and_loaded_model_samples_the_same(tiny, prompt_ids, tmp_path):
    model, tokenizer = tiny
    folder = save_pretrained(model, tokenizer, tmp_path / "tiny")
    loaded, loaded_tok = load_pretrained(folder)
    loaded.eval()
    engine = AsyncEngine(loaded, loaded_tok)
    assert engine.backend_name == "fast"
    greedy = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    a = generate_blocking(AsyncEngine(model, tokenizer), prompt_ids, greedy)
    b = generate_blocking(engine, prompt_ids, greedy)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.text for s in a] == [s.text for s in b]
    assert max_logprob_error(loaded, generate_blocking(engine, prompt_ids, SamplingParams(max_new_tokens=5))) < 1e-4


# -- the async engine ---------------------------------------------------------------------


def test_async_generate_from_many_coroutines_equals_the_core_loop(tiny, prompt_ids):
    """Coroutines awaiting `generate` at once share one batch: the same tokens as the core driven by hand."""
    import asyncio

    model, tokenizer = tiny
    params = SamplingParams(max_new_tokens=7)
    core = Engine(model, tokenizer, max_batch=3, generator=torch.Generator().manual_seed(8))
    expected = run_engine(core, [Request(p, params, id=i) for i, p in enumerate(prompt_ids)])
    engine = AsyncEngine(model, tokenizer, max_batch=3, generator=torch.Generator().manual_seed(8))

    async def run():
        return await asyncio.gather(*(engine.generate(p, params) for p in prompt_ids))

    got = asyncio.run(run())
    assert [s.token_ids for s in got] == [expected[i].token_ids for i in range(len(prompt_ids))]
    assert max_logprob_error(model, got) < 1e-4
    assert engine.num_in_flight == 0


def test_an_episode_waiting_on_a_tool_holds_no_slot(tiny, prompt_ids):
    """One slot: episode A's tool call waits for episode B's long generation, which needs that slot."""
    import asyncio

    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer, max_batch=1, generator=torch.Generator().manual_seed(0))
    order = []

    async def run():
        tool_result = asyncio.Event()

        async def episode_a():
            first = await engine.generate(prompt_ids[0], SamplingParams(max_new_tokens=2, ignore_eos=True))
            order.append("a1")
            await tool_result.wait()  # the "tool": answers once B is done
            second = await engine.generate(list(prompt_ids[0]) + list(first.token_ids), SamplingParams(max_new_tokens=2, ignore_eos=True))
            order.append("a2")
            return second

        async def episode_b():
            await asyncio.sleep(0)
            out = await engine.generate(prompt_ids[1], SamplingParams(max_new_tokens=12, ignore_eos=True))
            order.append("b")
            tool_result.set()
            return out

        return await asyncio.wait_for(asyncio.gather(episode_a(), episode_b()), timeout=60)

    a, b = asyncio.run(run())
    assert order == ["a1", "b", "a2"] and len(b.token_ids) == 12 and len(a.token_ids) == 2


def test_async_abort_resumes_inside_generate_with_per_version_logprobs(two_models, prompt_ids):
    import asyncio

    import copy

    model_a, model_b, tokenizer = two_models
    old = copy.deepcopy(model_a)  # the engine loads the new weights into model_a in place
    engine = AsyncEngine(model_a, tokenizer, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)

    async def run():
        pending = asyncio.ensure_future(engine.generate_many(prompt_ids[:3], params))
        while engine.stats["steps"] < 3:
            await asyncio.sleep(0)
        engine.update_weights(model_b.state_dict(), version=1, mode="abort")
        return await pending

    samples = asyncio.run(run())
    assert engine.stats["aborted_sequences"] == 3 and engine.stats["aborted_tokens"] == 9
    for prompt, s in zip(prompt_ids[:3], samples):
        assert s.versions == (0,) * 3 + (1,) * 6 and s.finish_reason == "length"
        ids = torch.tensor([list(prompt) + list(s.token_ids)])
        for version, model in ((0, old), (1, model_b)):
            with torch.no_grad():
                ref = shifted_token_logprobs(model(input_ids=ids).logits, ids)[0, len(prompt):]
            picked = [i for i, v in enumerate(s.versions) if v == version]
            assert torch.allclose(ref[picked], torch.tensor(s.logprobs)[picked], atol=1e-4)


def test_a_failing_decode_step_fails_every_waiting_generate(tiny, prompt_ids):
    import asyncio

    model, tokenizer = tiny
    engine = AsyncEngine(model, tokenizer)

    def broken_step():
        raise MemoryError("simulated out of memory")

    engine.core.step = broken_step

    async def run():
        return await asyncio.gather(*(engine.generate(p, SamplingParams(max_new_tokens=3)) for p in prompt_ids[:2]), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, MemoryError) for r in results)
    with pytest.raises(MemoryError):
        asyncio.run(engine.generate(prompt_ids[0]))
