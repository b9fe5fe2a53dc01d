"""Records passed between stages (DESIGN.md §3). Layer 0: stdlib and torch only.

Stages hand each other these dataclasses, never string-keyed bags. Tensor fields carry a
shape suffix: B sequences, T tokens, G group members, P prompts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

SegmentKind = Literal["prompt", "gen", "obs"]
TrajectoryStatus = Literal["complete", "truncated", "aborted", "failed"]
FinishReason = Literal["eos", "stop", "length", "aborted"]


@dataclass(frozen=True)
class LossOutput:
    """What every policy loss returns: a scalar to backpropagate and detached metrics."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class TokenPolicy(NamedTuple):
    """The sampling policy one token was drawn from (DESIGN.md §6: the policy is per-token data).

    temperature 0 is greedy (the argmax; its recorded log-prob is the temperature-1 log-softmax,
    and it carries no policy gradient: `tokens.row_tokens` gives it loss mask 0); top_p 1 and
    top_k 0 are off. `ops.policy_log_distribution` defines the distribution.
    """

    temperature: float
    top_p: float
    top_k: int


@dataclass(frozen=True)
class Sample:
    """One sequence produced by an engine call.

    `token_ids[i]` was drawn with log-probability `logprobs[i]` under the policy `policies[i]`
    (the behaviour policy: temperature, top-k, top-p) by weights of policy version
    `versions[i]`. `policies` is None only for samples made outside an engine (tests, scripts):
    their tokens count as drawn from the run's `sampling.*` policy.
    """

    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    versions: tuple[int, ...]
    finish_reason: FinishReason
    text: str = ""
    policies: tuple[TokenPolicy, ...] | None = None


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens of one kind. Only `gen` segments carry log-probs/versions.

    `text` is what the tokens say (the decoded action for gen, the observation text for obs),
    kept for context policies and samples.jsonl; training reads only the token ids.
    `policies` (gen only, optional) is the sampling policy of each token (`Sample.policies`);
    None: the run's `sampling.*` policy drew every token.
    """

    kind: SegmentKind
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None
    versions: tuple[int, ...] | None = None
    turn: int = 0
    text: str = ""
    policies: tuple[TokenPolicy, ...] | None = None

    @property
    def trainable(self) -> bool:
        return self.kind == "gen"

    def __post_init__(self) -> None:
        if self.kind == "gen":
            if self.logprobs is None or self.versions is None:
                raise ValueError("a gen segment needs logprobs and versions")
            if not (len(self.logprobs) == len(self.versions) == len(self.token_ids)):
                raise ValueError(
                    f"gen segment lengths differ: {len(self.token_ids)} tokens, "
                    f"{len(self.logprobs)} logprobs, {len(self.versions)} versions"
                )
            if self.policies is not None and len(self.policies) != len(self.token_ids):
                raise ValueError(f"gen segment lengths differ: {len(self.token_ids)} tokens, {len(self.policies)} policies")
        elif self.logprobs is not None or self.versions is not None or self.policies is not None:
            raise ValueError(f"a {self.kind} segment carries no logprobs, versions or policies")


@dataclass(frozen=True)
class Call:
    """One engine call: the segments that formed its exact context (in order) and the one it produced."""

    context: tuple[int, ...]  # indices into Trajectory.segments
    produced: int  # index of the gen segment


@dataclass
class ToolStats:
    """Tool use, counted per episode (`Trajectory.tools`, summed into the step's metrics) or per `ToolPool`.

    calls: tool calls run (a turn with several parallel calls counts each). errors: failed calls
    (unknown tool, bad arguments, raised, bad result, timeout) and malformed turns (no call made,
    so not in `calls`); each became an error observation. timeouts: the failed calls that ran
    past their timeout. seconds: the time the tools themselves ran, summed over calls (queueing
    for a pool slot excluded). errors_by_kind: errors per kind (`malformed` for malformed turns).
    """

    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    seconds: float = 0.0
    errors_by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, error: str | None = None, seconds: float = 0.0, *, call: bool = True) -> None:
        """Record one call that failed with `error` (None: it succeeded) after `seconds`; `call=False`: an error that was no call (a malformed turn)."""
        self.calls += int(call)
        self.seconds += seconds
        if error is not None:
            self.errors += 1
            self.timeouts += int(error == "timeout")
            self.errors_by_kind[error] = self.errors_by_kind.get(error, 0) + 1

    def add(self, other: ToolStats) -> None:
        """Add `other`'s counts to these."""
        self.calls += other.calls
        self.errors += other.errors
        self.timeouts += other.timeouts
        self.seconds += other.seconds
        for kind, n in other.errors_by_kind.items():
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + n

    def metrics(self, episodes: int) -> dict[str, float]:
        """The step's tool metrics when these are the counts of `episodes` episodes: calls per episode, then totals."""
        return {
            "agent/tool_calls_mean": self.calls / max(1, episodes),
            "agent/tool_errors": float(self.errors),
            "agent/tool_timeouts": float(self.timeouts),
            "perf/tool_seconds": self.seconds,
        }


@dataclass
class Trajectory:
    """One rollout: the segments it consists of, how it was produced, and its reward."""

    id: str
    task_id: str
    segments: list[Segment]
    calls: list[Call]
    reward: float = 0.0
    reward_parts: dict[str, float] = field(default_factory=dict)
    completion_text: str = ""
    num_turns: int = 1
    tools: ToolStats = field(default_factory=ToolStats)  # the tool calls of this episode's steps
    start_version: int = 0  # the generator's version when the episode started
    status: TrajectoryStatus = "complete"
    finish_reason: FinishReason = "eos"
    step_info: list[dict[str, Any]] = field(default_factory=list)  # the env's `StepResult.info`, one per step

    @property
    def num_tool_calls(self) -> int:
        return self.tools.calls

    @property
    def num_tool_errors(self) -> int:
        return self.tools.errors

    @property
    def num_gen_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.segments if s.kind == "gen")

    @property
    def context_tokens_max(self) -> int:
        """Longest sequence one engine call saw and wrote (its context plus its output)."""
        size = lambda indices: sum(len(self.segments[i].token_ids) for i in indices)
        return max((size(c.context) + size((c.produced,)) for c in self.calls), default=size(range(len(self.segments))))

    @property
    def min_version(self) -> int:
        """Oldest policy version of any generated token (start_version if none)."""
        versions = [v for s in self.segments if s.versions for v in s.versions]
        return min(versions) if versions else self.start_version


@dataclass
class Group:
    """The G trajectories of one task instance (GRPO group), admitted and aged together."""

    id: str
    task_id: str
    prompt: str
    answer: str
    trajectories: list[Trajectory]

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    @property
    def min_version(self) -> int:
        return min(t.min_version for t in self.trajectories)


@dataclass(frozen=True)
class TrainBatch:
    """Right-padded tensors for one optimisation step: one row per training row of an episode
    (`tokens.episode_rows`; exactly one per episode unless its context was pruned).

    Position t of `*_BT` describes token t; `behav_logprobs_BT[b, t]` is log p(token t | < t)
    under the behaviour policy and is meaningful only where `loss_mask_BT` is 1.
    `temperature_BT`, `top_p_BT` and `top_k_BT` are the policy each token was drawn from
    (`TokenPolicy`; the trainer recomputes every log-prob under its token's own policy);
    meaningful only where `loss_mask_BT` is 1. None: every token was drawn from the trainer's
    configured policy (`sampling.*`).
    """

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    behav_logprobs_BT: torch.Tensor
    advantages_B: torch.Tensor
    temperature_BT: torch.Tensor | None = None  # float32
    top_p_BT: torch.Tensor | None = None  # float32
    top_k_BT: torch.Tensor | None = None  # long

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids_BT.shape[0])

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return TrainBatch(**{name: None if value is None else value.to(device) for name, value in moved.items()})
