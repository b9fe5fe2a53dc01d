"""Integer addition with 1-3 digit operands: the default task, sized for a tiny char-level model.

Prompt `"12+345="`, SFT completion `"357"` (the trainer appends EOS), reward 1.0 for the exact
sum. Problems are seeded; the held-out set is a fixed seeded sample and training problems are
drawn until their key is not held out. The key is the *unordered* pair of operands, so neither
`12+345` nor `345+12` is trained on when either is held out (commutativity would leak otherwise).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from policyflow.tasks.base import Problem, Score, Task, TaskError, check_batch, sample_distinct, sample_excluding, seeded_rng

_LEADING_INTEGER = re.compile(r"-?[0-9]+")
_WRITTEN = re.compile(r"([0-9]{1,9})\+([0-9]{1,9})=")  # a problem as a model writes it (`read_problem`)
Operands = tuple[int, int]
# The trivial set (`Task.trivial_problems`): sums a model should answer at once.
TRIVIAL_SUMS: tuple[Operands, ...] = ((1, 1), (2, 2), (1, 2), (3, 1), (0, 0), (2, 5), (4, 4), (0, 7), (5, 3), (6, 1))


def _digit_range(digits: int) -> range:
    """Numbers with exactly `digits` decimal digits; 1 digit includes 0."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return range(low, 10**digits)


def _operand_key(pair: Operands) -> Operands:
    """The canonical key of an addition problem: the unordered operand pair."""
    return (min(pair), max(pair))


def column_trace(a: int, b: int) -> str:
    """Column addition of a+b from the units up, one `x+y[+1]=s` per column (the `+1` a carry), comma-separated."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        digits = [int(d[i]) for d in (da, db) if i < len(d)] + [1] * carry
        total = sum(digits)
        steps.append("+".join(map(str, digits)) + f"={total}")
        carry = total // 10
    return ",".join(steps)


class ArithmeticTask(Task):
    """`a+b=` with each operand's digit count uniform in [min_digits, max_digits]."""

    name = "arithmetic"
    stop: tuple[str, ...] = ()

    def __init__(self, seed: int = 0, min_digits: int = 1, max_digits: int = 3, num_eval: int = 200):
        if not 1 <= min_digits <= max_digits <= 9:
            raise TaskError(f"arithmetic needs 1 <= min_digits <= max_digits <= 9, got min_digits={min_digits}, max_digits={max_digits}")
        if num_eval < 1:
            raise TaskError(f"arithmetic needs num_eval >= 1, got {num_eval}")
        self.seed = seed
        self.min_digits = min_digits
        self.max_digits = max_digits
        operands = sum(len(_digit_range(d)) for d in range(min_digits, max_digits + 1))
        keys = operands * (operands + 1) // 2
        if num_eval > keys // 2:
            raise TaskError(
                f"task.num_eval={num_eval} would hold out more than half of the {keys} distinct problems with "
                f"{min_digits}-{max_digits} digit operands; lower task.num_eval to at most {keys // 2} or raise task.max_digits"
            )
        pairs = sample_distinct(self._draw, _operand_key, num_eval, seeded_rng(seed, "arithmetic", "eval"), "sums")
        self._held_out_keys = frozenset(_operand_key(p) for p in pairs)
        self._eval = tuple(self._problem(p, f"arithmetic:eval:{j}") for j, p in enumerate(pairs))

    def _draw(self, rng: random.Random) -> Operands:
        """Two operands, each with a uniformly chosen digit count."""
        a = rng.choice(_digit_range(rng.randint(self.min_digits, self.max_digits)))
        b = rng.choice(_digit_range(rng.randint(self.min_digits, self.max_digits)))
        return (a, b)

    @staticmethod
    def _problem(pair: Operands, problem_id: str) -> Problem:
        a, b = pair
        return Problem(id=problem_id, prompt=f"{a}+{b}=", answer=str(a + b), columns={"a": a, "b": b})

    def train_problem(self, index: int) -> Problem:
        """Deterministic in (seed, index); never a held-out operand pair in either order."""
        if index < 0:
            raise IndexError(f"train_problem index must be >= 0, got {index}")
        rng = seeded_rng(self.seed, "arithmetic", "train", index)
        pair = sample_excluding(self._draw, _operand_key, self._held_out_keys, rng, "sum")
        return self._problem(pair, f"arithmetic:train:{index}")

    def eval_problems(self) -> Sequence[Problem]:
        return self._eval

    def is_held_out(self, problem: Problem) -> bool:
        """Whether a problem's operand pair (in either order) belongs to the held-out set."""
        return _operand_key((problem.columns["a"], problem.columns["b"])) in self._held_out_keys

    def read_problem(self, text: str) -> Problem | None:
        """`a+b=` as written by a model: operands in digits, without leading zeros, of min..max digits,
        and not a held-out pair in either order (those are never trained on); else None."""
        match = _WRITTEN.fullmatch(text.strip())
        if match is None:
            return None
        a, b = match.group(1), match.group(2)
        allowed = range(self.min_digits, self.max_digits + 1)
        if any(len(x) not in allowed or (len(x) > 1 and x[0] == "0") for x in (a, b)):
            return None
        if _operand_key((int(a), int(b))) in self._held_out_keys:
            return None
        return Problem(id=f"arithmetic:written:{a}+{b}", prompt=f"{a}+{b}=", answer="")

    def true_answer(self, problem: Problem) -> str | None:
        """The sum a written prompt `a+b=` asks for (R-Zero measures its pseudo-labels against it)."""
        match = _WRITTEN.fullmatch(problem.prompt)
        return str(int(match.group(1)) + int(match.group(2))) if match else None

    def explanation(self, problem: Problem) -> str | None:
        """The column additions from the units up, carry included: `47+85=` -> `"7+5=12,4+8+1=13"`
        (`7+85=` -> `"7+5=12,8+1=9"`: a column with one digit adds only it). The sum is the last
        column's result followed by the other columns' last digits, right to left (132)."""
        return column_trace(problem.columns["a"], problem.columns["b"])

    def extract_answer(self, completion: str) -> str | None:
        """The leading integer after stripping whitespace (`" 357\\n"` -> `"357"`), or None."""
        match = _LEADING_INTEGER.match(completion.strip())
        return match.group() if match else None

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        """Exactly the sum as written (`"0357"` is wrong)."""
        return answer == problem.answer

    def trivial_problems(self) -> Sequence[Problem]:
        """One-digit sums, `1+1=` first (over-thinking: tokens spent where none are needed)."""
        return tuple(self._problem(pair, f"arithmetic:trivial:{j}") for j, pair in enumerate(TRIVIAL_SUMS))

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """Reward 1.0 iff the leading integer is exactly the sum as written (`"0357"` is wrong)."""
        check_batch(problems, completions)
        correct = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=[float(ok) for ok in correct], correct=correct)
