"""RLT's task views (selfplay/teacher.py): the arithmetic explanation, the teacher's and the student's
formats, and the group builder's reward against the same reward computed one explanation at a time."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from policyflow.agent.env import SingleTurnGroupBuilder, WorkerResources
from policyflow.config_sections import SelfPlayConfig
from policyflow.engine import AsyncEngine
from policyflow.frozen import FrozenModel
from policyflow.model import build_tiny
from policyflow.problems import Problem
from policyflow.selfplay.rlt_reward import rlt_rewards, token_kl, token_logprobs
from policyflow.selfplay.teacher import ANSWER_MARK, StudentTask, TeacherTask, forward_logits, teacher_prompt
from policyflow.tasks.arithmetic import ArithmeticTask, column_trace
from policyflow.tasks.base import TaskError
from policyflow.tokens import render_prompt
from policyflow.types import Segment, Trajectory

SIZES = dict(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1, max_positions=128)


def spec(**selfplay):
    return SimpleNamespace(selfplay=SelfPlayConfig(method="rlt", **selfplay), seed=0, sampling=SimpleNamespace(temperature=0.9),
                           model=SimpleNamespace(chat_template=False))


@pytest.mark.parametrize("a,b,trace", [(47, 85, "7+5=12,4+8+1=13"), (7, 85, "7+5=12,8+1=9"), (0, 0, "0+0=0"), (99, 99, "9+9=18,9+9+1=19"), (50, 50, "0+0=0,5+5=10")])
def test_column_trace(a, b, trace):
    assert column_trace(a, b) == trace
    task = ArithmeticTask(seed=0, min_digits=1, max_digits=2, num_eval=10)
    assert task.explanation(Problem("x", f"{a}+{b}=", str(a + b), {"a": a, "b": b})) == trace


def test_the_teacher_sees_question_and_solution_and_is_taught_the_reference_explanation():
    inner = ArithmeticTask(seed=0, min_digits=1, max_digits=2, num_eval=10)
    teacher = TeacherTask(inner, spec())
    p, q = inner.train_problem(3), teacher.train_problem(3)
    assert q.prompt == teacher_prompt(p.prompt, p.answer) == f"{p.prompt}{p.answer}|"
    assert q.answer == teacher.sft_completion(q) == inner.explanation(p)
    assert q.columns == {"question": p.prompt, "solution": p.answer}
    assert [x.id for x in teacher.eval_problems()] == [f"teach:{x.id}" for x in inner.eval_problems()]
    assert teacher.score([q, q], [q.answer, "1+1=2"]).correct == [True, False]
    assert isinstance(teacher.group_builder(q), SingleTurnGroupBuilder)  # evaluation: the reference check
    teacher.attach(WorkerResources("teacher"))
    with pytest.raises(RuntimeError, match="frozen student"):  # a rollout worker without the student
        teacher.group_builder(q)


def test_a_task_without_explanations_cannot_be_taught():
    from policyflow.tasks.countdown import CountdownTask

    with pytest.raises(TaskError, match="writes no explanations"):
        TeacherTask(CountdownTask(seed=0), spec())


def test_the_student_answers_after_the_mark_and_the_bare_student_as_the_task_does():
    inner = ArithmeticTask(seed=0, min_digits=1, max_digits=2, num_eval=10)
    p = Problem("p", "47+85=", "132", {"a": 47, "b": 85})
    explained = StudentTask(inner, explain={"p": "7+5=12,4+8+1=13"}, sft_set=[p])
    assert explained.sft_completion(p) == f"7+5=12,4+8+1=13{ANSWER_MARK}132"
    assert explained.extract_answer("7+5=12,4+8+1=13>132") == "132"
    assert explained.extract_answer("132") is None  # no mark: no answer
    assert explained.score([p, p], ["x>132", "x>13"]).correct == [True, False]
    assert explained.sft_problem(5) == p  # cycles through its set
    bare = StudentTask(inner, sft_set=[p, inner.train_problem(0)])
    assert bare.sft_completion(p) == "132" and bare.extract_answer("132") == "132"
    assert bare.sft_problem(3) == inner.train_problem(0)


def episode(prompt_ids, gen_ids, text):
    return Trajectory(id="e", task_id="t", segments=[Segment("prompt", tuple(prompt_ids)), Segment("gen", tuple(gen_ids), (0.0,) * len(gen_ids), (0,) * len(gen_ids), text=text)],
                      calls=[], completion_text=text)


def test_group_rewards_equal_the_reward_computed_one_explanation_at_a_time():
    teacher_model, tok = build_tiny(seed=1, **SIZES)
    student_model, _ = build_tiny(seed=2, **SIZES)
    inner = ArithmeticTask(seed=0, min_digits=1, max_digits=2, num_eval=10)
    s = spec(rlt_kl_coef=3.0, rlt_alpha=0.01, rlt_student_temperature=0.7)
    task = TeacherTask(inner, s)
    student = FrozenModel(student_model, tok, spec=s)
    engine = AsyncEngine(teacher_model, tok)
    task.attach(WorkerResources("teacher", generators={"teacher": engine}, tokenizer=tok, models={"student": student}))
    problem = task.train_problem(0)
    prompt = render_prompt(tok, problem.prompt, False)
    texts = ["3+4=7", "", "9+9=18,1+1=2", "junk!!"]  # the empty one: the teacher wrote EOS at once
    trajectories = [episode(prompt, list(tok(t, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id], t) for t in texts]

    async def run():
        return await task.group_builder(problem).score_group(trajectories)

    forwards = student.forwards
    group = asyncio.run(run())
    assert student.forwards == forwards + 1  # the G student rows in one forward
    q = render_prompt(tok, problem.columns["question"], False)
    sol = tok(problem.columns["solution"], add_special_tokens=False)["input_ids"]
    mark = tok(ANSWER_MARK, add_special_tokens=False)["input_ids"]
    for g, text in enumerate(texts):
        expl = tok(text, add_special_tokens=False)["input_ids"]
        (s_TV,) = forward_logits(student_model, [q + expl + mark + sol])
        (t_TV,) = forward_logits(teacher_model, [prompt + expl])
        start = len(q) + len(expl) + len(mark)
        logp = token_logprobs(s_TV[start - 1:start - 1 + len(sol)], torch.tensor(sol), temperature=0.7)
        kl = token_kl(t_TV[len(prompt) - 1:len(prompt) - 1 + len(expl)], s_TV[len(q) - 1:len(q) - 1 + len(expl)], teacher_temperature=0.9, student_temperature=0.7)
        one = rlt_rewards(logp[None], torch.ones(1, len(sol), dtype=torch.bool), kl[None], torch.ones(1, len(expl), dtype=torch.bool), kl_coef=3.0, alpha=0.01)
        assert group.rewards[g] == pytest.approx(one.reward_G.item(), abs=1e-5)
        assert group.parts[g]["r_ss"] == pytest.approx(one.r_ss_G.item(), abs=1e-5)
        assert group.parts[g]["r_kl"] == pytest.approx(one.r_kl_G.item(), abs=1e-5)
    assert group.parts[1]["r_kl"] == 0.0
    assert [p["correct"] for p in group.parts] == [float(t == problem.answer) for t in texts]
    engine.close()
    student.close()


# -- the driver, end to end on a very small model --------------------------------------------------

TINY = ["model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.intermediate_size=64", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
        "run.progress=false", "run.threads=1", "train.steps=2", "train.prompts_per_step=2", "train.group_size=4", "eval.num_prompts=4",
        "selfplay.rlt_distill_problems=4", "selfplay.rlt_distill_steps=2", "roles.student.sft.max_steps=2", "roles.teacher.sft.max_steps=2",
        "roles.student.sft.eval_prompts=4", "roles.teacher.sft.eval_prompts=4", "roles.student.sft.batch_size=4", "roles.teacher.sft.batch_size=4",
        "sampling.max_new_tokens=8", "roles.teacher.sampling.max_new_tokens=6"]


def test_an_rlt_run_logs_the_reward_terms_and_compares_the_four_students(tmp_path):
    import json
    import math

    from policyflow.config import load_config
    from policyflow.coordinator import train
    from policyflow.selfplay.rlt import ARMS

    cfg = load_config("configs/rlt.yaml", [*TINY, f"run.output_dir={tmp_path}"])
    summary = train(cfg, log=lambda line: None)
    run = tmp_path / "rlt"
    assert json.loads((run / "summary.json").read_text()) == summary
    curve = summary["teacher"]["curve"]
    assert [c["step"] for c in curve] == [1, 2]
    assert all(math.isfinite(c["r_ss"]) and c["r_ss"] <= 0 and c["r_kl"] >= 0 for c in curve)
    assert all(c["reward"] == pytest.approx(c["r_ss"] - 3.0 * c["r_kl"], abs=1e-5) for c in curve)  # λ = 3 (configs/rlt.yaml)
    arms = summary["distillation"]["arms"]
    assert list(arms) == list(ARMS) and all(0.0 <= a["accuracy_sampled"] <= 1.0 and a["num_prompts"] == 4 for a in arms.values())
    for step in (0, 2):
        assert len(json.loads((run / "teacher" / "explanations" / f"step-{step}.json").read_text())) == 4
    assert summary["roles"]["teacher"]["steps"] == 2 and summary["steps"] == 2
    # A resume with more steps continues the teacher's RL, keeps its step-0 explanations and explains again.
    resumed = train(load_config("configs/rlt.yaml", [*TINY, f"run.output_dir={tmp_path}", "train.steps=3"]), resume=run, log=lambda line: None)
    assert [c["step"] for c in resumed["teacher"]["curve"]] == [1, 2, 3] and resumed["steps"] == 3
    assert (run / "teacher" / "explanations" / "step-3.json").is_file()
    drop_time = lambda arm: {k: v for k, v in arm.items() if k != "sft_seconds"}  # noqa: E731
    assert drop_time(resumed["distillation"]["arms"]["bare"]) == drop_time(summary["distillation"]["arms"]["bare"])  # the same fresh student, seed and set
