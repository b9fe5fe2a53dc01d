"""R-Zero (issue 20 §2): the challenger's reward from its formulas, the frozen model's batched
forwards, and whole tiny runs: per-role folders, the solver's pseudo-labelled sets, resume in the
middle of an iteration, and no reference answer read by any phase."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

from policyflow import coordinator
from policyflow.config import load_config
from policyflow.frozen import FrozenModel
from policyflow.model import build_tiny
from policyflow.problems import Problem
from policyflow.rundir import RunInterrupted
from policyflow.selfplay import challenger as ch
from policyflow.selfplay.driver import SelfPlay
from policyflow.tasks.arithmetic import ArithmeticTask
from policyflow.types import Sample
from tests.conftest import SMALL


def test_the_majority_its_share_and_the_uncertainty_reward() -> None:
    vote = ch.majority(["7", "8", None, "8", "7", "9"])
    assert vote.label == "7" and vote.p_hat == pytest.approx(2 / 6)  # a tie goes to the answer given first
    assert ch.majority([None, None]).label is None and ch.majority([None, None]).p_hat == 0.0
    assert [ch.uncertainty_reward(p) for p in (0.0, 0.3, 0.5, 0.7, 1.0)] == pytest.approx([0.0, 0.6, 1.0, 0.6, 0.0])


def test_the_repetition_penalty_clusters_by_sacrebleu_distance() -> None:
    texts = ["12+34=", "12+34=", "5+6=", "98+7="]
    # the distance is 1 − mean(BLEU(a, b), BLEU(b, a)) / 100 with sacrebleu's own sentence BLEU
    expected = 1 - (sacrebleu.sentence_bleu("5+6=", ["98+7="]).score + sacrebleu.sentence_bleu("98+7=", ["5+6="]).score) / 200
    assert ch.bleu_distance("5+6=", "98+7=") == pytest.approx(expected) and ch.bleu_distance("12+34=", "12+34=") == pytest.approx(0.0)
    assert ch.repetition_penalties(texts, distance=0.5, weight=1.0) == pytest.approx([0.5, 0.5, 0.25, 0.25])
    assert ch.repetition_penalties(texts, distance=0.5, weight=2.0) == pytest.approx([1.0, 1.0, 0.5, 0.5])
    assert ch.repetition_penalties(texts, distance=1.01, weight=1.0) == pytest.approx([1.0] * 4)  # every pair linked: one cluster


def test_arithmetic_reads_written_problems_but_never_a_held_out_one() -> None:
    task = ArithmeticTask(seed=0, min_digits=1, max_digits=2, num_eval=20)
    held = task.eval_problems()[0]
    a, b = held.columns["a"], held.columns["b"]
    assert task.read_problem(f"{a}+{b}=") is None and task.read_problem(f"{b}+{a}=") is None  # in either order
    free = next(f"{x}+{y}=" for x in range(10) for y in range(10) if task.read_problem(f"{x}+{y}=") is not None)
    problem = task.read_problem(f" {free}\n")
    assert problem.prompt == free and problem.answer == ""  # no label comes with a written problem
    assert task.true_answer(problem) == str(sum(int(x) for x in free[:-1].split("+")))
    for bad in ("05+3=", "123+4=", "1+2", "1+2=3", "a+b=", ""):
        assert task.read_problem(bad) is None, bad


class _Solver:
    """A frozen solver that answers each prompt from a fixed list of answers, in turn."""

    def __init__(self, answers: dict[str, list[str]], spec) -> None:
        _, self.tokenizer = build_tiny()
        self.answers, self.spec, self.asked = {k: list(v) for k, v in answers.items()}, spec, []

    async def generate(self, prompt_ids, params):
        prompt = self.tokenizer.decode(prompt_ids)
        self.asked.append((prompt, params.seed))
        return Sample(tuple(prompt_ids), (), (), (), "stop", text=self.answers[prompt].pop(0))


def test_the_challenger_reward_is_the_formula_of_its_group(small_config) -> None:
    from dataclasses import replace

    from policyflow.agent.env import WorkerResources
    from policyflow.policy import PolicySpec
    from policyflow.selfplay.challenger import ChallengerTask

    cfg = small_config("task.name=arithmetic", "task.max_digits=2", "selfplay.votes=4")
    spec = replace(PolicySpec.of(cfg), job="challenge")
    inner = ArithmeticTask(seed=0, min_digits=1, max_digits=2, num_eval=8)
    free = [f"{x}+{y}=" for x in range(10, 99) for y in range(10, 99) if inner.read_problem(f"{x}+{y}=")][:2]
    solver = _Solver({free[0]: ["5", "5", "6", "7"], free[1]: ["1", "1", "1", "1"]}, spec)
    task = ChallengerTask(inner, spec)
    task.attach(WorkerResources("challenger", models={"solver": solver}))

    class T:
        def __init__(self, text):
            self.completion_text = text

    texts = [free[0], free[0], "not a problem", free[1]]
    solver.answers = {free[0]: ["5", "5", "6", "7"] * 2, free[1]: ["1", "1", "1", "1"]}
    score = asyncio.run(task.group_builder(task.train_problem(0)).score_group([T(t) for t in texts]))
    # free[0] twice: p̂ 0.5, uncertainty 1, the two copies one cluster of 2 of the 3 well-formed: 1 − 2/3
    # free[1]: p̂ 1 → uncertainty 0, max(0, 0 − 1/3) = 0; the malformed one: 0 (the format gate)
    assert score.rewards == pytest.approx([1 - 2 / 3, 1 - 2 / 3, 0.0, 0.0])
    assert [p["valid"] for p in score.parts] == [1.0, 1.0, 0.0, 1.0] and score.parts[0]["p_hat"] == 0.5
    seeds = [s for prompt, s in solver.asked if prompt == free[0]]
    assert len(seeds) == 8 and len(set(seeds)) == 4  # each problem's m answers are seeded by (run seed, problem, j)


def test_a_frozen_model_runs_concurrent_forwards_as_one_batch() -> None:
    model, tokenizer = build_tiny(seed=1, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    frozen = FrozenModel(model, tokenizer)
    rows = [tokenizer.encode("12+34="), tokenizer.encode("7+8="), tokenizer.encode("1")]

    async def both():
        return await asyncio.gather(*(frozen.logits(r) for r in rows))

    got = asyncio.run(both())
    assert frozen.forwards == 1
    for row, logits_TV in zip(rows, got):
        with torch.no_grad():
            alone_TV = model(input_ids=torch.tensor([row])).logits[0]
        assert logits_TV.shape == alone_TV.shape and torch.allclose(logits_TV, alone_TV, atol=1e-5)
    frozen.close()


# -- whole runs ------------------------------------------------------------------------------

RZERO = [
    "task.name=arithmetic", "task.max_digits=1", "task.num_eval=8", "sampling.max_new_tokens=4",
    "selfplay.method=rzero", "selfplay.iterations=2", "selfplay.challenger_steps=1", "selfplay.solver_steps=2",
    "selfplay.questions=24", "selfplay.votes=3", "selfplay.band=0.5",
    "roles.solver.sft.max_steps=30", "roles.solver.sft.lr=0.01", "roles.challenger.sft.max_steps=60", "roles.challenger.sft.batch_size=16",  # the format: `d+d=`
    "roles.challenger.sft.lr=0.01", "roles.challenger.sft.warmup_steps=10", "roles.challenger.sampling.max_new_tokens=5",
    "train.prompts_per_step=2", "train.group_size=3", "eval.every=0",
]


def _rzero(tmp_path: Path, *overrides: str):
    return load_config(None, [*SMALL, f"run.output_dir={tmp_path / 'runs'}", "run.name=rz", *RZERO, *overrides])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((folder / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1] / "model.safetensors"))


def test_rzero_trains_two_roles_in_their_folders_on_pseudo_labels(tmp_path: Path) -> None:
    cfg = _rzero(tmp_path)
    summary = coordinator.train(cfg, log=lambda line: None)
    run = cfg.run_dir
    assert summary["method"] == "rzero" and summary["steps"] == 2 * 1 + 2 * 2
    assert summary["roles"]["challenger"]["steps"] == 2 and summary["roles"]["solver"]["steps"] == 4
    assert {"accuracy_greedy", "accuracy_sampled"} <= set(summary["eval_before"]) and {"accuracy_sampled"} <= set(summary["eval_after"])
    assert json.loads((run / "summary.json").read_text())["pipeline"]["mode"] == "sync"
    assert (run / "config.yaml").is_file() and not (run / "checkpoints").exists()
    for role in ("challenger", "solver"):
        assert (run / role / "checkpoints").is_dir() and (run / role / "metrics.jsonl").is_file()
    lines = [json.loads(x) for x in (run / "selfplay.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2] and lines == summary["iterations"]
    for it, line in enumerate(lines, 1):
        record = json.loads((run / "solver" / "iterations" / f"{it}.json").read_text())
        assert record["stats"] == {k: line[k] for k in record["stats"]}
        assert sum(line["p_hat_histogram"]) == line["distinct"] and len(line["p_hat_histogram"]) == 3 + 1
        # each kept problem carries the solver's majority answer, and p̂ its share of the m = 3 votes
        assert len(record["problems"]) == line["kept"] > 0
        assert all(p["answer"] and round(p["metadata"]["p_hat"] * 3) >= 1 for p in record["problems"])


def test_no_phase_reads_a_reference_answer(tmp_path: Path, monkeypatch) -> None:
    """The same run twice: once as it is, once where, after the warm-starts, the task's training
    problems come with a wrong answer and its true answers lie. No phase trains on either, so both
    runs train the very same weights; only the logged pseudo-label accuracy differs. (Workers still
    list training prompts to check that they fit the context: prompts, not answers.)"""
    a = _rzero(tmp_path / "a")
    coordinator.train(a, log=lambda line: None)

    started = {"phases": False}
    phase = SelfPlay.phase

    async def flagged(self, *args, **kwargs):
        started["phases"] = True
        return await phase(self, *args, **kwargs)

    real_train_problem = ArithmeticTask.train_problem

    def guarded(self, index):
        problem = real_train_problem(self, index)
        return Problem(problem.id, problem.prompt, "-1", problem.columns) if started["phases"] else problem

    monkeypatch.setattr(SelfPlay, "phase", flagged)
    monkeypatch.setattr(ArithmeticTask, "train_problem", guarded)
    monkeypatch.setattr(ArithmeticTask, "true_answer", lambda self, problem: "-1" if started["phases"] else None)
    b = _rzero(tmp_path / "b")
    coordinator.train(b, log=lambda line: None)
    for role in ("challenger", "solver"):
        wa, wb = _weights(a.run_dir / role), _weights(b.run_dir / role)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), role
    la, lb = (json.loads((c.run_dir / "selfplay.jsonl").read_text().splitlines()[0]) for c in (a, b))
    assert lb["pseudo_label_accuracy"] == 0.0 and la["kept"] == lb["kept"]  # the lying truth shows only in the log


def test_resume_continues_in_the_middle_of_an_iteration(tmp_path: Path, monkeypatch) -> None:
    cfg = _rzero(tmp_path)
    phase, calls = SelfPlay.phase, []

    async def stop_after_three(self, role, steps, **kwargs):
        calls.append(role.spec.role)
        if len(calls) == 4:  # iteration 2's solver phase: its set is recorded, the challenger has trained
            raise RunInterrupted("stopped by the test")
        return await phase(self, role, steps, **kwargs)

    monkeypatch.setattr(SelfPlay, "phase", stop_after_three)
    with pytest.raises(RunInterrupted):
        coordinator.train(cfg, log=lambda line: None)
    recorded = (cfg.run_dir / "solver" / "iterations" / "2.json").read_text()
    monkeypatch.setattr(SelfPlay, "phase", phase)
    notes: list[str] = []
    summary = coordinator.train(cfg, resume=cfg.run_dir, log=notes.append)
    assert any("resumed from" in n and "challenger/checkpoints/step-2" in n for n in notes)
    assert summary["roles"]["challenger"]["steps"] == 2 and summary["roles"]["solver"]["steps"] == 4
    assert [x["iteration"] for x in summary["iterations"]] == [1, 2]
    assert (cfg.run_dir / "solver" / "iterations" / "2.json").read_text() == recorded  # the set is replayed, not made again


@pytest.mark.slow
def test_rzero_runs_in_the_process_runtime(tmp_path: Path) -> None:
    """The frozen solver crosses the process boundary as a `FrozenSource` over a file snapshot store:
    each challenger worker process opens it from files (about a minute on 2 cores: `make test-slow`)."""
    cfg = _rzero(tmp_path, "pipeline.runtime=process")
    summary = coordinator.train(cfg, log=lambda line: None)
    assert summary["pipeline"]["runtime"] == "process" and summary["steps"] == 6
    assert [x["iteration"] for x in summary["iterations"]] == [1, 2] and all(x["kept"] > 0 for x in summary["iterations"])
    assert not (cfg.run_dir / "snapshots").exists()  # the roles' snapshot files go with the run
