"""Reward functions: the built-in `exact` and `numeric` matches, user functions, and their containment.

A reward function is called as TRL's GRPOTrainer calls one, by keyword::

    fn(prompts=prompts, completions=completions, **columns) -> list[float | None]

where each column is a list aligned with `prompts`. Users name theirs by import path,
`"my_rewards:length_bonus"`; the module must be importable (installed, or on PYTHONPATH; the
`policyflow` command does not add the current folder to `sys.path`).

Prompts and completions are strings for plain models. A chat model's task passes TRL's
conversational form instead (`conversational`): each prompt the chat it was rendered from,
`[{"role": "user", "content": text}]`, and each completion `[{"role": "assistant", "content":
text}]`, so TRL's own functions (`trl.rewards:accuracy_reward`, `trl.rewards:think_format_reward`)
run unchanged. TRL's trainer-only keywords (`completion_ids`, `trainer_state`, `log_extra`,
`log_metric`) are not passed: a function that requires one is refused when the task is built.

A reward of None is TRL's "this sample cannot be scored" (`accuracy_reward` returns it when the
reference answer does not parse). It scores 0.0, as in TRL (which sums rewards ignoring NaN), is
not counted as an error, and each call that returned any None logs one warning with their count.

`call_reward_fn` runs a function so that one bad sample cannot stop training:

1. the whole batch is called once in a worker thread, waited for at most `timeout_s`;
2. if it raises or returns the wrong number of values, each sample is called alone (sharing one
   more `timeout_s` budget) to find the failing ones;
3. a sample whose call raised, timed out, or produced a value that is neither a finite real number
   nor None gets reward 0.0, is logged (prompt and completion truncated) and is counted in `errors`.

A batch that times out counts every sample as an error and is not retried one by one (that
could take batch size x timeout). A hung call cannot be killed in-process: Python has no way to
stop a thread. Its daemon thread keeps running (and holding whatever it holds) until the call
returns or the process exits; it never blocks exit. Run untrusted or slow graders in a separate
service if that matters.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import numbers
import re
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policyflow.tasks.base import TaskError, last_tagged

logger = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float | None]]
Message = dict[str, str]
BUILTIN_REWARDS = ("exact", "numeric")
NUMERIC_REL_TOL = 1e-6
NUMERIC_ABS_TOL = 1e-6
_CLIP_CHARS = 200
_LOGGED_FAILURES = 5
_NUMBER = r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?(?:/[0-9]+)?"
_NUMBER_RE = re.compile(_NUMBER)


# ----------------------------------------------------------------------------- answers


def answer_to_text(value: Any) -> str | None:
    """A reference answer cell as text: strings as they are, ints and floats printed; else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def extract_final_answer(completion: str) -> str:
    """The content of the last `<answer>...</answer>` tag if there is one, else the whole
    completion; stripped of surrounding whitespace."""
    tagged = last_tagged(completion, "answer")
    return (completion if tagged is None else tagged).strip()


def _number_value(token: str) -> float | None:
    """The value of one number token (`"1,234.5"`, `"-3e2"`, `"3/4"`); None if not finite."""
    token = token.replace(",", "")
    numerator, _, denominator = token.partition("/")
    try:
        value = float(numerator) / float(denominator) if denominator else float(numerator)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def parse_number(text: str) -> float | None:
    """The value of `text` if all of it (stripped) is one number written with ASCII digits."""
    text = text.strip()
    return _number_value(text) if re.fullmatch(_NUMBER, text) else None


def last_number(text: str) -> float | None:
    """The value of the last number written in `text` (the usual final-answer convention)."""
    found = _NUMBER_RE.findall(text)
    return _number_value(found[-1]) if found else None


def exact_match(completion: str, answer: str) -> bool:
    """Whether the completion's final answer equals the reference, both stripped."""
    return extract_final_answer(completion) == answer.strip()


def numeric_match(completion: str, answer: str) -> bool:
    """Whether the last number in the completion's final answer equals the reference number
    within NUMERIC_REL_TOL / NUMERIC_ABS_TOL."""
    expected = parse_number(answer)
    got = last_number(extract_final_answer(completion))
    if expected is None or got is None:
        return False
    return math.isclose(got, expected, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_ABS_TOL)


def builtin_reward(match: Callable[[str, str], bool], answer_column: str) -> RewardFn:
    """A reward function giving 1.0 where `match(completion, answer)` holds, else 0.0."""

    def reward(prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float]:
        answers = columns[answer_column]
        return [float(match(c, answer_to_text(a) or "")) for c, a in zip(completions, answers)]

    reward.__name__ = f"{match.__name__}_reward"
    return reward


def conversational(prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[list[Message]], list[list[Message]]]:
    """TRL's conversational form of a batch: prompt i as `[{"role": "user", "content": prompts[i]}]`
    (the chat `tokens.render_prompt` renders), completion i as `[{"role": "assistant", "content":
    completions[i]}]`."""
    return [[{"role": "user", "content": p}] for p in prompts], [[{"role": "assistant", "content": c}] for c in completions]


# ----------------------------------------------------------------------------- resolving


def resolve_reward_fn(spec: str, *, answer_column: str = "answer") -> RewardFn:
    """`"exact"`, `"numeric"` (reading `answer_column`), or a user function `"module:function"`."""
    if spec == "exact":
        return builtin_reward(exact_match, answer_column)
    if spec == "numeric":
        return builtin_reward(numeric_match, answer_column)
    if spec == "code_tests":  # hidden unit tests in the sandbox (tasks/code_tests.py, which imports this module)
        from policyflow.tasks.code_tests import code_tests_reward

        return code_tests_reward
    return load_reward_fn(spec)


def load_reward_fn(path: str) -> RewardFn:
    """Import `"package.module:function"` (the function part may be dotted: `"mod:Class.method"`)."""
    module_name, colon, attr_path = path.partition(":")
    if not colon or not module_name.strip() or not attr_path.strip():
        raise TaskError(
            f"reward {path!r} is not one of {list(BUILTIN_REWARDS)} or an import path 'module:function' "
            "(e.g. 'my_rewards:length_bonus' for a function length_bonus in my_rewards.py)"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name != module_name and not module_name.startswith(err.name + "."):
            raise TaskError(f"reward {path!r}: module {module_name!r} imports {err.name!r} ({raised_at(err)}), which is not installed; install it") from err
        raise TaskError(
            f"reward {path!r}: cannot import module {module_name!r} ({err}); install it or put its folder on PYTHONPATH"
        ) from err
    except Exception as err:
        message = err.msg if isinstance(err, SyntaxError) else repr(err)
        raise TaskError(f"reward {path!r}: importing module {module_name!r} failed at {raised_at(err)}: {message}") from err
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise TaskError(f"reward {path!r}: {module_name!r} has no attribute {attr_path!r}; check the name after the ':'")
        target = getattr(target, part)
    if not callable(target):
        raise TaskError(f"reward {path!r}: {attr_path!r} is a {type(target).__name__}, not a function")
    return target


def raised_at(err: BaseException, caller: str = __file__) -> str:
    """`file:line` where an import (or a call) of user code failed: the bad line of a SyntaxError,
    else the user's line that began it (the first frame past the import machinery and the
    calling module `caller`), and where it was raised if elsewhere."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<frozen") and "importlib" not in f.filename and f.filename != caller]
    if not frames:
        return "an unknown place"
    first, last = (f"{f.filename}:{f.lineno}" for f in (frames[0], frames[-1]))
    return first if first == last else f"{first} (raised in {last})"


def check_reward_signature(fn: RewardFn, spec: str, columns: Mapping[str, Any]) -> None:
    """Raise TaskError if `fn` cannot be called as `fn(prompts=..., completions=..., **columns)`."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; the call will tell
        return
    try:
        signature.bind(prompts=[], completions=[], **dict.fromkeys(columns, []))
    except TypeError as err:
        raise TaskError(
            f"reward {spec!r} cannot be called as fn(prompts=..., completions=..., **columns) with columns {list(columns)}: {err}; "
            "define it as fn(prompts, completions, **kwargs) -> list[float]"
        ) from err


# ----------------------------------------------------------------------------- containment


@dataclass(frozen=True)
class RewardResult:
    """One reward per sample; `failed[i]` marks samples that got 0.0 because the function failed,
    `unscored` counts those that got 0.0 because it returned None (module docstring)."""

    rewards: list[float]
    failed: list[bool]
    unscored: int = 0

    @property
    def errors(self) -> int:
        return sum(self.failed)


@dataclass(frozen=True)
class _Outcome:
    """What a call in a worker thread did: returned `value`, raised `error`, or timed out."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False


def run_with_timeout(thunk: Callable[[], Any], timeout_s: float) -> _Outcome:
    """Call `thunk` in a daemon thread and wait at most `timeout_s` (see the module docstring)."""
    box: list[_Outcome] = []

    def target() -> None:
        try:
            box.append(_Outcome(value=thunk()))
        except BaseException as err:  # deliberate containment: a user's grader may raise anything
            box.append(_Outcome(error=err))

    thread = threading.Thread(target=target, name="policyflow-reward", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.0))
    return box[0] if box else _Outcome(timed_out=True)


def _as_values(result: Any, expected: int) -> tuple[list[Any] | None, str]:
    """The result as a list of `expected` items, or None and what is wrong with it."""
    if hasattr(result, "tolist"):  # numpy arrays, torch tensors
        result = result.tolist()
    if isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        return None, f"returned a {type(result).__name__}, not a list of floats"
    if len(result) != expected:
        return None, f"returned {len(result)} rewards for {expected} samples"
    return list(result), ""


def _as_reward(value: Any) -> float | None:
    """A finite real number as float, else None."""
    if not isinstance(value, numbers.Real):
        return None
    try:
        reward = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return reward if math.isfinite(reward) else None


def _clip(text: Any) -> str:
    text = text if isinstance(text, str) else repr(text)  # a conversational prompt or completion: its messages
    return repr(text if len(text) <= _CLIP_CHARS else text[:_CLIP_CHARS] + "...")


class _FailureLog:
    """Logs the first few failing samples of a call in full and summarises the rest."""

    def __init__(self, name: str):
        self.name = name
        self.count = 0

    def add(self, why: str, prompt: Any, completion: Any) -> None:
        self.count += 1
        if self.count <= _LOGGED_FAILURES:
            logger.warning("reward %s failed on a sample (reward 0.0): %s; prompt=%s completion=%s", self.name, why, _clip(prompt), _clip(completion))

    def close(self) -> None:
        if self.count > _LOGGED_FAILURES:
            logger.warning("reward %s failed on %d more samples (reward 0.0), not logged one by one", self.name, self.count - _LOGGED_FAILURES)


def call_reward_fn(
    fn: RewardFn,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    *,
    timeout_s: float,
    name: str = "",
) -> RewardResult:
    """Rewards for a batch, containing exceptions, hangs and malformed returns (module docstring)."""
    n = len(prompts)
    if len(completions) != n or any(len(values) != n for values in columns.values()):
        raise ValueError("call_reward_fn needs prompts, completions and every column of the same length")
    name = name or getattr(fn, "__name__", repr(fn))
    log = _FailureLog(name)
    outcome = run_with_timeout(lambda: fn(prompts=list(prompts), completions=list(completions), **{k: list(v) for k, v in columns.items()}), timeout_s)
    if outcome.timed_out:
        logger.warning(
            "reward %s did not return within %.3gs for a batch of %d; all count as errors with reward 0.0 "
            "(its thread cannot be stopped and may keep running)", name, timeout_s, n
        )
        return RewardResult([0.0] * n, [True] * n)
    if outcome.error is None:
        values, problem = _as_values(outcome.value, n)
        if values is not None:
            result = _checked(values, prompts, completions, log)
            log.close()
            _log_unscored(name, result)
            return result
        logger.warning("reward %s %s; calling it one sample at a time to find the failures", name, problem)
    else:
        logger.warning("reward %s raised %r on a batch of %d; calling it one sample at a time to find the failures", name, outcome.error, n)
    result = _per_sample(fn, prompts, completions, columns, timeout_s, log)
    log.close()
    _log_unscored(name, result)
    return result


def _log_unscored(name: str, result: RewardResult) -> None:
    if result.unscored:
        logger.warning("reward %s returned None for %d of %d samples (cannot score them, e.g. a reference answer that does not parse); "
                       "they get reward 0.0", name, result.unscored, len(result.rewards))


def _checked(values: list[Any], prompts: Sequence[Any], completions: Sequence[Any], log: _FailureLog) -> RewardResult:
    """Rewards from a returned list: None scores 0.0 (unscored); other entries that are not finite real numbers fail."""
    rewards, failed = [], []
    for value, prompt, completion in zip(values, prompts, completions):
        reward = 0.0 if value is None else _as_reward(value)
        if reward is None:
            log.add(f"returned {value!r} ({type(value).__name__}); rewards must be finite real numbers or None", prompt, completion)
        rewards.append(0.0 if reward is None else reward)
        failed.append(reward is None)
    return RewardResult(rewards, failed, unscored=sum(value is None for value in values))


def _per_sample(
    fn: RewardFn,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    timeout_s: float,
    log: _FailureLog,
) -> RewardResult:
    """Call `fn` on one sample at a time, all within one `timeout_s` budget."""
    deadline = time.monotonic() + timeout_s
    rewards, failed, unscored = [], [], 0
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        reward, why = _one_sample(fn, prompt, completion, {k: [v[i]] for k, v in columns.items()}, deadline - time.monotonic())
        if why:
            log.add(why, prompt, completion)
        unscored += reward is None and not why
        rewards.append(0.0 if reward is None else reward)
        failed.append(bool(why))
    return RewardResult(rewards, failed, unscored)


def _one_sample(fn: RewardFn, prompt: Any, completion: Any, columns: dict[str, list[Any]], budget_s: float) -> tuple[float | None, str]:
    """The reward of one sample (None if the function returned None), or None and why it failed."""
    if budget_s <= 0:
        return None, "time budget for one-by-one calls used up"
    outcome = run_with_timeout(lambda: fn(prompts=[prompt], completions=[completion], **columns), budget_s)
    if outcome.timed_out:
        return None, f"timed out after {budget_s:.3g}s"
    if outcome.error is not None:
        return None, f"raised {outcome.error!r}"
    values, problem = _as_values(outcome.value, 1)
    if values is None:
        return None, problem
    if values[0] is None:
        return None, ""
    reward = _as_reward(values[0])
    if reward is None:
        return None, f"returned {values[0]!r} ({type(values[0]).__name__}); rewards must be finite real numbers or None"
    return reward, ""
