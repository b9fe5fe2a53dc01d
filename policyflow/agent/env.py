"""The environment interface: one `Env` per episode, built G at a time by an `EnvGroupBuilder`.

Every rollout is an episode, and a single-turn task is the one-step case (`SingleTurnEnv`), so
there is one rollout path (DESIGN.md §6; tinker-cookbook's `Env`/`EnvGroupBuilder` is the model).

Envs speak **text**; the episode runner (`agent/episode.py`) owns the tokens:

* `initial_observation()` returns the task prompt as text. The runner renders it once (with
  the chat template when `model.chat_template` is on, passing the env's `tools` to it) into the
  prompt segment: `tokens.render_prompt`, the function SFT and prompt fitting render a
  problem's prompt with too (`tokens.task_prompt_ids`), so an env built by a task shows the
  task's `render_prompt(problem)` and `prompt_tools()`.
* the runner samples a completion and hands its decoded text to `step(action)`. The text is
  what the model wrote, cut after a stop string (`stop` below); the generated token ids are
  kept by the runner and never re-derived from text.
* `step` takes any text: it is model output, and nothing in it may make `step` raise (a
  malformed turn is an error observation, counted). An env that raises is a bug in it, and
  stops the worker loudly.
* `step` returns a `StepResult`. When the episode goes on, `observation` is the text to show
  next (a tool result, an error message...), unwrapped. The runner tokenizes it exactly once
  (only a prefix of a long one, so a megabyte result costs what a short one does:
  `tokens.cut_observation`), cuts it to `agent.max_obs_tokens` tokens and wraps it
  (`tokens.render_observation`): in the chat template's tool-role markers for chat models, in
  the env's `observation_wrap` (e.g. `<info>`…`</info>`) for plain models; the wrapper is
  never cut. The ids are appended with loss mask 0. History is never re-tokenized.

An env is single-use and async: `step` may await tools (a tool pool, a sandbox, a search index);
while it does, the episode holds no decode slot in the engine. Rewards are named parts summed by
the env into `StepResult.reward` (the episode's reward is the sum over its steps, plus whatever
the builder's `score_group` adds); `reward_parts` are logged separately (`reward/<name>`).

Problems are plain `problems.Problem` values that travel with the work (`workers.GroupSpec`),
so they can come from a task's training set or be produced at run time (self-play): an env
never looks a problem up by index.

Context policies (`agent.context`; `agent/context.py`) choose what each engine call sees: a
pure function `ContextPolicy(segments) -> indices` of the episode's segments so far (prompt,
gen, obs..., each with its `text`) returning the indices, in order, that form the next call's
exact context. `full` returns all of them; MEM1 keeps the prompt, the latest generated turn
(holding `<state>`) and the latest observation. A call whose context is not the previous
call's context plus what came after it starts a new training row (`tokens.episode_rows`).

Tasks and envs depend one way: a task declares its envs with `Task.group_builder(problem)`
(`tasks/base.py`; single-turn tasks inherit `SingleTurnGroupBuilder`, tool tasks return a
`tool_env.ToolGroupBuilder`), and `agent/` never imports `tasks/`: what it needs of a task is
the `SingleTurnTask` protocol below. A builder that needs what the rollout worker holds (its
engine, frozen models, tool pools: a reward from a model) reads the `WorkerResources` its task
was given (`Task.attach`, `Task.resources`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from policyflow.problems import Problem, Score
from policyflow.types import Segment, ToolStats, Trajectory

logger = logging.getLogger(__name__)
_LOGGED_CHARS = 200  # an exception message in a log line is clipped to this
ContextPolicy = Callable[[Sequence[Segment]], tuple[int, ...]]


@dataclass(frozen=True)
class StepResult:
    """What the environment answers to one action.

    observation: text shown to the model next, without its wrapper (None when `done`, or to
        let the model go on with no new input); the runner tokenizes it once, cuts it to
        `agent.max_obs_tokens` tokens, wraps it (`Env.observation_wrap`) and appends it with
        loss mask 0. A tuple holds one result per call of a turn that made several (parallel
        tool calls): each is cut and wrapped on its own, and chat models see each as its own
        tool message, as their template renders several (plain models: joined by newlines).
    done: the episode is over (an answer was given, or the env gives up).
    reward: this step's reward; the episode's reward is the sum over its steps.
    reward_parts: named parts for logging (`correct`, `format`, `search_penalty`, ...); summed
        over steps per name. `correct` (0/1) is the task's verdict used for accuracy.
    tools: the tool calls this step made and how they went (a failed call or a malformed turn
        is an error; its message is in `observation` and the run goes on): `tools.base.tool_stats`
        builds it from the pool's results. Summed into `Trajectory.tools`, logged per step.
    info: free-form strings kept with the episode for samples.jsonl (e.g. the parsed tool call).
    """

    observation: str | tuple[str, ...] | None = None
    done: bool = False
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    tools: ToolStats = field(default_factory=ToolStats)
    info: dict[str, Any] = field(default_factory=dict)


class Env(ABC):
    """One episode. Single-use: `initial_observation` once, then `step` until `done`.

    stop: strings that end one model turn (e.g. `</search>`, `</answer>`), added to the run's
        `sampling.stop`; the stop string is kept in the action text.
    tools: JSON schemas of the tools, for chat templates with `tools=` support (None: no tools
        are rendered; tag-format envs describe their tools in the prompt text).
    observation_wrap: the text a plain (non-chat) model sees before and after each observation,
        e.g. `("<info>", "</info>")`: an env takes its task's `Task.observation_wrap` (the one
        declaration SFT demonstrations read too) and never wraps by hand. The runner adds it
        whole around the cut content (`tokens.render_observation`); chat models ignore it.
    cut_action_truncates: whether an episode this env ends on an action cut at
        `sampling.max_new_tokens` is `truncated`. False (multi-turn envs): that per-turn limit
        only bounds one action, which the env judges like any other, so finishing on it is
        `complete`. True when one action is the whole episode (`SingleTurnEnv`): the per-turn
        limit is then the episode's, and a cut completion is DAPO's truncated sample.
    """

    stop: tuple[str, ...] = ()
    tools: list[dict[str, Any]] | None = None
    observation_wrap: tuple[str, str] = ("", "")
    cut_action_truncates: bool = False

    @abstractmethod
    async def initial_observation(self) -> str:
        """The task prompt (a user message for chat models)."""

    @abstractmethod
    async def step(self, action: str) -> StepResult:
        """React to the model's action (its decoded text for this turn)."""

    async def close(self) -> None:
        """Release what the episode holds (called once, however the episode ended)."""


@dataclass(frozen=True)
class GroupScore:
    """Rewards a builder assigns once all G episodes are over (e.g. a batch reward function)."""

    rewards: list[float]
    parts: list[dict[str, float]]
    errors: int = 0  # reward computations that failed (those episodes got 0)


class EnvGroupBuilder(ABC):
    """Makes the G envs of one problem (a GRPO group, a self-play round)."""

    problem: Problem

    @abstractmethod
    async def make_envs(self, n: int) -> list[Env]:
        """`n` fresh, independent envs for `self.problem`."""

    async def score_group(self, trajectories: Sequence[Trajectory]) -> GroupScore | None:
        """Rewards added to each finished episode of the group (None: the steps' rewards are all).

        Called once all G episodes are over: the place for rewards that compare group members
        (pairwise judges, self-play) or that a batch reward function computes at once.
        """
        return None


class SingleTurnTask(Protocol):
    """What `SingleTurnEnv` needs of a task (`tasks.base.Task` has all of it)."""

    name: str
    stop: tuple[str, ...]
    observation_wrap: tuple[str, str]

    def render_prompt(self, problem: Problem) -> str: ...

    def prompt_tools(self) -> list[dict[str, Any]] | None: ...

    def score(self, problems: Sequence[Problem], completions: Sequence[str]) -> Score: ...


class SingleTurnEnv(Env):
    """A single-turn task as a one-step env: the prompt, one completion, done.

    The completion is scored by the group builder in one batch (reward functions see the whole
    group at once, and a reward error is counted once per failed sample), as before episodes.
    """

    cut_action_truncates = True  # the completion is the episode: cut at max_new_tokens is truncated

    def __init__(self, task: SingleTurnTask, problem: Problem) -> None:
        self.task, self.problem = task, problem
        self.stop, self.observation_wrap = tuple(task.stop), task.observation_wrap
        self.tools = task.prompt_tools()

    async def initial_observation(self) -> str:
        return self.task.render_prompt(self.problem)

    async def step(self, action: str) -> StepResult:
        return StepResult(done=True)


class SingleTurnGroupBuilder(EnvGroupBuilder):
    """The G single-turn episodes of one problem, scored together by the task."""

    def __init__(self, task: SingleTurnTask, problem: Problem) -> None:
        self.task, self.problem = task, problem

    async def make_envs(self, n: int) -> list[Env]:
        return [SingleTurnEnv(self.task, self.problem) for _ in range(n)]

    async def score_group(self, trajectories: Sequence[Trajectory]) -> GroupScore:
        """The task's scores for the group's completions, which are model output: nothing they
        hold may end the run. When the batch `task.score` raises, each completion is scored
        alone; one whose scoring raises gets reward 0 and is counted in `errors` (logged once
        per group, with the first exception)."""
        completions = [t.completion_text for t in trajectories]
        try:
            return self._group_score(self.task.score([self.problem] * len(completions), completions), len(completions))
        except Exception:  # deliberate containment, narrowed to the failing completions below
            pass
        rewards, parts, errors, first = [], [], 0, None
        for completion in completions:
            try:
                one = self._group_score(self.task.score([self.problem], [completion]), 1)
            except Exception as err:
                first = first or err
                one = GroupScore([0.0], [{"correct": 0.0}], errors=1)
            rewards += one.rewards
            parts += one.parts
            errors += one.errors
        if first is not None:
            logger.warning("task %r raised scoring completions of problem %s (%s: %s); they get reward 0", self.task.name, self.problem.id, type(first).__name__, str(first)[:_LOGGED_CHARS])
        return GroupScore(rewards, parts, errors)

    def _group_score(self, score: Score, n: int) -> GroupScore:
        if len(score.rewards) != n or len(score.correct) != n:
            raise ValueError(f"task {self.task.name!r}: score() returned {len(score.rewards)} rewards for {n} completions")
        parts = [{"correct": float(score.correct[j])} | {name: values[j] for name, values in score.parts.items()} for j in range(n)]
        return GroupScore(list(score.rewards), parts, score.errors)


@dataclass(frozen=True)
class WorkerResources:
    """What a rollout worker holds that its episodes' builders may use (DESIGN.md §6: rewards from
    models), built once per worker (`workers.RolloutWorker`) and handed to its task with
    `Task.attach` before the first group builder is made.

    role: the policy this worker samples for (`PolicySpec.role`).
    generators: the worker's generators by the role of the policy they run (`engine.Generator`:
        `AsyncEngine`, or a client of an endpoint); `generators[role]` is the worker's own engine,
        the one its episodes sample from.
    tokenizer: the tokenizer of the worker's own policy (prompts for `generate` are token ids).
    models: frozen models by name (a reward model, a judge, a frozen solver), empty until a run
        configures one.
    tools: tool pools by name (`tools.ToolPool`) the worker shares across its episodes.

    Read-only views: the record is the same for every builder of the worker.
    """

    role: str
    generators: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    models: Mapping[str, Any] = field(default_factory=dict)
    tools: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("generators", "models", "tools"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def generator(self) -> Any:
        """The worker's own generator (`generators[role]`)."""
        return self.generators[self.role]


class GroupSource(Protocol):
    """Anything that declares the envs of its problems (`tasks.base.Task.group_builder`)."""

    def group_builder(self, problem: Problem) -> EnvGroupBuilder: ...


def group_builder(task: GroupSource, problem: Problem) -> EnvGroupBuilder:
    """The builder `task` declares for `problem`'s envs (`Task.group_builder`); a TypeError naming
    the task's class when it returns anything else (a user's task that breaks the contract)."""
    builder = task.group_builder(problem)
    if not isinstance(builder, EnvGroupBuilder):
        raise TypeError(f"{type(task).__name__}.group_builder returned a {type(builder).__name__}, not a policyflow.agent.env.EnvGroupBuilder; return one (e.g. agent.tool_env.ToolGroupBuilder)")
    return builder
