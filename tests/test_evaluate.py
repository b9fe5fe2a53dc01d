"""Evaluation: pass@k from several samples per prompt, and sampling on the model's device."""

from types import SimpleNamespace

import pytest

from policyflow.evaluate import EvalResult, evaluate, pass_at_ks
from policyflow.session import open_session
from policyflow.tasks.base import Problem, Score, Task


class _Echo(Task):
    """A completion is correct when it equals the answer."""

    def train_problem(self, index):
        raise NotImplementedError

    def eval_problems(self):
        return []

    def extract_answer(self, completion):
        return completion

    def score(self, problems, completions):
        correct = [c == p.answer for p, c in zip(problems, completions)]
        return Score([float(x) for x in correct], correct)


class _Scripted:
    """Returns scripted texts: greedy calls get `greedy`, sampled calls `sampled` (flattened n per prompt)."""

    def __init__(self, greedy, sampled):
        self.greedy, self.sampled, self.generators = greedy, sampled, []

    def generate(self, prompts, params, generator=None):
        self.generators.append(generator)
        texts = self.greedy if params.temperature == 0 else self.sampled
        assert len(texts) == len(prompts)
        return [SimpleNamespace(text=t, token_ids=[0] * len(t)) for t in texts]


def test_pass_at_k_from_several_samples_per_prompt() -> None:
    problems = [Problem(str(i), "q", "a") for i in range(3)]
    # 4 samples per problem: problem 0 never right, problem 1 once, problem 2 always.
    sampled = ["x", "x", "x", "x", "a", "x", "x", "x", "a", "a", "a", "a"]
    sampler = _Scripted(greedy=["a", "x", "x"], sampled=sampled)
    result = evaluate(sampler, _Echo(), problems, [[1]] * 3, max_new_tokens=4, temperature=1.0, samples_per_prompt=4)
    assert result.accuracy_greedy == pytest.approx(1 / 3)
    assert result.accuracy_sampled == pytest.approx(5 / 12)  # the unbiased pass@1
    # pass@2 of problem 1: 1 − C(3,2)/C(4,2) = 1/2; pass@4: any of the 4 right.
    assert result.pass_at == pytest.approx({"pass@2": (0 + 0.5 + 1) / 3, "pass@4": 2 / 3})
    assert result.mean_tokens_sampled == pytest.approx(1.0)
    metrics = result.as_metrics()
    assert metrics["eval/pass@2"] == pytest.approx(0.5) and metrics["eval/samples_per_prompt"] == 4.0
    assert EvalResult(**{k: v for k, v in vars(result).items()}) == result  # round-trips through checkpoints/summary dicts


def test_pass_at_ks() -> None:
    assert pass_at_ks(1) == [] and pass_at_ks(4) == [2, 4] and pass_at_ks(6) == [2, 4, 6] and pass_at_ks(16) == [2, 4, 8, 16]


def test_sampling_generator_is_on_the_models_device(small_config) -> None:
    session = open_session(small_config("eval.samples_per_prompt=2"))
    seen = []
    real = session.sampler.generate

    def spy(prompts, params, generator=None):
        seen.append(generator)
        return real(prompts, params, generator=generator)

    session.sampler.generate = spy
    result = session.evaluate()
    model_device = next(session.model.parameters()).device
    assert [g.device for g in seen if g is not None] == [model_device]
    assert set(result.pass_at) == {"pass@2"} and result.num_prompts == 4
