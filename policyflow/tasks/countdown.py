"""Countdown: reach a target by combining the given numbers with + - * / and parentheses.

Prompt `"3,5,7->22:"` (numbers, then the target), SFT completion a valid expression such as
`"3*5+7"`. Every problem is generated from a random expression over its numbers, so a solution
always exists.

Answers are checked by a small recursive-descent parser, never `eval`:

- integers written with ASCII digits 0-9 only (unicode digits such as `"３"` are rejected);
- binary `+ - * /` (the aliases `− × ÷` are accepted), parentheses, spaces;
- no unary minus or plus (`"-3+5"` is invalid: the classic game has no negation), no powers,
  no decimals (`"2.5"`), no other characters;
- exact rational arithmetic with `fractions.Fraction`: `7/2*2` equals 7; intermediate fractions
  and negatives are allowed (`5-7+4` is 2), division by zero makes the expression invalid;
- at most `max_expression_chars` characters, parentheses nested at most `MAX_DEPTH` deep, and
  number literals at most `MAX_LITERAL_DIGITS` digits, so no input can exhaust time, memory or
  the Python stack;
- every literal must be one of the given numbers, each given number used at most once (a number
  listed twice may be used twice); with `require_all_numbers=True` (the default, the classic
  TinyZero rule) each given number must be used exactly once.

`extract_answer` reads the completion's first line and cuts it at `=`, so `"3*5+7=22"` counts.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from policyflow.tasks.base import Problem, Score, Task, TaskError, check_batch, sample_distinct, sample_excluding, seeded_rng

MAX_DEPTH = 16
MAX_LITERAL_DIGITS = 9
_OPERATORS = {"+": "+", "-": "-", "*": "*", "/": "/", "−": "-", "×": "*", "÷": "/"}
_SPACES = frozenset(" \t\r\n")
_DIGITS = frozenset("0123456789")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


class ExpressionError(ValueError):
    """An answer expression that is malformed, breaks a rule, or divides by zero."""


@dataclass(frozen=True)
class Token:
    """One lexical unit: a number (`value` set), an operator, or a parenthesis."""

    text: str
    value: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """The verdict on one expression: its exact value, or why it is invalid."""

    value: Fraction | None
    error: str | None

    @property
    def valid(self) -> bool:
        return self.error is None


def tokenize(text: str, max_chars: int) -> list[Token]:
    """Split an expression into tokens; raise ExpressionError on anything outside the grammar."""
    if len(text) > max_chars:
        raise ExpressionError(f"expression longer than {max_chars} characters")
    tokens: list[Token] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in _SPACES:
            i += 1
        elif char in _DIGITS:
            start = i
            while i < len(text) and text[i] in _DIGITS:
                i += 1
            if i - start > MAX_LITERAL_DIGITS:
                raise ExpressionError(f"number longer than {MAX_LITERAL_DIGITS} digits")
            tokens.append(Token(text[start:i], int(text[start:i])))
        elif char in _OPERATORS or char in "()":
            tokens.append(Token(_OPERATORS.get(char, char)))
            i += 1
        else:
            raise ExpressionError(f"unexpected character {char!r} at position {i}")
    if not tokens:
        raise ExpressionError("empty expression")
    return tokens


def check_numbers(literals: Sequence[int], numbers: Sequence[int], require_all: bool) -> None:
    """Raise ExpressionError unless the literals use the given numbers by the rules above."""
    available = Counter(numbers)
    for number, times in Counter(literals).items():
        if available[number] == 0:
            raise ExpressionError(f"{number} is not one of the given numbers {list(numbers)}")
        if times > available[number]:
            raise ExpressionError(f"{number} used {times} times but given {available[number]} times")
    if require_all and Counter(literals) != available:
        missing = sorted((available - Counter(literals)).elements())
        raise ExpressionError(f"every given number must be used exactly once; unused: {missing}")


class _Parser:
    """Recursive descent over `expr := term (('+'|'-') term)*`, `term := factor (('*'|'/') factor)*`,
    `factor := NUMBER | '(' expr ')'`, evaluating as it goes."""

    def __init__(self, tokens: list[Token]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos].text if self.pos < len(self.tokens) else None

    def parse(self) -> Fraction:
        value = self._expression()
        if self.pos != len(self.tokens):
            raise ExpressionError(f"unexpected {self._peek()!r} after a complete expression")
        return value

    def _expression(self) -> Fraction:
        value = self._term()
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos].text
            self.pos += 1
            right = self._term()
            value = value + right if op == "+" else value - right
        return value

    def _term(self) -> Fraction:
        value = self._factor()
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos].text
            self.pos += 1
            right = self._factor()
            if op == "/" and right == 0:
                raise ExpressionError("division by zero")
            value = value * right if op == "*" else value / right
        return value

    def _factor(self) -> Fraction:
        token = self.tokens[self.pos] if self.pos < len(self.tokens) else None
        if token is None:
            raise ExpressionError("expression ends where a number or '(' was expected")
        self.pos += 1
        if token.value is not None:
            return Fraction(token.value)
        if token.text == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError(f"parentheses nested deeper than {MAX_DEPTH}")
            value = self._expression()
            if self._peek() != ")":
                raise ExpressionError("missing ')'")
            self.pos += 1
            self.depth -= 1
            return value
        if token.text in ("-", "+"):
            raise ExpressionError("unary plus/minus is not allowed")
        raise ExpressionError(f"expected a number or '(' but found {token.text!r}")


def check_expression(text: str, numbers: Sequence[int], *, require_all: bool = True, max_chars: int = 64) -> Evaluation:
    """Judge an answer expression against the given numbers. Never raises for any input string.

    The literals are checked before anything is evaluated, so values stay small.
    """
    try:
        tokens = tokenize(text, max_chars)
        check_numbers([t.value for t in tokens if t.value is not None], numbers, require_all)
        return Evaluation(_Parser(tokens).parse(), None)
    except ExpressionError as err:
        return Evaluation(None, str(err))


# A generated expression tree: a number, or (operator, left, right).
Node = int | tuple[str, "Node", "Node"]


def _random_tree(numbers: Sequence[int], rng: random.Random) -> Node:
    """A random binary expression using each of `numbers` once, in the given order."""
    if len(numbers) == 1:
        return numbers[0]
    split = rng.randint(1, len(numbers) - 1)
    return (rng.choice("+-*/"), _random_tree(numbers[:split], rng), _random_tree(numbers[split:], rng))


def tree_value(node: Node) -> Fraction:
    """Exact value of a tree; raises ZeroDivisionError on division by zero."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a, b = tree_value(left), tree_value(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b if op == "*" else a / b


def render_tree(node: Node) -> str:
    """The tree as text with only the parentheses precedence requires: `(3+5)*7`, `3+5*7`."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    return _render_child(left, op, is_right=False) + op + _render_child(right, op, is_right=True)


def _render_child(child: Node, parent_op: str, is_right: bool) -> str:
    text = render_tree(child)
    if isinstance(child, int):
        return text
    child_prec, parent_prec = _PRECEDENCE[child[0]], _PRECEDENCE[parent_op]
    needs = child_prec < parent_prec or (is_right and child_prec == parent_prec and parent_op in "-/")
    return f"({text})" if needs else text


@dataclass(frozen=True)
class CountdownInstance:
    """Numbers in prompt order, the target, and one reference solution."""

    numbers: tuple[int, ...]
    target: int
    solution: str


def _instance_key(instance: CountdownInstance) -> tuple[tuple[int, ...], int]:
    """Canonical key: the multiset of numbers and the target (prompt order does not matter)."""
    return (tuple(sorted(instance.numbers)), instance.target)


class CountdownTask(Task):
    """Countdown problems with `num_numbers` numbers in [1, max_number] and a target in [1, max_target]."""

    name = "countdown"
    stop: tuple[str, ...] = ()

    def __init__(
        self,
        seed: int = 0,
        num_numbers: int = 3,
        max_number: int = 20,
        max_target: int = 100,
        num_eval: int = 200,
        require_all_numbers: bool = True,
        format_reward: float = 0.0,
        max_expression_chars: int = 64,
    ):
        if num_numbers < 2 or max_number < 1 or max_target < 1 or num_eval < 1 or max_expression_chars < 1:
            raise TaskError(
                "countdown needs num_numbers >= 2 and max_number, max_target, num_eval, max_expression_chars >= 1; "
                f"got num_numbers={num_numbers}, max_number={max_number}, max_target={max_target}, "
                f"num_eval={num_eval}, max_expression_chars={max_expression_chars}"
            )
        if not 0.0 <= format_reward < 1.0:
            raise TaskError(f"countdown format_reward must be in [0, 1) so a correct answer earns more; got {format_reward}")
        if max_number >= 10**MAX_LITERAL_DIGITS:
            raise TaskError(f"task.max_number={max_number} gives numbers an answer cannot write (countdown reads numbers of at most {MAX_LITERAL_DIGITS} digits); lower task.max_number")
        if 2 * num_numbers - 1 > max_expression_chars:
            raise TaskError(f"task.num_numbers={num_numbers} numbers need an expression of at least {2 * num_numbers - 1} characters, more than the {max_expression_chars} an answer may have; lower task.num_numbers")
        problems = math.comb(max_number + num_numbers - 1, num_numbers) * max_target  # number multisets × targets: an upper bound
        if num_eval > problems:
            raise TaskError(f"task.num_eval={num_eval} is more than the at most {problems} distinct countdown problems task.num_numbers={num_numbers}, task.max_number={max_number} and task.max_target={max_target} allow; lower task.num_eval")
        self.seed = seed
        self.num_numbers = num_numbers
        self.max_number = max_number
        self.max_target = max_target
        self.require_all_numbers = require_all_numbers
        self.format_reward = format_reward
        self.max_expression_chars = max_expression_chars
        instances = sample_distinct(self._draw, _instance_key, num_eval, seeded_rng(seed, "countdown", "eval"), "countdown problems")
        self._held_out_keys = frozenset(_instance_key(x) for x in instances)
        self._eval = tuple(self._problem(x, f"countdown:eval:{j}") for j, x in enumerate(instances))

    def _draw(self, rng: random.Random) -> CountdownInstance:
        """Random numbers and a random expression over them whose value is a valid target."""
        for _ in range(10_000):
            numbers = tuple(rng.randint(1, self.max_number) for _ in range(self.num_numbers))
            tree = _random_tree(rng.sample(numbers, len(numbers)), rng)
            try:
                value = tree_value(tree)
            except ZeroDivisionError:
                continue
            solution = render_tree(tree)
            if value.denominator == 1 and 1 <= value <= self.max_target and len(solution) <= self.max_expression_chars:
                return CountdownInstance(numbers, int(value), solution)
        raise TaskError(
            f"could not generate a countdown problem with task.num_numbers={self.num_numbers}, task.max_number={self.max_number} and "
            f"task.max_target={self.max_target} whose solution fits {self.max_expression_chars} characters; lower task.num_numbers or task.max_number, or raise task.max_target"
        )

    @staticmethod
    def _problem(instance: CountdownInstance, problem_id: str) -> Problem:
        prompt = ",".join(map(str, instance.numbers)) + f"->{instance.target}:"
        columns = {"numbers": instance.numbers, "target": instance.target}
        return Problem(id=problem_id, prompt=prompt, answer=instance.solution, columns=columns)

    def train_problem(self, index: int) -> Problem:
        """Deterministic in (seed, index); never a held-out (numbers, target) pair."""
        if index < 0:
            raise IndexError(f"train_problem index must be >= 0, got {index}")
        rng = seeded_rng(self.seed, "countdown", "train", index)
        instance = sample_excluding(self._draw, _instance_key, self._held_out_keys, rng, "countdown problem")
        return self._problem(instance, f"countdown:train:{index}")

    def eval_problems(self) -> Sequence[Problem]:
        return self._eval

    def is_held_out(self, problem: Problem) -> bool:
        """Whether a problem's numbers (as a multiset) and target belong to the held-out set."""
        return (tuple(sorted(problem.columns["numbers"])), problem.columns["target"]) in self._held_out_keys

    def extract_answer(self, completion: str) -> str | None:
        """The completion's first line, cut at `=` and stripped; None if nothing is left."""
        text = completion.split("\n", 1)[0].split("=", 1)[0].strip()
        return text or None

    def evaluate(self, problem: Problem, completion: str) -> Evaluation:
        """The parser's verdict on a completion for a problem."""
        return self._verdict(problem, self.extract_answer(completion))

    def _verdict(self, problem: Problem, answer: str | None) -> Evaluation:
        return check_expression(answer or "", problem.columns["numbers"], require_all=self.require_all_numbers, max_chars=self.max_expression_chars)

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        """A valid expression (module docstring) over the problem's numbers whose value is the target."""
        verdict = self._verdict(problem, answer)
        return verdict.valid and verdict.value == problem.columns["target"]

    def trivial_problems(self) -> Sequence[Problem]:
        """The numbers (k, 1, ..., 1) with their sum as target (`1,1,1->3:`), for k = 1..6 where
        they fit task.max_number and task.max_target: one addition of every number."""
        ones = (1,) * (self.num_numbers - 1)
        fits = [k for k in range(1, 7) if k <= self.max_number and k + len(ones) <= self.max_target]
        instances = [CountdownInstance((k, *ones), k + len(ones), "+".join(map(str, (k, *ones)))) for k in fits]
        return tuple(self._problem(x, f"countdown:trivial:{j}") for j, x in enumerate(instances))

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """1.0 for a valid expression equal to the target; `format_reward` for a valid one that misses."""
        check_batch(problems, completions)
        verdicts = [self.evaluate(p, c) for p, c in zip(problems, completions)]
        correct = [v.valid and v.value == p.columns["target"] for p, v in zip(problems, verdicts)]  # is_correct on the extracted answers
        rewards = [1.0 if ok else (self.format_reward if v.valid else 0.0) for ok, v in zip(correct, verdicts)]
        return Score(rewards=rewards, correct=correct, parts={"format": [float(v.valid) for v in verdicts]})
