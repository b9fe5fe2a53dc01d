"""R-Zero's challenger (Huang et al., arXiv 2508.05004): a policy that writes problems of a task,
rewarded for problems at the edge of a frozen solver's ability.

For each problem the challenger writes, the frozen solver answers it m times (`selfplay.votes`);
the most common answer is the pseudo-label and p̂ the share of the m answers that agree with it
(`vote`). The challenger's reward, as the paper defines it, is

    r = 0                                  if the text is not a well-formed problem of the task
                                           (`Task.read_problem`: the format gate), else
    r = max(0, r_uncertainty − r_rep),     r_uncertainty = 1 − 2·|p̂ − ½|,
                                           r_rep = λ·|C| / n,

where C is the problem's cluster among the n well-formed problems of its GRPO group: problems
closer than τ (`selfplay.repetition_distance`) in d = 1 − BLEU/100 (sacrebleu sentence BLEU, the
symmetric mean of both directions) are linked, and clusters are the linked components. The paper
clusters the problems of a batch; a group here holds G problems written for one prompt, so it is
a random part of the batch (every group's prompt is the same).

No reference answer is read anywhere here: the pseudo-label is the solver's own majority.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import sacrebleu

from policyflow.agent.env import EnvGroupBuilder, GroupScore, SingleTurnGroupBuilder
from policyflow.engine import SamplingParams
from policyflow.problems import Problem, Score
from policyflow.tasks.base import Task, TaskError
from policyflow.tokens import task_prompt_ids

CHALLENGE_PROMPT = "Write a problem:"  # what the challenger is prompted with (a tiny char-level model reads it too)


@dataclass(frozen=True)
class Vote:
    """The frozen solver's m answers to one problem: their majority (the pseudo-label; None when no
    answer had an answer in it) and p̂, the share of the m answers equal to it."""

    label: str | None
    p_hat: float
    answers: tuple[str | None, ...]


def majority(answers: Sequence[str | None]) -> Vote:
    """The most common answer among those that are answers (ties: the one given first), and its share of all m."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return Vote(None, 0.0, tuple(answers))
    best = max(counts.values())
    label = next(a for a in answers if a is not None and counts[a] == best)
    return Vote(label, best / len(answers), tuple(answers))


def uncertainty_reward(p_hat: float) -> float:
    """1 − 2·|p̂ − ½|: 1 when half the solver's answers agree, 0 when all or none do."""
    return 1.0 - 2.0 * abs(p_hat - 0.5)


def bleu_distance(a: str, b: str) -> float:
    """1 − BLEU/100, BLEU the mean of sacrebleu's sentence BLEU in both directions (it is not symmetric)."""
    score = (sacrebleu.sentence_bleu(a, [b]).score + sacrebleu.sentence_bleu(b, [a]).score) / 2
    return 1.0 - score / 100.0


def repetition_penalties(texts: Sequence[str], distance: float, weight: float) -> list[float]:
    """λ·|C|/n for each text, C its cluster: texts closer than `distance` (`bleu_distance`) are
    linked and a cluster is a linked component (single linkage, by union-find)."""
    n = len(texts)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if texts[i] == texts[j] or bleu_distance(texts[i], texts[j]) < distance:
                parent[root(i)] = root(j)
    sizes = Counter(root(i) for i in range(n))
    return [weight * sizes[root(i)] / n for i in range(n)]


def solver_params(solver) -> SamplingParams:
    """How the frozen solver answers: its policy's sampling settings (`FrozenModel.spec`)."""
    s = solver.spec.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop=tuple(s.stop))


async def vote(solver, task: Task, problems: Sequence[Problem], m: int, seed: int) -> list[Vote]:
    """The frozen `solver`'s m answers to each problem of `task`, all requests in flight at once (its
    engine batches them), each seeded by (seed, problem, j) so a vote does not depend on the batch."""
    params = solver_params(solver)
    stop = tuple(params.stop) + tuple(task.stop)

    async def answers(problem: Problem) -> Vote:
        ids = task_prompt_ids(solver.tokenizer, task, problem, solver.spec.model.chat_template)
        samples = await asyncio.gather(*(
            solver.generate(ids, replace(params, stop=stop, seed=_seed(seed, problem.prompt, j)))
            for j in range(m)
        ))
        return majority([task.extract_answer(s.text) for s in samples])

    return list(await asyncio.gather(*(answers(p) for p in problems)))


def _seed(seed: int, prompt: str, j: int) -> int:
    """A 63-bit seed from (seed, prompt, j), the same in every process (no Python hash randomisation)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{prompt}/{j}".encode(), digest_size=8).digest(), "big") >> 1


class ChallengerTask(Task):
    """The job "challenge" of a task (`selfplay.jobs`): write problems of `inner`.

    Every training problem is the one prompt `CHALLENGE_PROMPT`; a completion is a problem's text.
    The warm-start demonstrates the format with the prompts of the inner task's training problems
    (never their answers). "Correct" means well-formed (the format gate), which is what the SFT
    stopping check and the challenger's accuracy measure. Rewards come from the frozen solver in
    `resources.models["solver"]` (`ChallengerGroup`)."""

    name = "rzero_challenger"

    def __init__(self, inner: Task, spec) -> None:
        if type(inner).read_problem is Task.read_problem:
            raise TaskError(f"task {inner.name!r} cannot be R-Zero's: it reads no problem a model writes (define {type(inner).__name__}.read_problem, as arithmetic does)")
        self.inner, self.settings, self.seed = inner, spec.selfplay, spec.seed
        self.stop = ()

    def train_problem(self, index: int) -> Problem:
        return Problem(id=f"challenge:{index}", prompt=CHALLENGE_PROMPT, answer="")

    def eval_problems(self) -> Sequence[Problem]:
        return tuple(Problem(id=f"challenge:eval:{i}", prompt=CHALLENGE_PROMPT, answer="") for i in range(8))

    def sft_problem(self, index: int) -> Problem:
        """The prompt, and as its demonstration the prompt of the inner task's index-th warm-start problem."""
        return Problem(id=f"challenge:sft:{index}", prompt=CHALLENGE_PROMPT, answer=self.inner.sft_problem(index).prompt)

    def extract_answer(self, completion: str) -> str | None:
        return completion.strip() or None

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        return answer is not None and self.inner.read_problem(answer) is not None

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """Well-formedness only (evaluation); the training reward needs the solver: `ChallengerGroup`."""
        ok = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(x) for x in ok], correct=ok)

    def group_builder(self, problem: Problem) -> EnvGroupBuilder:
        """In a rollout worker: `ChallengerGroup`, rewarded by the frozen solver. Outside one (the
        trainer's evaluation, the warm-start's stopping check): scored by well-formedness (`score`)."""
        if self.resources is None:
            return super().group_builder(problem)
        if "solver" not in self.resources.models:
            raise RuntimeError("the challenger's rewards need the frozen solver: run it through the R-Zero driver (selfplay.method=rzero)")
        return ChallengerGroup(self, problem)


class ChallengerGroup(SingleTurnGroupBuilder):
    """G problems written for one prompt, rewarded together (the repetition penalty compares them)."""

    async def score_group(self, trajectories) -> GroupScore:
        task, s = self.task, self.task.settings
        written = [task.inner.read_problem(t.completion_text.strip()) for t in trajectories]
        valid = [i for i, p in enumerate(written) if p is not None]
        votes = await vote(task.resources.models["solver"], task.inner, [written[i] for i in valid], s.votes, task.seed)
        penalties = repetition_penalties([written[i].prompt for i in valid], s.repetition_distance, s.repetition_weight)
        rewards, parts = [0.0] * len(trajectories), [{"correct": 0.0, "valid": 0.0} for _ in trajectories]
        for i, v, rep in zip(valid, votes, penalties):
            unc = uncertainty_reward(v.p_hat)
            rewards[i] = max(0.0, unc - rep)
            parts[i] = {"correct": 1.0, "valid": 1.0, "uncertainty": unc, "repetition": rep, "p_hat": v.p_hat}
        return GroupScore(rewards, parts)
