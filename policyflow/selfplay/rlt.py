"""RLT (Cetin, Zhao, Tang, arXiv 2506.08388): a teacher that sees each problem's solution is trained
by RL to explain it, rewarded by how well its explanation lets a frozen student reproduce the
solution (`rlt_reward.py`). `policyflow train --config configs/rlt.yaml` runs it (selfplay.method=rlt).

    1. the student (job "study"): warm-start on the task's explanations then answers
       (`Task.explanation`; sft.* of the student), evaluation; it is frozen from here on
    2. the teacher (job "teach"): warm-start on writing those explanations, seeing the solution;
       it explains the distillation set once (the "before RL" explanations)
    3. the teacher's RL phase: train.steps GRPO steps, reward r = r_SS − λ·r_KL from the frozen
       student (`teacher.TeacherGroup`); r_SS and r_KL are logged per step (reward/r_ss, reward/r_kl)
    4. distillation: the trained teacher explains the distillation set (selfplay.rlt_distill_problems
       training problems no earlier stage used, greedily: its most likely explanation); fresh
       students (the student's initial weights, seed and sft settings) are fine-tuned for
       selfplay.rlt_distill_steps steps on the same problems with
           bare               the solutions alone (the task's own format)
           teacher_before_rl  the teacher's explanations before RL, then the solutions
           teacher_after_rl   the trained teacher's explanations, then the solutions
           reference          the task's own explanations, then the solutions
       and evaluated on the held-out set (greedy and sampled; an explaining student's answer is
       what follows its explanation).

The run's summary.json holds the teacher's r_SS/r_KL curve, every arm's held-out accuracy, and how
often the teacher's explanations are the task's reference ones, before and after RL. The comparison
is reported as measured, whichever arm wins. A resume continues the teacher's RL from its last
checkpoint and recomputes the distillation (deterministic in the seed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import asdict

import torch

from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.evaluate import evaluate
from policyflow.coordinator import pipeline_summary
from policyflow.frozen import FrozenModel
from policyflow.logging import read_jsonl
from policyflow.policy import PolicySpec
from policyflow.problems import Problem
from policyflow.selfplay.driver import Role, SelfPlay, write_atomic
from policyflow.selfplay.teacher import StudentTask, TeacherTask, reference_explanation
from policyflow.session import build_task, episode_runner, load_policy, sampling_params
from policyflow.sft import warm_start
from policyflow.tasks.base import Task
from policyflow.tokens import task_prompt_ids

DISTILL_OFFSET = 20_000_000  # the distillation set's training-problem indices (SFT starts at 10M, RL at 0)
EXPLANATIONS_DIR = "explanations"  # <run>/teacher/explanations/step-<N>.json: the distillation set explained after N RL steps
ARMS = ("bare", "teacher_before_rl", "teacher_after_rl", "reference")
CURVE_WINDOW = 5  # summary.json: the curve's first and last this many steps, averaged


async def rlt(sp: SelfPlay) -> dict:
    s, cfg = sp.cfg.selfplay, sp.cfg
    if set(cfg.roles) != {"teacher", "student"}:
        raise ValueError(f"selfplay.method=rlt needs exactly the roles teacher and student, got {', '.join(cfg.roles) or 'none'}")
    steps = cfg.role_config("teacher").train.steps
    student = await sp.open_role("student", "study", 0)
    teacher = await sp.open_role("teacher", "teach", steps)
    for role in (student, teacher):  # a fresh role (a resume stopped before its step-0 checkpoint starts it again)
        if role.spec.role not in sp.folder.role_checkpoints:
            await sp.start(role, evaluate=True)
    inner = build_task(dataclasses.replace(student.spec, job="solve"))
    distill_set = [inner.train_problem(DISTILL_OFFSET + i) for i in range(s.rlt_distill_problems)]
    before = await explanations(sp, teacher, inner, distill_set)  # step 0: the warm-started teacher
    if teacher.loop.step < steps:
        await sp.phase(teacher, steps - teacher.loop.step, models={"student": await student.frozen()}, label="teacher RL")
    teacher_after = await sp.evaluate(teacher)
    after = await explanations(sp, teacher, inner, distill_set)
    tables = {"bare": None, "teacher_before_rl": before, "teacher_after_rl": after,
              "reference": {p.id: reference_explanation(inner, p) for p in distill_set}}
    arms = {}
    for arm in ARMS:
        sp.log(f"distillation: a fresh student on {arm.replace('_', ' ')} ({s.rlt_distill_steps} steps of {student.spec.sft.batch_size})")
        arms[arm] = await asyncio.to_thread(distilled_student, student.spec, StudentTask(inner, explain=tables[arm], sft_set=distill_set), s.rlt_distill_steps, sp.threads)
        sp.log(f"distillation: {arm}: held-out accuracy greedy {arms[arm]['accuracy_greedy']:.1%}, sampled {arms[arm]['accuracy_sampled']:.1%}")
    curve = teacher_curve(teacher)
    p = cfg.pipeline
    return {
        "method": "rlt",
        "reward": {"kl_coef": s.rlt_kl_coef, "alpha": s.rlt_alpha, "student_temperature": s.rlt_student_temperature},
        "student": {"eval": student.loop.eval_before},
        "teacher": {"eval_before": teacher.loop.eval_before, "eval_after": teacher_after, "curve": curve,
                    "first_steps": window_means(curve[:CURVE_WINDOW]), "last_steps": window_means(curve[-CURVE_WINDOW:])},
        "distillation": {
            "problems": len(distill_set), "steps": s.rlt_distill_steps, "batch_size": student.spec.sft.batch_size,
            "explanations_equal_reference": {"teacher_before_rl": agreement(before, tables["reference"]), "teacher_after_rl": agreement(after, tables["reference"])},
            "arms": arms,
        },
        "steps": teacher.loop.step,
        "pipeline": pipeline_summary(p),
        "roles": {r.spec.role: r.summary() for r in (teacher, student)},
        "resume_overrides": sp.folder.resume_overrides,
    }


async def explanations(sp: SelfPlay, teacher: Role, inner: Task, problems: list[Problem]) -> dict[str, str]:
    """The teacher's greedy explanation of each problem with its current weights, by problem id; recorded in
    <run>/teacher/explanations/step-<N>.json (N: its RL steps) and read back from there by a resumed run."""
    path = teacher.spec.folder / EXPLANATIONS_DIR / f"step-{teacher.loop.step}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = FrozenModel.open(await teacher.frozen(), seed=sp.cfg.run.seed)
    try:
        table = await explain_all(model, TeacherTask(inner, teacher.spec), problems)
    finally:
        model.close()
    write_atomic(path, json.dumps(table))
    return table


async def explain_all(teacher: FrozenModel, task: TeacherTask, problems: list[Problem]) -> dict[str, str]:
    """`teacher`'s greedy explanations of `problems` (all in flight at once: its engine batches them)."""
    params = SamplingParams(temperature=0.0, max_new_tokens=teacher.spec.sampling.max_new_tokens, stop=tuple(teacher.spec.sampling.stop) + task.stop)
    chat = teacher.spec.model.chat_template
    samples = await asyncio.gather(*(teacher.generate(task_prompt_ids(teacher.tokenizer, task, task.teaching(p), chat), params) for p in problems))
    return {p.id: x.text.strip() for p, x in zip(problems, samples)}


def distilled_student(spec: PolicySpec, task: StudentTask, steps: int, threads: int) -> dict:
    """A fresh student (the role's initial weights: model.path or the tiny model of its seed) fine-tuned
    `steps` steps on `task`'s warm-start set (no early stop), then its held-out evaluation (as a dict)."""
    torch.set_num_threads(max(1, threads))
    torch.manual_seed(spec.seed)
    model, tokenizer = load_policy(spec, master_weights=True)
    budget = spec.sft.model_copy(update={"max_steps": steps, "target_accuracy": 1.0, "eval_every": steps})
    result = warm_start(model, tokenizer, task, budget, chat_template=spec.model.chat_template, greedy_accuracy=lambda: 0.0,
                        compute_dtype=getattr(torch, spec.model.dtype))
    model.eval()
    engine = AsyncEngine(model, tokenizer)
    try:
        runner = episode_runner(spec, engine, tokenizer, sampling_params(spec, task))
        problems = list(task.eval_problems())[: spec.eval.num_prompts]
        held_out = evaluate(runner, task, problems, temperature=spec.eval.temperature, seed=spec.seed, samples_per_prompt=spec.eval.samples_per_prompt)
    finally:
        engine.close()
    return {**asdict(held_out), "sft_final_loss": result.final_loss, "sft_seconds": round(result.seconds, 1)}


def agreement(table: dict[str, str], reference: dict[str, str]) -> float:
    """The share of problems whose explanation is exactly the reference one."""
    return sum(table[k] == reference[k] for k in reference) / len(reference)


def teacher_curve(teacher: Role) -> list[dict]:
    """The teacher's RL steps from its metrics.jsonl: step, mean reward, r_SS and r_KL."""
    lines = read_jsonl(teacher.spec.folder / "metrics.jsonl")
    return [{"step": line["step"], "reward": line.get("rollout/reward_mean"), "r_ss": line["reward/r_ss"], "r_kl": line["reward/r_kl"],
             "explanation_is_reference": line.get("reward/correct")}
            for line in lines if "reward/r_ss" in line]


def window_means(steps: list[dict]) -> dict | None:
    """The mean reward, r_SS and r_KL over some steps of the curve (None: no steps)."""
    if not steps:
        return None
    return {key: sum(line[key] for line in steps) / len(steps) for key in ("reward", "r_ss", "r_kl")} | {"steps": [line["step"] for line in steps]}

