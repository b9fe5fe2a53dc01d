"""RLT's two views of a task (Cetin et al., arXiv 2506.08388): the teacher's, which sees a problem's
solution and explains it, and the student's, which answers with an explanation first.

    teacher prompt     47+85=132|              question, solution, TEACH_MARK
    teacher writes     7+5=12,4+8+1=13         an explanation (its warm-start: `Task.explanation`)
    student reads      47+85=7+5=12,4+8+1=13>132     question, explanation, ANSWER_MARK, solution

`TeacherTask` is the job "teach" (`selfplay.jobs`). Its group builder (`TeacherGroup`) scores the G
explanations of one problem with the RLT reward (`rlt_reward.py`): one batched forward of the
frozen student (`resources.models["student"]`, a `frozen.FrozenModel`) over the G student rows, and
one of the teacher over its own G contexts (`resources.models["teacher"]` when given, else the
rollout worker's engine model, whose weights are the ones that sampled the explanations).

`StudentTask` is the student's view of the inner task, answered after an explanation (the reward's
student, and a distilled one) or bare (the comparison's baseline); its warm-start may cycle through
a fixed set of problems (the distillation set, the same for both arms).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from policyflow.agent.env import EnvGroupBuilder, GroupScore, SingleTurnGroupBuilder
from policyflow.problems import Problem, Score
from policyflow.selfplay.rlt_reward import pad_rows, rlt_rewards, token_kl, token_logprobs
from policyflow.tasks.base import Task, TaskError, check_batch
from policyflow.tokens import render_prompt
from policyflow.trainer import compute_precision

TEACH_MARK = "|"  # ends the teacher's prompt: question + solution + "|"
ANSWER_MARK = ">"  # between an explanation and its answer: explanation + ">" + answer


def teacher_prompt(question: str, solution: str) -> str:
    """What the teacher sees: the question, its solution, and the mark after which it explains."""
    return f"{question}{solution}{TEACH_MARK}"


def explained_completion(explanation: str, answer: str) -> str:
    """What an explaining student writes: the explanation, the mark, the answer."""
    return f"{explanation}{ANSWER_MARK}{answer}"


def reference_explanation(inner: Task, problem: Problem) -> str:
    """`inner.explanation(problem)`; a TaskError when the task has none (it cannot be taught)."""
    text = inner.explanation(problem)
    if text is None:
        raise TaskError(f"task {inner.name!r} writes no explanations, so RLT cannot warm-start a teacher on it; define {type(inner).__name__}.explanation (arithmetic does)")
    return text


class TeacherTask(Task):
    """The job "teach" of a task: explain the solution of each of its problems, seeing it.

    A teacher problem's prompt is `teacher_prompt(question, solution)`, its `answer` the task's
    reference explanation (the warm-start's demonstration; "correct" means writing exactly it, which
    only evaluation reads), and `columns` carry the question and solution the reward reads."""

    name = "rlt_teacher"
    stop: tuple[str, ...] = ()
    vocabulary_checked = False  # whether the worker's and the student's tokenizers were compared (once)

    def __init__(self, inner: Task, spec) -> None:
        self.inner, self.settings, self.seed = inner, spec.selfplay, spec.seed
        self.temperature = spec.sampling.temperature
        reference_explanation(inner, inner.train_problem(0))  # refuse a task without explanations now

    def teaching(self, problem: Problem) -> Problem:
        """The teacher's version of one of the inner task's problems."""
        question = self.inner.render_prompt(problem)
        return Problem(id=f"teach:{problem.id}", prompt=teacher_prompt(question, problem.answer), answer=reference_explanation(self.inner, problem),
                       columns={"question": question, "solution": problem.answer})

    def train_problem(self, index: int) -> Problem:
        return self.teaching(self.inner.train_problem(index))

    def eval_problems(self) -> Sequence[Problem]:
        return tuple(self.teaching(p) for p in self.inner.eval_problems())

    def sft_problem(self, index: int) -> Problem:
        return self.teaching(self.inner.sft_problem(index))

    def extract_answer(self, completion: str) -> str | None:
        return completion.strip() or None

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """Whether each explanation is the reference one (evaluation; training rewards need the student: `TeacherGroup`)."""
        check_batch(problems, completions)
        ok = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(x) for x in ok], correct=ok)

    def group_builder(self, problem: Problem) -> EnvGroupBuilder:
        """In a rollout worker, the RLT reward (`TeacherGroup`), which needs the frozen student; outside
        one (evaluation), `score`: whether the explanation is the reference one."""
        if self.resources is None:
            return SingleTurnGroupBuilder(self, problem)
        if "student" not in self.resources.models:
            raise RuntimeError("the teacher's rewards need the frozen student: run it through the RLT driver (selfplay.method=rlt), which gives its workers models={'student': ...}")
        return TeacherGroup(self, problem)


class TeacherGroup(SingleTurnGroupBuilder):
    """The G explanations of one problem, scored together (two batched forwards)."""

    async def score_group(self, trajectories) -> GroupScore:
        task, resources, s = self.task, self.task.resources, self.task.settings
        student = resources.models["student"]
        if not task.vocabulary_checked:
            check_same_vocabulary(resources.tokenizer, student.tokenizer)
            task.vocabulary_checked = True
        question, solution = self.problem.columns["question"], self.problem.columns["solution"]
        eos = (resources.tokenizer or student.tokenizer).eos_token_id
        contexts, explanations = zip(*(teacher_tokens(t, eos) for t in trajectories))
        rows = [student_row(student.tokenizer, question, list(e), solution, student.spec.model.chat_template if student.spec else False) for e in explanations]
        student_logits = await asyncio.gather(*(student.logits(row.ids) for row in rows))  # one forward for the group
        teacher_logits = await teacher_forward(resources, [list(c) + list(e) for c, e in zip(contexts, explanations)])
        sol_rows, kl_rows = [], []
        for row, context, e, s_TV, t_TV in zip(rows, contexts, explanations, student_logits, teacher_logits):
            sol_rows.append(token_logprobs(predicting(s_TV, row.solution_start, len(row.solution)), torch.tensor(row.solution), temperature=s.rlt_student_temperature))
            kl_rows.append(token_kl(predicting(t_TV, len(context), len(e)), predicting(s_TV, row.explanation_start, len(e)),
                                    teacher_temperature=task.temperature, student_temperature=s.rlt_student_temperature))
        sol_GS, sol_mask = pad_rows(sol_rows)
        kl_GT, kl_mask = pad_rows(kl_rows)
        scores = rlt_rewards(sol_GS, sol_mask, kl_GT, kl_mask, kl_coef=s.rlt_kl_coef, alpha=s.rlt_alpha)
        parts = [{"correct": float(task.is_correct(self.problem, task.extract_answer(t.completion_text))), "r_ss": float(r_ss), "r_kl": float(r_kl)}
                 for t, r_ss, r_kl in zip(trajectories, scores.r_ss_G.tolist(), scores.r_kl_G.tolist())]
        return GroupScore([float(r) for r in scores.reward_G.tolist()], parts)


def predicting(logits_TV: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """The rows of a sequence's logits that predict its tokens start .. start+n−1 (row t predicts token t+1)."""
    return logits_TV[start - 1:start - 1 + n]


@dataclass(frozen=True)
class StudentRow:
    """The student's sequence for one explanation: question, explanation, ANSWER_MARK, solution (token ids),
    with where the explanation and the solution start."""

    ids: list[int]
    explanation_start: int
    solution_start: int
    solution: list[int]


def student_row(tokenizer, question: str, explanation_ids: list[int], solution: str, chat_template: bool) -> StudentRow:
    """The student's row: the question rendered as the student's prompt, the teacher's explanation tokens
    as sampled (never re-tokenized), the answer mark and the solution's tokens."""
    prompt = render_prompt(tokenizer, question, chat_template)
    mark = list(tokenizer(ANSWER_MARK, add_special_tokens=False)["input_ids"])
    answer = list(tokenizer(solution, add_special_tokens=False)["input_ids"])
    if not answer:
        raise TaskError(f"the solution {solution!r} has no tokens: RLT scores the student on the solution's tokens")
    ids = [*prompt, *explanation_ids, *mark, *answer]
    return StudentRow(ids, len(prompt), len(prompt) + len(explanation_ids) + len(mark), answer)


def teacher_tokens(trajectory, eos_id: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(the teacher's prompt ids, its explanation ids as sampled, without the closing EOS) of a single-turn episode."""
    prompt, gen = trajectory.segments[0], trajectory.segments[1] if len(trajectory.segments) > 1 else None
    ids = tuple(gen.token_ids) if gen is not None else ()
    if ids and ids[-1] == eos_id:
        ids = ids[:-1]
    return tuple(prompt.token_ids), ids


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> None:
    """The KL compares the two models token by token: they must share one vocabulary."""
    if teacher_tokenizer is student_tokenizer or teacher_tokenizer is None:
        return
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise TaskError("RLT's teacher and student use different vocabularies; the KL term compares them token by token: give both roles the same tokenizer (model.path or the tiny model)")


async def teacher_forward(resources, rows: list[list[int]]) -> list[torch.Tensor]:
    """The teacher's next-token logits over each row: [T, V] each. From `resources.models["teacher"]`
    (a FrozenModel) when the worker holds one, else one forward of the worker's own engine model."""
    if "teacher" in resources.models:
        return list(await asyncio.gather(*(resources.models["teacher"].logits(r) for r in rows)))
    core = getattr(resources.generator, "core", None)
    if core is None:
        raise RuntimeError("RLT reads the teacher's token distributions, and this worker's generator is no local engine: give the worker the teacher as models['teacher'] (a FrozenSource)")
    pad = getattr(resources.tokenizer, "pad_token_id", None) or 0
    return forward_logits(core.model, rows, pad)


@torch.no_grad()
def forward_logits(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int = 0) -> list[torch.Tensor]:
    """One forward of right-padded rows (causal: padding after a row cannot change its logits): each row's [T, V] float32 logits."""
    param = next(model.parameters())
    T = max(len(r) for r in rows)
    ids_BT = torch.full((len(rows), T), pad_id, dtype=torch.long, device=param.device)
    mask_BT = torch.zeros((len(rows), T), dtype=torch.long, device=param.device)
    for b, row in enumerate(rows):
        ids_BT[b, :len(row)] = torch.tensor(list(row), device=param.device)
        mask_BT[b, :len(row)] = 1
    was_training = model.training
    model.eval()
    try:
        with compute_precision(param.device, param.dtype):
            logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
    finally:
        model.train(was_training)
    return [logits_BTV[b, :len(row)].cpu() for b, row in enumerate(rows)]


class StudentTask(Task):
    """The inner task as a student answers it: after an explanation (`explain` given: the completion is
    `explained_completion(explain(problem), answer)`, and the answer is read after ANSWER_MARK), or bare
    (`explain` None: the inner task's own format). With `sft_set`, the warm-start cycles through those
    problems (the distillation set) instead of the inner task's warm-start problems."""

    stop: tuple[str, ...] = ()

    def __init__(self, inner: Task, explain: Callable[[Problem], str] | Mapping[str, str] | None = None, sft_set: Sequence[Problem] | None = None) -> None:
        if sft_set is not None and not sft_set:
            raise TaskError("StudentTask got an empty sft_set; pass at least one problem (selfplay.rlt_distill_problems >= 1)")
        self.inner, self.sft_set = inner, tuple(sft_set) if sft_set is not None else None
        if isinstance(explain, Mapping):
            table = dict(explain)
            explain = lambda p: table[p.id]  # noqa: E731  (the teacher's explanations by problem id)
        self.explain = explain
        self.name = f"{inner.name}_explained" if explain is not None else inner.name
        self.stop = inner.stop

    def render_prompt(self, problem: Problem) -> str:
        return self.inner.render_prompt(problem)

    def train_problem(self, index: int) -> Problem:
        return self.inner.train_problem(index)

    def eval_problems(self) -> Sequence[Problem]:
        return self.inner.eval_problems()

    def sft_problem(self, index: int) -> Problem:
        return self.sft_set[index % len(self.sft_set)] if self.sft_set is not None else self.inner.sft_problem(index)

    def sft_completion(self, problem: Problem) -> str:
        if self.explain is None:
            return self.inner.sft_completion(problem)
        return explained_completion(self.explain(problem), problem.answer)

    def extract_answer(self, completion: str) -> str | None:
        if self.explain is None:
            return self.inner.extract_answer(completion)
        if ANSWER_MARK not in completion:
            return None
        return self.inner.extract_answer(completion.rsplit(ANSWER_MARK, 1)[1])

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        return self.inner.is_correct(problem, answer)

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        check_batch(problems, completions)
        ok = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(x) for x in ok], correct=ok)

    def limit_prompts(self, fit: Any) -> None:
        self.inner.limit_prompts(fit)
