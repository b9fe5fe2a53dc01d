"""The full evaluation report (issue 19 §3): estimators with standard errors, thinking efficiency,
the is_correct contract and trivial sets of the tasks, the report folder, and `policyflow eval --endpoint`."""

import itertools
import json
import math
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from policyflow import cli, coordinator
from policyflow.agent.episode import EpisodeRunner
from policyflow.config import AgentConfig
from policyflow.engine import SamplingParams
from policyflow.evaluate import full_evaluation, new_report_folder, trivial_set
from policyflow.evaluate.budget import default_budgets
from policyflow.evaluate.episodes import run_problems
from policyflow.evaluate.report import episode_stats
from policyflow.metrics import avg_at_k_estimate, maj_at_k, mean_estimate, pass_at_k_batch, pass_at_k_estimate
from policyflow.model import build_char_tokenizer, build_tiny, save_pretrained
from policyflow.tasks.arithmetic import ArithmeticTask
from policyflow.tasks.base import Problem, TaskError
from policyflow.tasks.countdown import CountdownTask
from policyflow.tasks.jsonl import JsonlTask, RowFormat
from policyflow.tasks.multiply import MultiplyTask
from policyflow.tasks.search_qa import SearchQATask
from tests.envs_for_tests import ScriptedBuilder
from tests.test_evaluate import QuizTask, ScriptedGenerator


# -- estimators -----------------------------------------------------------------------------------


def _maj_brute_force(answers: list[str | None], right: set[str], k: int) -> float:
    """maj@k by enumerating every k-subset; ties split evenly, no answer never wins."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(answers)), k))
    for subset in subsets:
        counts = Counter(answers[i] for i in subset if answers[i] is not None)
        if counts:
            top = max(counts.values())
            tied = [a for a, c in counts.items() if c == top]
            total += sum(a in right for a in tied) / len(tied)
    return total / len(subsets)


def test_maj_at_k_is_exact_against_enumeration() -> None:
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 8)
        answers = [rng.choice(["a", "b", "c", None]) for _ in range(n)]
        right = set(rng.sample(["a", "b", "c"], rng.randint(0, 2)))
        counts = Counter(a for a in answers if a is not None)
        for k in range(1, n + 1):
            got = maj_at_k(list(counts.values()), [a in right for a in counts], n, k)
            assert got == pytest.approx(_maj_brute_force(answers, right, k), abs=1e-12), (answers, right, k)
    assert maj_at_k([2, 2], [True, False], 4, 4) == pytest.approx(0.5)  # a tie
    assert maj_at_k([], [], 3, 2) == 0.0  # no sample answered


def test_estimates_have_the_standard_error_over_problems() -> None:
    est = mean_estimate([0.0, 1.0, 1.0, 0.0])
    assert est.value == 0.5 and est.stderr == pytest.approx(math.sqrt(1 / 3) / 2) and est.num_problems == 4
    assert mean_estimate([0.7]).stderr is None and mean_estimate([]).value == 0.0
    # pass@2 of (n=4, c=1) is 1/2, of (4, 4) is 1: mean 3/4, sd √(1/8), stderr √(1/8)/√2 = 1/4
    passed = pass_at_k_estimate([4, 4], [1, 4], 2)
    assert passed.value == pytest.approx(0.75) and passed.stderr == pytest.approx(0.25)
    assert avg_at_k_estimate([4, 2], [1, 2]).value == pytest.approx((0.25 + 1) / 2)
    assert pass_at_k_batch([4, 8], [0, 0], 2).tolist() == [0.0, 0.0]  # exactly 0, not 1e-16


# -- a full report from scripted episodes -----------------------------------------------------


class TrivialQuiz(QuizTask):
    def trivial_problems(self):
        return [Problem("t0", "t0?", "ok"), Problem("t1", "t1?", "ok")]


SAMPLED = [["a0", "b", "b", ""], ["a1", "a1", "c", "c"], ["a2", "a2", "a2", "a2"]]
GREEDY = ["a0", "x", "a2"]


def _answer(prompt: str, params: SamplingParams) -> str:
    from policyflow.evaluate import request_seed

    if prompt.startswith("t"):
        return "ok!" if params.temperature == 0 else "ok"
    i = int(prompt[1:-1])
    if params.temperature == 0:
        return GREEDY[i]
    return next(SAMPLED[i][j] for j in range(4) if request_seed(0, "heldout", i, j, 0) == params.seed)


def test_full_report_from_scripted_episodes() -> None:
    tokenizer = build_char_tokenizer()
    runner = EpisodeRunner(ScriptedGenerator(tokenizer, _answer), tokenizer, SamplingParams(max_new_tokens=8), AgentConfig())
    task = TrivialQuiz()
    ev = full_evaluation(runner, task, task.problems, temperature=1.0, seed=0, samples_per_prompt=4, trivial=task.trivial_problems())
    r = ev.report
    assert ev.result.accuracy_greedy == pytest.approx(2 / 3) and ev.result.accuracy_sampled == pytest.approx(7 / 12)
    assert list(r.pass_at) == ["pass@1", "pass@2", "pass@4"] and list(r.maj_at) == ["maj@1", "maj@2", "maj@4"]
    assert r.avg_at["avg@4"].value == pytest.approx((1 / 4 + 2 / 4 + 1) / 3)
    # maj@4: q0 votes b 2 : a0 1 (wrong), q1 a1 2 : c 2 (a tie, 1/2), q2 right
    assert r.maj_at["maj@4"].value == pytest.approx((0 + 0.5 + 1) / 3)
    assert r.maj_at["maj@4"].stderr == pytest.approx(mean_estimate([0, 0.5, 1]).stderr)
    assert r.maj_at["maj@1"].value == pytest.approx(r.avg_at["avg@4"].value)  # one vote: a sample's own correctness
    assert r.pass_at["pass@4"].value == pytest.approx(1.0)
    # tokens per episode: right answers are 2 characters, wrong ones "b", "c" 1 and "" 0
    tokens = r.sampled.tokens
    assert tokens.correct_mean == pytest.approx(2.0) and tokens.wrong_mean == pytest.approx((1 + 1 + 0 + 1 + 1) / 5)
    assert r.greedy.tokens.mean == pytest.approx((2 + 1 + 2) / 3) and r.greedy.tokens.wrong_mean == 1.0
    assert r.accuracy_sampled_by_split["even"].value == pytest.approx((1 / 4 + 1) / 2)
    # budgets: the longest greedy episode has 2 tokens: budgets 1 and 2; at 1 every answer is cut
    assert [(p.budget, p.accuracy.value, p.mean_tokens, p.cut_fraction) for p in r.budgets] == [(1, 0.0, 1.0, 1.0), (2, pytest.approx(2 / 3), pytest.approx(5 / 3), 0.0)]
    # the trivial set: "ok!" greedy (3 tokens, wrong), "ok" sampled (2, right)
    t = r.trivial
    assert t.num_problems == 2 and t.greedy.accuracy.value == 0.0 and t.sampled.accuracy.value == 1.0
    assert t.token_ratio_greedy == pytest.approx(3 / (5 / 3)) and t.token_ratio_sampled == pytest.approx(2 / (18 / 12))
    assert r.model_version == 3 and r.sampled.turns == {1: 12} and r.sampled.tool_calls == {0: 12}


def test_a_budget_caps_an_episode_over_all_its_turns() -> None:
    """Budget 6, 4 tokens per turn: turn 1 writes 4, turn 2 is cut to 2, turn 3 gets nothing and asks nothing."""
    tokenizer = build_char_tokenizer()
    generator = ScriptedGenerator(tokenizer, lambda prompt, params: "abcd")

    class ThreeTurns(QuizTask):
        def group_builder(self, problem):
            return ScriptedBuilder(problem, turns=3)

    runner = EpisodeRunner(generator, tokenizer, SamplingParams(max_new_tokens=8), AgentConfig())
    task = ThreeTurns(1)
    [[episode]] = run_problems(runner, task, task.problems, 1, run_seed=None, budget=6)
    assert episode.num_gen_tokens == 6 and [len(s.token_ids) for s in episode.segments if s.kind == "gen"] == [4, 2, 0]
    assert [params.max_new_tokens for _, params in generator.requests] == [6, 2]
    [[free]] = run_problems(runner, task, task.problems, 1, run_seed=None)
    assert free.num_gen_tokens == 12
    stats = episode_stats([[episode], [free]])  # agent tasks: turns and tool calls per episode
    assert stats.turns == {3: 2} and stats.tool_calls == {2: 2} and stats.tool_calls_mean == 2.0


def test_default_budgets_double_up_to_the_longest_episode() -> None:
    assert default_budgets(1) == [1] and default_budgets(4) == [1, 2, 4] and default_budgets(6) == [1, 2, 4, 6]
    assert default_budgets(136) == [1, 2, 4, 8, 16, 32, 64, 136]  # 128 is within 25% of 136
    assert default_budgets(9000) == [4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 9000]  # at most 12 points


# -- tasks: one is_correct contract, a trivial set each -----------------------------------------------


def _contract_holds(task, problems, completions) -> None:
    for problem in problems:
        score = task.score([problem] * len(completions), completions)
        assert score.correct == [task.is_correct(problem, task.extract_answer(c)) for c in completions]
        assert task.is_correct(problem, None) is False


def test_every_task_judges_extracted_answers_alike(tmp_path: Path) -> None:
    arithmetic = ArithmeticTask(num_eval=5)
    _contract_holds(arithmetic, arithmetic.eval_problems()[:2], [arithmetic.eval_problems()[0].answer, " 12 ", "x", "0" + arithmetic.eval_problems()[0].answer])
    assert [p.prompt for p in arithmetic.trivial_problems()][:2] == ["1+1=", "2+2="]
    countdown = CountdownTask(num_eval=5)
    p = countdown.eval_problems()[0]
    _contract_holds(countdown, [p], [p.answer, p.answer + "=" + str(p.columns["target"]), "1+1", ""])
    multiply, search = MultiplyTask(num_eval=5), SearchQATask(num_entities=30, num_eval_entities=10, num_eval=5, corpus_dir=tmp_path)
    for task in (multiply, search):
        p = task.eval_problems()[0]
        _contract_holds(task, [p], [f"<answer>{p.answer}</answer>", f"<answer> 0{p.answer} </answer>", "<answer>no</answer>", p.answer])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+1=", "answer": str(a + 1)}) + "\n" for a in range(10)))
    for reward in ("exact", "numeric"):
        jsonl = JsonlTask(rows, reward=reward)
        p = jsonl.eval_problems()[0]
        _contract_holds(jsonl, [p], [p.answer, f"<answer>{p.answer}.0</answer>", "so <answer>7</answer>", ""])
    # each trivial problem is a problem of its task, answered by its reference
    for task in (arithmetic, countdown, multiply, search):
        trivial = task.trivial_problems()
        assert len(trivial) >= 5 and all(task.is_correct(q, q.answer) for q in trivial)
    assert [q.prompt for q in search.trivial_problems()[:2]] == [f"capital of {search.eval_entities[0].name}?", f"pop of {search.eval_entities[1].name}?"]
    assert countdown.trivial_problems()[0].prompt == "1,1,1->3:" and JsonlTask(rows).trivial_problems() == ()


def test_a_trivial_file_replaces_the_tasks_set(tmp_path: Path) -> None:
    path = tmp_path / "trivial.jsonl"
    path.write_text('{"q": "0+0=", "a": 0}\n\n{"q": "1+0=", "a": "1"}\n')
    problems, source = trivial_set(ArithmeticTask(num_eval=5), str(path), RowFormat("q", "a"))
    assert [(p.prompt, p.answer) for p in problems] == [("0+0=", "0"), ("1+0=", "1")] and source == str(path)
    assert trivial_set(ArithmeticTask(num_eval=5), None)[1] == "task" and trivial_set(QuizTask(), None) == ([], "none")
    with pytest.raises(TaskError, match="eval.trivial_path="):
        trivial_set(ArithmeticTask(num_eval=5), str(tmp_path / "missing.jsonl"))


# -- the report folder and `policyflow eval` ---------------------------------------------------------------


def test_each_evaluation_gets_a_new_folder(tmp_path: Path) -> None:
    first, second = new_report_folder(tmp_path), new_report_folder(tmp_path)
    assert first.parent == tmp_path / "eval" and first.name.startswith("001-") and second.name.startswith("002-")
    (tmp_path / "eval" / "041-old").mkdir()
    assert new_report_folder(tmp_path).name.startswith("042-")


def test_policyflow_eval_prints_one_line_and_writes_the_report(small_config, tmp_path: Path, capfd) -> None:
    overrides = [f"run.output_dir={tmp_path / 'runs'}", "task.name=arithmetic", "task.max_digits=2", "eval.samples_per_prompt=2"]
    from tests.conftest import SMALL

    assert cli.main(["eval", *SMALL, *overrides]) == 0
    out, err = capfd.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 1
    headline = json.loads(lines[0])
    assert {"accuracy_greedy", "accuracy_sampled", "pass_at"} <= set(headline)
    folder = Path(next(line for line in err.splitlines() if line.startswith("evaluation report: ")).split(": ", 1)[1])
    assert folder.parent == tmp_path / "runs" / "demo" / "eval" and {p.name for p in folder.iterdir()} == {"report.json", "report.png", "episodes.jsonl"}
    report = json.loads((folder / "report.json").read_text())
    assert report["num_problems"] == 4 and set(report["maj_at"]) == {"maj@1", "maj@2"} and report["trivial"]["num_problems"] == 10
    records = [json.loads(line) for line in (folder / "episodes.jsonl").read_text().splitlines()]
    assert Counter((r["eval"]["set"], r["eval"]["mode"]) for r in records) == {("heldout", "greedy"): 4, ("heldout", "sampled"): 8, ("trivial", "greedy"): 10, ("trivial", "sampled"): 20}
    assert all(r["kind"] == "eval" and r["segments"][1]["token_ids"] for r in records)
    assert report["sampled"]["accuracy"]["value"] == headline["accuracy_sampled"]


# -- --endpoint: the same evaluation through `policyflow serve` ------------------------------------------------


@pytest.fixture
def served_tiny(tmp_path: Path):
    """A tiny model folder and a live `policyflow serve` app for it on a free port: (folder, base URL)."""
    from policyflow.serve import bound_socket, server, served_app

    model, tokenizer = build_tiny(seed=0, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    folder = save_pretrained(model, tokenizer, tmp_path / "tiny")
    srv = server(served_app(folder, device="cpu"), log_level="warning")
    sock = bound_socket("127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:  # a hang guard, not a timing assertion
        time.sleep(0.02)
    try:
        yield folder, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        srv.should_exit = True
        thread.join(10)


def test_an_endpoint_evaluates_as_the_folder_does(served_tiny, small_config, tmp_path: Path) -> None:
    folder, url = served_tiny
    rows = tmp_path / "spaced.jsonl"  # spaces and newlines: the folder's tokenizer must be read as the model loads it
    rows.write_text("".join(json.dumps({"prompt": f"Q: {a} + {b}?\n", "answer": str(a + b)}) + "\n" for a in range(5) for b in range(5)))
    cfg = small_config("task.name=jsonl", f"task.path={rows}", "task.reward=exact", "eval.samples_per_prompt=2", "run.device=cpu")
    (direct, here_folder), (remote, there_folder) = coordinator.eval_report(cfg, folder), coordinator.eval_report(cfg, folder, endpoint=url)
    assert here_folder != there_folder
    direct, remote = vars(direct), vars(remote)
    episodes = lambda report: [json.loads(line) for line in (report / "episodes.jsonl").read_text().splitlines()]  # noqa: E731
    ids = lambda records, mode: [r["segments"][1]["token_ids"] for r in records if r["eval"]["mode"] == mode]  # noqa: E731
    here, there = episodes(here_folder), episodes(there_folder)
    prompts = lambda records: [r["segments"][0]["token_ids"] for r in records]  # noqa: E731
    assert prompts(here) == prompts(there) and 97 in prompts(here)[0]  # the same ids, the space (97) included
    assert ids(here, "greedy") == ids(there, "greedy")  # prompts go as token ids: greedy is the same, token for token
    assert direct["accuracy_greedy"] == remote["accuracy_greedy"] and direct["mean_tokens_greedy"] == remote["mean_tokens_greedy"]
    # sampled requests carry their seeds to the server, which draws as the local engine does
    assert ids(here, "sampled") == ids(there, "sampled") and direct["accuracy_sampled"] == remote["accuracy_sampled"]


def test_train_writes_the_full_report_only_when_asked(small_config) -> None:
    plain = coordinator.train(small_config("run.name=plain"), log=lambda *_: None)
    assert "eval_report" not in plain and not (small_config("run.name=plain").run_dir / "eval").exists()
    cfg = small_config("run.name=report", "eval.report=true")
    summary = coordinator.train(cfg, log=lambda *_: None)
    folder = Path(summary["eval_report"])
    assert folder.parent == cfg.run_dir / "eval" and json.loads((cfg.run_dir / "summary.json").read_text())["eval_report"] == str(folder)
    report = json.loads((folder / "report.json").read_text())
    assert report["sampled"]["accuracy"]["value"] == summary["eval_after"]["accuracy_sampled"]  # the final weights, evaluated alike
    assert all(json.loads(line)["step"] == summary["steps"] for line in (folder / "episodes.jsonl").read_text().splitlines())


def test_an_endpoint_needs_a_tokenizer_folder_unless_it_names_one(served_tiny, small_config) -> None:
    """Without --model or model.path: the tokenizer of the folder the endpoint names its model by
    (policyflow serve), or a one-line ConfigError; never the tiny char tokenizer unasked."""
    from policyflow.config import ConfigError
    from policyflow.engine.openai_api import build_app
    from policyflow.model import load_pretrained
    from policyflow.policy import PolicySpec
    from policyflow.serve import bound_socket, server
    from policyflow.session import open_endpoint

    folder, url = served_tiny
    spec = PolicySpec.of(small_config("run.device=cpu"))
    runner, _, _, tokenizer = open_endpoint(spec, url)
    runner.generator.close()
    assert tokenizer.get_vocab() == load_pretrained(folder)[1].get_vocab() and tokenizer.name_or_path == str(folder)
    srv = server(build_app(runner.generator, tokenizer, "some-hosted-model", False), log_level="warning")
    sock = bound_socket("127.0.0.1", 0)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:  # a hang guard, not a timing assertion
        time.sleep(0.02)
    try:
        with pytest.raises(ConfigError, match="--endpoint needs the served model's tokenizer: pass --model DIR"):
            open_endpoint(spec, f"http://127.0.0.1:{sock.getsockname()[1]}/v1")
    finally:
        srv.should_exit = True
        thread.join(10)
