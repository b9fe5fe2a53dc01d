"""R-Zero (Huang et al., arXiv 2508.05004): a challenger and a solver that train each other with
no labels. `policyflow train --config configs/rzero.yaml` runs it (selfplay.method=rzero).

    warm-start both (fresh runs: sft.* of each role), evaluate the solver, checkpoint step-0
    for each iteration (selfplay.iterations):
        1. challenger phase: selfplay.challenger_steps GRPO steps; each problem it writes is answered
           selfplay.votes times by the frozen solver (`challenger.ChallengerGroup`)
        2. the solver's set: the challenger writes selfplay.questions problems; the frozen solver
           votes on each; those with |p̂ − ½| ≤ selfplay.band are kept with their majority answer as
           the pseudo-label (written to <run>/solver/iterations/<i>.json before it is trained on)
        3. solver phase: selfplay.solver_steps GRPO steps on that set (reward: the answer equals
           the pseudo-label), then the solver's held-out evaluation
        one line per iteration in <run>/selfplay.jsonl

No phase reads a reference answer: the solver trains on pseudo-labels. Where the task can compute
a written problem's true answer (`Task.true_answer`), the pseudo-labels' accuracy is measured
for the log, and nothing trains on it (tests/test_rzero.py checks that the weights are the same
whether the truth is known or not). The held-out set is the task's, which `read_problem`
refuses, so the solver never trains on it.

A resume continues from each role's last checkpoint: the position inside an iteration follows
from the roles' steps (iteration i's challenger phase ends at step (i+1)·challenger_steps), and a
solver phase replays its recorded set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

from policyflow.engine import SamplingParams
from policyflow.coordinator import pipeline_summary
from policyflow.frozen import FrozenModel
from policyflow.logging import JsonlWriter, read_jsonl
from policyflow.problems import Problem
from policyflow.selfplay.challenger import Vote, vote
from policyflow.selfplay.driver import Role, SelfPlay, write_atomic
from policyflow.session import build_task
from policyflow.tasks.base import Task
from policyflow.tokens import task_prompt_ids

ITERATIONS_DIR = "iterations"  # <run>/solver/iterations/<i>.json: the solver's set of iteration i, with its statistics
LOG_FILE = "selfplay.jsonl"  # <run>/selfplay.jsonl: one line per iteration


class SetSource:
    """The solver's problems in a phase: its recorded set, cycled by issue index."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    async def problem(self, index: int) -> Problem:
        return self.problems[index % len(self.problems)]


async def rzero(sp: SelfPlay) -> dict:
    s = sp.cfg.selfplay
    Kc, Ks = s.challenger_steps, s.solver_steps
    challenger = await sp.open_role("challenger", "challenge", s.iterations * Kc)
    solver = await sp.open_role("solver", "solve", s.iterations * Ks)
    if not sp.resumed:
        await sp.start(solver, evaluate=True)
        await sp.start(challenger, evaluate=False)
    task = build_task(solver.spec)  # the solver's task: reads written problems, extracts answers
    log_path = sp.folder.path / LOG_FILE
    done = solver.loop.step // Ks  # iterations whose solver phase ended
    _keep_lines(log_path, lambda line: line.get("iteration", 0) <= done)
    log = JsonlWriter(log_path)
    for it in range(done, s.iterations):
        if challenger.loop.step < (it + 1) * Kc:
            await sp.phase(challenger, (it + 1) * Kc - challenger.loop.step, models={"solver": await solver.frozen()}, label=f"challenger {it + 1}/{s.iterations}")
        problems, stats = await solver_set(sp, it, challenger, solver, task)
        sp.log(f"iteration {it + 1}: {stats['kept']} of {stats['distinct']} distinct problems kept (p̂ within ½ ± {s.band}); pseudo-labels right: {_share(stats['pseudo_label_accuracy'])}")
        await sp.phase(solver, (it + 1) * Ks - solver.loop.step, source=SetSource(problems), label=f"solver {it + 1}/{s.iterations}")
        result = await sp.evaluate(solver)
        line = {"iteration": it + 1, "challenger/reward_mean": _challenger_reward(challenger, it, Kc), **stats,
                "solver/accuracy_greedy": result["accuracy_greedy"], "solver/accuracy_sampled": result["accuracy_sampled"],
                "solver/step": solver.loop.step, "challenger/step": challenger.loop.step}
        log.write(line)
        sp.log(f"iteration {it + 1}: solver held-out accuracy greedy {result['accuracy_greedy']:.1%}, sampled {result['accuracy_sampled']:.1%}")
    iterations = read_jsonl(log_path)
    last = iterations[-1]
    eval_after = {"accuracy_greedy": last["solver/accuracy_greedy"], "accuracy_sampled": last["solver/accuracy_sampled"]}
    p = sp.cfg.pipeline
    return {
        "method": "rzero",
        "eval_before": solver.loop.eval_before,
        "eval_after": eval_after,
        "iterations": iterations,
        "steps": challenger.loop.step + solver.loop.step,
        "pipeline": pipeline_summary(p),
        "roles": {r.spec.role: r.summary() for r in (challenger, solver)},
        "resume_overrides": sp.folder.resume_overrides,
    }


async def solver_set(sp: SelfPlay, it: int, challenger: Role, solver: Role, task: Task) -> tuple[list[Problem], dict]:
    """Iteration `it`'s pseudo-labelled problems and their statistics: read back when recorded (a
    resume), else made by the frozen challenger and solver and recorded before any is trained on."""
    path = solver.spec.folder / ITERATIONS_DIR / f"{it + 1}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        return [Problem(p["id"], p["prompt"], p["answer"], p.get("metadata") or {}) for p in record["problems"]], record["stats"]
    s = sp.cfg.selfplay
    writer = FrozenModel.open(await challenger.frozen(), seed=sp.cfg.run.seed)
    judge = FrozenModel.open(await solver.frozen(), seed=sp.cfg.run.seed)
    try:
        written = await write_problems(writer, build_task(challenger.spec), s.questions, _seed(sp.cfg.run.seed, "write", it))
        distinct = list({p.prompt: p for p in written if p is not None}.values())
        votes = await vote(judge, task, distinct, s.votes, _seed(sp.cfg.run.seed, "vote", it))
    finally:
        writer.close()
        judge.close()
    kept = [(p, v) for p, v in zip(distinct, votes) if v.label is not None and abs(v.p_hat - 0.5) <= s.band]
    if not distinct:
        raise RuntimeError(f"iteration {it + 1}: none of the {len(written)} texts the challenger wrote is a well-formed problem of task {task.name!r} "
                           "(outside the held-out set); warm-start the challenger further (roles.challenger.sft.*)")
    if not kept:
        raise RuntimeError(f"iteration {it + 1}: none of the {len(distinct)} distinct problems the challenger wrote has p̂ within ½ ± {s.band}; "
                           "raise selfplay.band or selfplay.questions, or warm-start the solver further")
    problems = [Problem(f"rzero:{it + 1}:{k}", p.prompt, v.label, {"p_hat": v.p_hat}) for k, (p, v) in enumerate(kept)]
    stats = set_statistics(task, written, distinct, votes, kept, s.votes)
    record = {"stats": stats, "problems": [{"id": p.id, "prompt": p.prompt, "answer": p.answer, "metadata": dict(p.columns)} for p in problems]}
    write_atomic(path, json.dumps(record))
    return problems, stats


async def write_problems(writer: FrozenModel, challenger_task: Task, n: int, seed: int) -> list[Problem | None]:
    """n problems written by the challenger at its sampling settings (seeded per request), as the
    inner task reads them (None: not a well-formed problem, or a held-out one)."""
    sampling = writer.spec.sampling
    params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, max_new_tokens=sampling.max_new_tokens)
    prompt = challenger_task.train_problem(0)
    ids = task_prompt_ids(writer.tokenizer, challenger_task, prompt, writer.spec.model.chat_template)
    samples = await asyncio.gather(*(writer.generate(ids, replace(params, seed=seed + j)) for j in range(n)))
    return [challenger_task.inner.read_problem(x.text.strip()) for x in samples]


def set_statistics(task: Task, written: list, distinct: list[Problem], votes: list[Vote], kept: list[tuple[Problem, Vote]], m: int) -> dict:
    """What the log keeps of one iteration's set: how many problems were written, well-formed,
    distinct and kept; the histogram of p̂ (how many of the m answers agree with the majority:
    0..m); and how often the pseudo-labels are right, where the task knows (None where it cannot)."""
    histogram = Counter(round(v.p_hat * m) for v in votes)

    def accuracy(pairs) -> float | None:
        truths = [(v.label, task.true_answer(p)) for p, v in pairs]
        known = [(label, truth) for label, truth in truths if truth is not None]
        return sum(label == truth for label, truth in known) / len(known) if known else None

    return {
        "written": len(written), "well_formed": sum(p is not None for p in written), "distinct": len(distinct), "kept": len(kept),
        "kept_fraction": len(kept) / len(distinct) if distinct else 0.0,
        "p_hat_histogram": [histogram.get(k, 0) for k in range(m + 1)],
        "pseudo_label_accuracy": accuracy(kept), "pseudo_label_accuracy_all": accuracy(zip(distinct, votes)),
    }


def _challenger_reward(challenger: Role, it: int, Kc: int) -> float | None:
    """The mean training reward of the challenger's steps in iteration `it` (from its metrics.jsonl)."""
    lines = [line for line in read_jsonl(challenger.spec.folder / "metrics.jsonl") if it * Kc < line.get("step", 0) <= (it + 1) * Kc and "rollout/reward_mean" in line]
    return sum(line["rollout/reward_mean"] for line in lines) / len(lines) if lines else None


def _seed(seed: int, what: str, it: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{what}/{it}".encode(), digest_size=6).digest(), "big")


def _share(value: float | None) -> str:
    return "unknown (the task cannot check)" if value is None else f"{value:.1%}"


def _keep_lines(path: Path, keep) -> None:
    """Rewrite a JSONL log with only the lines `keep` accepts (a resume runs the others again)."""
    if path.is_file():
        lines = [line for line in read_jsonl(path) if keep(line)]
        write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines))

