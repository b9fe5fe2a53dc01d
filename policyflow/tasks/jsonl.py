"""The user's own problems: a local JSON-lines file with a prompt and a reference answer per row.

Each non-blank line is a JSON object such as `{"prompt": "2+2=", "answer": "4", "topic": "math"}`
(column names are configurable). The file is read line by line, not through `datasets`, so that
each malformed row is reported as `file:line`: bad JSON or UTF-8; what JSON readers accept but
would change silently (a key given twice, NaN or Infinity, a float too large to be finite, an
integer of more digits than Python reads); a lone UTF-16 surrogate (`"\\ud800"`, not text); not
an object; a missing or non-string or empty prompt; a missing or null answer, one that is not a
string or number, an empty one under a built-in reward, or under `reward="numeric"` one that is
not a number. `on_bad_row="error"` raises on the first; `"skip"` logs each one and lists their
line numbers in `bad_rows` (`eval_bad_rows` for `eval_path`). Nothing is dropped silently. Blank
lines are not rows; a UTF-8 BOM and CRLF line ends are fine.

Rewards: `"code_tests"` (the completion's code, its last ```python block, else its last
`<code>` block, else the whole text, run in the sandbox against the row's hidden tests in a
`tests` column: a list of statements, one test each, e.g. `["assert add(1, 2) == 3"]`, or a test
source string whose top-level `assert`s are the tests; the reward is the fraction passed, and
`Score.correct` means all passed; the answer column is optional), `"exact"` (the final answer equals the reference, both stripped), `"numeric"` (the last
number in the final answer equals the reference number within a tolerance), or a user function
`"module:function"` called as TRL calls one, `fn(prompts=..., completions=..., **columns)`, where
the columns are every field of the rows except the prompt (so the answer column is among them;
a TRL dataset's `solution` column arrives as `solution`) as lists aligned with `prompts`; rows
lacking a field give None there. With `chat_template` (`model.chat_template=true`) a user
function gets TRL's conversational form (`reward_fn.conversational`: `[{"role": "user", ...}]`
per prompt, `[{"role": "assistant", "content": text}]` per completion), so
`trl.rewards:accuracy_reward` and `trl.rewards:think_format_reward` run unchanged; a None
reward scores 0.0 and is logged (`reward_fn`). The built-in rewards always read text. The
final answer is the content of the last `<answer>...</answer>` tag, else the whole completion.
`Score.correct` is the exact match, or the numeric match under `reward="numeric"`, whatever the
reward function says.

Held-out split: with `eval_path`, that file is the held-out set and training rows whose prompt
also appears there are dropped with a warning (listed in `overlapping_rows`). Otherwise distinct
prompts are split by `seed` with `eval_fraction` held out, so duplicates never straddle the split.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policyflow.tasks.base import Problem, Progress, Score, Task, TaskError, check_batch, seeded_rng
from policyflow.tasks.length import PromptFit
from policyflow.tasks.code_tests import CODE_TESTS, code_tests_result, split_tests
from policyflow.tasks.reward_fn import (
    BUILTIN_REWARDS,
    answer_to_text,
    call_reward_fn,
    check_reward_signature,
    conversational,
    exact_match,
    extract_final_answer,
    numeric_match,
    parse_number,
    resolve_reward_fn,
)

logger = logging.getLogger(__name__)

# Argument names of a reward function; row fields with these names are not passed as columns.
_RESERVED_COLUMNS = frozenset({"prompts", "completions"})
_EXAMPLE_ROW = '{"prompt": "2+2=", "answer": "4"}'
# A JSON escape of a UTF-16 surrogate (`\ud800`-`\udfff`): only rows holding one are checked for lone halves.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class _BadRow(Exception):
    """Why one line of the file is not a usable row."""


@dataclass(frozen=True)
class RowFormat:
    """How rows are read: which columns hold the prompt and answer, and the reward that reads the answer."""

    prompt_column: str
    answer_column: str
    reward: str = "exact"


@dataclass(frozen=True)
class LoadedRows:
    """The usable rows of one file and the line numbers of the malformed ones (skip mode)."""

    problems: list[Problem]
    bad_lines: list[int]


def _check_file(path: Path, role: str) -> None:
    if not path.exists():
        raise TaskError(f"jsonl task: {role} file {str(path)!r} not found; point task.path/eval_path at a local .jsonl file with one JSON object per line, e.g. {_EXAMPLE_ROW}")
    if not path.is_file():
        raise TaskError(f"jsonl task: {role} path {str(path)!r} is not a file; give the .jsonl file itself")


def _json_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise _BadRow(f"a number of {len(text)} characters is more than Python reads as an integer ({sys.get_int_max_str_digits()} digits); write it as a string") from None


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadRow(f"the number {text[:40]} is too large for a float (it would read as {value}); write it as a string")
    return value


def _json_constant(name: str) -> float:
    raise _BadRow(f"{name} is not JSON (JSON has no NaN or Infinity); write a number or a string")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        twice = next(key for key, n in Counter(key for key, _ in pairs).items() if n > 1)
        raise _BadRow(f"key {twice!r} is given twice (a JSON reader keeps only the last)")
    return obj


def _check_text(row: dict[str, Any]) -> None:
    """Raise _BadRow if a column holds a lone surrogate (`"\\ud800"`): JSON accepts one, but it is not text."""
    for key, value in row.items():
        try:
            json.dumps([key, value], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise _BadRow(f"column {key!r} holds a lone surrogate {err.object[err.start]!r} (half of a UTF-16 pair), which is not text") from None


def parse_row(raw: bytes, line_no: int, source: str, fmt: RowFormat) -> Problem:
    """One line as a Problem with id `"<file name>:<line>"`; raises _BadRow."""
    try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        row = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant, object_pairs_hook=_json_object)
    except UnicodeDecodeError as err:
        raise _BadRow(f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise _BadRow(f"invalid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise _BadRow("invalid JSON: nested too deeply") from None
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_text(row)
    if fmt.prompt_column not in row:
        raise _BadRow(f"missing the prompt column {fmt.prompt_column!r} (row has {sorted(row)})")
    prompt = row[fmt.prompt_column]
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRow(f"prompt column {fmt.prompt_column!r} must be a non-empty string, got {_clip(prompt)}")
    if fmt.reward == CODE_TESTS:  # scored by its hidden tests; an answer column (a reference solution) is optional
        if "tests" not in row:
            raise _BadRow(f"missing the tests column 'tests' that reward={CODE_TESTS!r} runs (row has {sorted(row)})")
        try:
            split_tests(row["tests"])
        except (ValueError, SyntaxError) as err:
            raise _BadRow(f"tests column: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        row.setdefault(fmt.answer_column, "")
    if fmt.answer_column not in row:
        raise _BadRow(f"missing the answer column {fmt.answer_column!r} (row has {sorted(row)})")
    answer = answer_to_text(row[fmt.answer_column])
    if answer is None:
        raise _BadRow(f"answer column {fmt.answer_column!r} must be a string or number, got {_json_type(row[fmt.answer_column])}")
    if fmt.reward in BUILTIN_REWARDS and not answer.strip():
        raise _BadRow(f"answer column {fmt.answer_column!r} is empty, so reward={fmt.reward!r} would reward an empty completion")
    if fmt.reward == "numeric" and parse_number(answer) is None:
        raise _BadRow(f"answer {_clip(answer)} is not a number (or one too large for a float), which reward='numeric' needs")
    columns = {k: v for k, v in row.items() if k != fmt.prompt_column}
    return Problem(id=f"{source}:{line_no}", prompt=prompt, answer=answer, columns=columns)


def _clip(value: Any) -> str:
    """A cell for a message: its repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..."


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "true/false", dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def read_rows(path: Path, fmt: RowFormat, on_bad_row: str, role: str) -> LoadedRows:
    """All rows of a file; a malformed row raises (`"error"`) or is logged and listed (`"skip"`)."""
    _check_file(path, role)
    problems: list[Problem] = []
    bad_lines: list[int] = []
    progress = Progress(f"reading the {role} rows of {path} (lines)")
    try:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                progress(line_no)
                if not raw.strip():
                    continue
                try:
                    problems.append(parse_row(raw, line_no, path.name, fmt))
                except _BadRow as err:
                    if on_bad_row == "error":
                        raise TaskError(f"{path}:{line_no}: {err}. Fix or remove this row, or set on_bad_row='skip' to skip malformed rows (each is logged)") from None
                    logger.warning("%s:%d: skipping malformed row: %s", path, line_no, err)
                    bad_lines.append(line_no)
    except OSError as err:
        raise TaskError(f"jsonl task: cannot read the {role} file {str(path)!r}: {err.strerror or err}") from None
    if bad_lines:
        logger.warning("%s: skipped %d malformed rows, at lines %s", path, len(bad_lines), bad_lines)
    if not problems:
        raise TaskError(f"jsonl task: {role} file {str(path)!r} has no usable rows; each line should be a JSON object like {_EXAMPLE_ROW}")
    return LoadedRows(problems, bad_lines)


def split_by_prompt(problems: Sequence[Problem], eval_fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out): a seeded sample of distinct prompts is held out, with all their rows."""
    prompts = list(dict.fromkeys(p.prompt for p in problems))
    if len(prompts) < 2:
        raise TaskError("jsonl task: need at least 2 distinct prompts to split off a held-out set; add rows or pass eval_path")
    count = min(len(prompts) - 1, max(1, round(eval_fraction * len(prompts))))
    held_out = set(seeded_rng(seed, "jsonl", "split").sample(prompts, count))
    return [p for p in problems if p.prompt not in held_out], [p for p in problems if p.prompt in held_out]


def aligned_columns(problems: Sequence[Problem]) -> dict[str, list[Any]]:
    """Every row field (in first-seen order) as a list aligned with `problems`; None where absent."""
    names = dict.fromkeys(k for p in problems for k in p.columns if k not in _RESERVED_COLUMNS)
    return {name: [p.columns.get(name) for p in problems] for name in names}


class JsonlTask(Task):
    """Problems from a local .jsonl file, scored by exact/numeric match or a user reward function."""

    name = "jsonl"
    stop: tuple[str, ...] = ()

    def __init__(
        self,
        path: str | Path,
        *,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        reward: str = "exact",
        eval_path: str | Path | None = None,
        eval_fraction: float = 0.1,
        seed: int = 0,
        on_bad_row: str = "error",
        reward_timeout_s: float = 10.0,
        code: dict[str, Any] | None = None,
        chat_template: bool = False,
    ):
        if on_bad_row not in ("error", "skip"):
            raise TaskError(f"jsonl task: on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise TaskError(f"jsonl task: eval_fraction must be in (0, 1), got {eval_fraction}")
        if reward_timeout_s <= 0:
            raise TaskError(f"jsonl task: reward_timeout_s must be > 0, got {reward_timeout_s}")
        self.path = Path(path)
        self.seed = seed
        self.reward = reward
        self.reward_timeout_s = reward_timeout_s
        self.chat_template = chat_template  # user reward functions get TRL's conversational form (module docstring)
        self.answer_column = answer_column
        self._reward_fn = resolve_reward_fn(reward, answer_column=answer_column)
        fmt = RowFormat(prompt_column, answer_column, reward)
        loaded = read_rows(self.path, fmt, on_bad_row, "training")
        self.bad_rows: list[int] = loaded.bad_lines
        self.eval_bad_rows: list[int] = []
        self.overlapping_rows: list[int] = []
        if eval_path is None:
            train, held_out = split_by_prompt(loaded.problems, eval_fraction, seed)
        else:
            eval_loaded = read_rows(Path(eval_path), fmt, on_bad_row, "held-out")
            self.eval_bad_rows = eval_loaded.bad_lines
            held_out = eval_loaded.problems
            train = self._drop_overlap(loaded.problems, held_out)
        self._train = tuple(train)
        self._eval = tuple(held_out)
        self.code = dict(code or {})  # reward=code_tests: the sandbox's settings (task.code: timeout_s, memory_mb, packages, isolation, concurrency)
        if reward not in BUILTIN_REWARDS and reward != CODE_TESTS:
            check_reward_signature(self._reward_fn, reward, aligned_columns(self._train + self._eval))
        self._order: tuple[int, list[int]] = (-1, [])

    def _drop_overlap(self, train: list[Problem], held_out: list[Problem]) -> list[Problem]:
        """Training rows whose prompt is not held out; the others are logged and listed."""
        held_prompts = {p.prompt for p in held_out}
        kept = [p for p in train if p.prompt not in held_prompts]
        self.overlapping_rows = [int(p.id.rsplit(":", 1)[1]) for p in train if p.prompt in held_prompts]
        if self.overlapping_rows:
            logger.warning("%s: dropped %d training rows whose prompt is also in the held-out file, at lines %s", self.path, len(self.overlapping_rows), self.overlapping_rows)
        if not kept:
            raise TaskError(f"jsonl task: every training prompt in {str(self.path)!r} is also in the held-out file; use different files")
        return kept

    def limit_prompts(self, fit: PromptFit) -> None:
        """Every row, training and held-out, fitted to the context (refused, left-truncated or dropped)."""
        train = fit.fit_all(self._train, self.render_prompt, f"{self.path} (training rows)")
        held_out = fit.fit_all(self._eval, self.render_prompt, "held-out rows")
        if not train or not held_out:
            raise TaskError(f"jsonl task: every {'training' if not train else 'held-out'} prompt is longer than {fit.limit} tokens; nothing is left to {'train' if not train else 'evaluate'} on")
        self._train, self._eval, self._order = tuple(train), tuple(held_out), (-1, [])

    def train_problem(self, index: int) -> Problem:
        """Row `index` of a seeded shuffle of the training rows; reshuffled every epoch."""
        if index < 0:
            raise IndexError(f"train_problem index must be >= 0, got {index}")
        epoch, offset = divmod(index, len(self._train))
        cached_epoch, order = self._order  # read once: safe if another thread swaps the cache
        if cached_epoch != epoch:
            order = list(range(len(self._train)))
            seeded_rng(self.seed, "jsonl", "epoch", epoch).shuffle(order)
            self._order = (epoch, order)
        return self._train[order[offset]]

    def eval_problems(self) -> Sequence[Problem]:
        return self._eval

    @property
    def num_train(self) -> int:
        return len(self._train)

    def extract_answer(self, completion: str) -> str | None:
        """The last `<answer>` tag's content, else the whole completion, stripped; None if empty."""
        return extract_final_answer(completion) or None

    def is_correct(self, problem: Problem, answer: str | None) -> bool:
        """The task's own check on an extracted answer (`Task.is_correct`): numeric match under
        reward='numeric', all hidden tests passed under reward='code_tests' (run in the sandbox; the
        code is read from the answer as from a completion), else exact match. The final-answer
        extraction is idempotent, so this equals the match on the whole completion."""
        if self.reward == CODE_TESTS:
            result = code_tests_result([answer or ""], [problem.columns["tests"]], prompts=[problem.prompt], **self.code)
            return result.rewards[0] == 1.0
        match = numeric_match if self.reward == "numeric" else exact_match
        return match(answer or "", problem.answer)

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score:
        """Rewards from the reward function (contained: failures score 0.0 and are counted)."""
        check_batch(problems, completions)
        if self.reward == CODE_TESTS:  # its own containment: each completion's sandbox has its own timeout
            result = code_tests_result(list(completions), [p.columns["tests"] for p in problems], prompts=[p.prompt for p in problems], **self.code)
            return Score(rewards=result.rewards, correct=[r == 1.0 for r in result.rewards], errors=result.errors)
        prompts, texts = [p.prompt for p in problems], list(completions)
        if self.chat_template and self.reward not in BUILTIN_REWARDS:
            prompts, texts = conversational(prompts, texts)
        result = call_reward_fn(
            self._reward_fn,
            prompts,
            texts,
            aligned_columns(problems),
            timeout_s=self.reward_timeout_s,
            name=self.reward,
        )
        correct = [self.is_correct(p, self.extract_answer(c)) for p, c in zip(problems, completions)]
        return Score(rewards=result.rewards, correct=correct, errors=result.errors)
