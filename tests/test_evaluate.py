"""Evaluation: pass@k from several samples per prompt, per-request seeds, and results that do not depend on batching."""

from collections.abc import Callable, Sequence

import pytest

from policyflow.agent.episode import EpisodeRunner
from policyflow.config import AgentConfig
from policyflow.engine import SamplingParams
from policyflow.evaluate import EvalResult, evaluate, pass_at_ks, request_seed
from policyflow.evaluate.episodes import run_problems
from policyflow.model import build_char_tokenizer
from policyflow.problems import Score
from policyflow.session import open_session
from policyflow.tasks.base import Problem, Task
from policyflow.types import Sample
from policyflow.policy import PolicySpec


class ScriptedGenerator:
    """A `Generator` that answers `answer(prompt text, params)` and records every request."""

    version, max_positions = 3, None

    def __init__(self, tokenizer, answer: Callable[[str, SamplingParams], str]) -> None:
        self.tokenizer, self.answer, self.requests = tokenizer, answer, []

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *, request_id: str | None = None) -> Sample:
        self.requests.append((self.tokenizer.decode(prompt_ids), params))
        ids = tuple(self.tokenizer.encode(self.answer(self.tokenizer.decode(prompt_ids), params), add_special_tokens=False))[: params.max_new_tokens]
        reason = "length" if len(ids) == params.max_new_tokens else "stop"
        return Sample(tuple(prompt_ids), ids, (0.0,) * len(ids), (self.version,) * len(ids), reason, self.tokenizer.decode(ids))

    def stream(self, prompt_ids, params=None, *, request_id=None):
        raise NotImplementedError

    def cancel(self, request_id: str) -> bool:
        return False


class QuizTask(Task):
    """Problems `q<i>?` with answer `a<i>`; the answer is the stripped completion; splits by parity."""

    name = "quiz"

    def __init__(self, count: int = 3) -> None:
        self.problems = [Problem(str(i), f"q{i}?", f"a{i}") for i in range(count)]

    def train_problem(self, index: int) -> Problem:
        return self.problems[index % len(self.problems)]

    def eval_problems(self) -> Sequence[Problem]:
        return self.problems

    def eval_split(self, problem: Problem) -> str:
        return "odd" if int(problem.id) % 2 else "even"

    def extract_answer(self, completion: str) -> str | None:
        return completion.strip() or None

    def score(self, problems, completions) -> Score:
        correct = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(ok) for ok in correct], correct=correct)


def quiz_runner(answer: Callable[[str, SamplingParams], str]) -> tuple[EpisodeRunner, ScriptedGenerator]:
    tokenizer = build_char_tokenizer()
    generator = ScriptedGenerator(tokenizer, answer)
    return EpisodeRunner(generator, tokenizer, SamplingParams(max_new_tokens=8), AgentConfig()), generator


def scripted(greedy: list[str], sampled: list[list[str]]) -> Callable[[str, SamplingParams], str]:
    """Problem i answers greedy[i] at temperature 0 and sampled[i][j] for the request seeded as its sample j."""
    by_seed = {request_seed(0, "heldout", i, j, 0): text for i, texts in enumerate(sampled) for j, text in enumerate(texts)}

    def answer(prompt: str, params: SamplingParams) -> str:
        i = int(prompt.strip()[1:-1])
        return greedy[i] if params.temperature == 0 else by_seed[params.seed]

    return answer


def test_pass_at_k_from_several_samples_per_prompt() -> None:
    # 4 samples per problem: problem 0 never right, problem 1 once, problem 2 always.
    sampled = [["x"] * 4, ["a1", "x", "x", "x"], ["a2"] * 4]
    runner, generator = quiz_runner(scripted(["a0", "x", "x"], sampled))
    task = QuizTask()
    result = evaluate(runner, task, task.problems, temperature=1.0, seed=0, samples_per_prompt=4)
    assert result.accuracy_greedy == pytest.approx(1 / 3)
    assert result.accuracy_sampled == pytest.approx(5 / 12)  # the unbiased pass@1
    # pass@2 of problem 1: 1 − C(3,2)/C(4,2) = 1/2; pass@4: any of the 4 right.
    assert result.pass_at == pytest.approx({"pass@2": (0 + 0.5 + 1) / 3, "pass@4": 2 / 3})
    assert result.mean_tokens_sampled == pytest.approx((4 + 2 + 1 * 3 + 2 * 4) / 12)
    metrics = result.as_metrics()
    assert metrics["eval/pass@2"] == pytest.approx(0.5) and metrics["eval/samples_per_prompt"] == 4.0
    assert EvalResult(**{k: v for k, v in vars(result).items()}) == result  # round-trips through checkpoints/summary dicts
    # Task.eval_split: problems 0 and 2 are "even" (0 + 4 of 8 samples right), problem 1 "odd" (1 of 4)
    assert result.accuracy_sampled_by_split == pytest.approx({"even": 4 / 8, "odd": 1 / 4})
    assert metrics["eval/accuracy_sampled/even"] == pytest.approx(0.5) and metrics["eval/accuracy_sampled/odd"] == pytest.approx(0.25)


def test_every_sampled_request_has_its_own_seed() -> None:
    """Seeds come from (run seed, problem index, sample index, call index), never from a shared stream;
    greedy requests are unseeded."""
    runner, generator = quiz_runner(lambda prompt, params: "x")
    task = QuizTask(2)
    evaluate(runner, task, task.problems, temperature=0.7, seed=5, samples_per_prompt=3)
    greedy = [(p, params.seed) for p, params in generator.requests if params.temperature == 0]
    sampled = sorted((p, params.seed) for p, params in generator.requests if params.temperature > 0)
    assert sorted(greedy) == [("q0?", None), ("q1?", None)]
    assert sampled == sorted((f"q{i}?", request_seed(5, "heldout", i, j, 0)) for i in range(2) for j in range(3))
    assert len({s for _, s in sampled}) == 6 and request_seed(5, "heldout", 0, 0, 1) != request_seed(5, "heldout", 0, 0, 0)
    assert all(0 <= s < 2**31 for _, s in sampled)  # any OpenAI-compatible server takes it


def test_pass_at_ks() -> None:
    assert pass_at_ks(1) == [] and pass_at_ks(4) == [2, 4] and pass_at_ks(6) == [2, 4, 6] and pass_at_ks(16) == [2, 4, 8, 16]


def test_sampled_episodes_do_not_depend_on_batching(small_config) -> None:
    """The same problem gives the same sampled tokens whether it is evaluated with the others or alone."""
    session = open_session(PolicySpec.of(small_config("task.name=arithmetic", "task.max_digits=2", "sampling.max_new_tokens=8")))
    runner = session.runner.with_params(temperature=1.0, top_p=1.0, top_k=0)
    problems = session.eval_problems[:4]
    together = run_problems(runner, session.task, problems, 3, run_seed=11)
    tokens = lambda groups: [[t.segments[-1].token_ids for t in g] for g in groups]  # noqa: E731
    # problem i evaluated with only the i problems before it in flight: its seeds are the same, its batch is not
    single = [run_problems(runner, session.task, problems[: i + 1], 3, run_seed=11)[i] for i in range(4)]
    assert tokens(single) == tokens(together)
    assert tokens(run_problems(runner, session.task, problems, 3, run_seed=12)) != tokens(together)  # the run seed matters
    assert len({ids for g in tokens(together) for ids in g}) > 4  # sampled, not all alike


def test_the_accuracy_line_names_each_split() -> None:
    from policyflow.coordinator import accuracy_line

    result = {"accuracy_greedy": 0.5, "accuracy_sampled": 0.25, "accuracy_sampled_by_split": {"one_lookup": 0.375, "two_lookups": 0.0}}
    assert accuracy_line("after RL", result) == "held-out accuracy after RL: greedy 50.0%, sampled 25.0% (one_lookup 37.5%, two_lookups 0.0%)"
    assert accuracy_line("after RL", {"accuracy_greedy": 0.5, "accuracy_sampled": 0.25}) == "held-out accuracy after RL: greedy 50.0%, sampled 25.0%"
