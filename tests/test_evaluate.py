"""Evaluation: pass@k from several samples per prompt, and sampling on the model's device."""

from types import SimpleNamespace

import pytest

import policyflow.evaluate as evaluation
from policyflow.evaluate import EvalResult, evaluate, pass_at_ks
from policyflow.session import open_session
from policyflow.tasks.base import Problem


class _ScriptedRunner:
    """Stands in for an EpisodeRunner: only the sampling temperature is read (by the scripted rollouts)."""

    def __init__(self, temperature: float = 1.0):
        self.params = SimpleNamespace(temperature=temperature)
        self.engine = SimpleNamespace(device="cpu")

    def with_params(self, **changes):
        return _ScriptedRunner(changes.get("temperature", self.params.temperature))


def _scripted_rollouts(greedy: list[str], sampled: list[str]):
    """`rollout_groups` that answers from scripts: an episode is correct when its text is "a"."""

    def rollout_groups(runner, task, problems, n, generator=None):
        texts = iter(greedy if runner.params.temperature == 0 else sampled)
        groups = [SimpleNamespace(trajectories=[SimpleNamespace(reward_parts={"correct": float(next(texts) == "a")}, num_gen_tokens=1, num_turns=1 + j % 2, num_tool_calls=j % 2) for j in range(n)]) for _ in problems]
        return groups, 0

    return rollout_groups


_SPLIT_BY_ID = SimpleNamespace(eval_split=lambda problem: "odd" if int(problem.id) % 2 else "even")


def test_pass_at_k_from_several_samples_per_prompt(monkeypatch) -> None:
    problems = [Problem(str(i), "q", "a") for i in range(3)]
    # 4 samples per problem: problem 0 never right, problem 1 once, problem 2 always.
    sampled = ["x", "x", "x", "x", "a", "x", "x", "x", "a", "a", "a", "a"]
    monkeypatch.setattr(evaluation, "rollout_groups", _scripted_rollouts(["a", "x", "x"], sampled))
    result = evaluate(_ScriptedRunner(), _SPLIT_BY_ID, problems, temperature=1.0, samples_per_prompt=4)
    assert result.accuracy_greedy == pytest.approx(1 / 3)
    assert result.accuracy_sampled == pytest.approx(5 / 12)  # the unbiased pass@1
    # pass@2 of problem 1: 1 − C(3,2)/C(4,2) = 1/2; pass@4: any of the 4 right.
    assert result.pass_at == pytest.approx({"pass@2": (0 + 0.5 + 1) / 3, "pass@4": 2 / 3})
    assert result.mean_tokens_sampled == pytest.approx(1.0)
    assert result.mean_turns_sampled == pytest.approx(1.5) and result.mean_tool_calls_sampled == pytest.approx(0.5)  # summary.json keeps both
    metrics = result.as_metrics()
    assert metrics["eval/pass@2"] == pytest.approx(0.5) and metrics["eval/samples_per_prompt"] == 4.0
    assert EvalResult(**{k: v for k, v in vars(result).items()}) == result  # round-trips through checkpoints/summary dicts
    # Task.eval_split: problems 0 and 2 are "even" (0 + 4 of 8 samples right), problem 1 "odd" (1 of 4)
    assert result.accuracy_sampled_by_split == pytest.approx({"even": 4 / 8, "odd": 1 / 4})
    assert metrics["eval/accuracy_sampled/even"] == pytest.approx(0.5) and metrics["eval/accuracy_sampled/odd"] == pytest.approx(0.25)
    plain = evaluate(_ScriptedRunner(), SimpleNamespace(eval_split=lambda p: None), problems, temperature=1.0, samples_per_prompt=4)
    assert plain.accuracy_sampled_by_split == {} and not any("/accuracy_sampled/" in k for k in plain.as_metrics())


def test_pass_at_ks() -> None:
    assert pass_at_ks(1) == [] and pass_at_ks(4) == [2, 4] and pass_at_ks(6) == [2, 4, 6] and pass_at_ks(16) == [2, 4, 8, 16]


def test_sampling_generator_is_on_the_models_device(small_config, monkeypatch) -> None:
    session = open_session(small_config("eval.samples_per_prompt=2"))
    seen = []
    real = evaluation.rollout_groups

    def spy(runner, task, problems, n, generator=None):
        seen.append((n, generator))
        return real(runner, task, problems, n, generator)

    monkeypatch.setattr(evaluation, "rollout_groups", spy)
    result = session.evaluate()
    model_device = next(session.model.parameters()).device
    assert [(n, g.device) for n, g in seen if g is not None] == [(2, model_device)]
    assert set(result.pass_at) == {"pass@2"} and result.num_prompts == 4


def test_the_accuracy_line_names_each_split() -> None:
    from policyflow.coordinator import _accuracy_line

    result = {"accuracy_greedy": 0.5, "accuracy_sampled": 0.25, "accuracy_sampled_by_split": {"one_lookup": 0.375, "two_lookups": 0.0}}
    assert _accuracy_line("after RL", result) == "held-out accuracy after RL: greedy 50.0%, sampled 25.0% (one_lookup 37.5%, two_lookups 0.0%)"
    assert _accuracy_line("after RL", {"accuracy_greedy": 0.5, "accuracy_sampled": 0.25}) == "held-out accuracy after RL: greedy 50.0%, sampled 25.0%"
