"""Virtual-clock simulation of sync, one-step-off and fully asynchronous RL scheduling (issue 4).

The real `RolloutBuffer` (admission `accepted + running + n ≤ (η + v + 1)·B`, FIFO batches, hard
cutoff η_hard, ledger, staleness statistics) and `SnapshotStore`/`should_update` drive a
discrete-event simulation of one rollout engine and one trainer. Nothing is sampled and no model
runs; only the schedule is real.

Fake engine. C slots with continuous batching: a slot freed by a finished turn is refilled at
once, first from sequences waiting for the engine (new group members, agents back from a tool
call), else by admitting a new group if the buffer allows. One decode step over n active
sequences costs `a + b·n` virtual seconds and gives each of them one token tagged with the
engine's version. Prefill is free. A sequence waiting on a tool frees its slot.

Weight updates (DESIGN.md §4). The trainer publishes version v+1 after each step of t seconds;
the engine notices at its next decode-step boundary and, when `should_update(v_engine, v, max_lag)`:
  continue  pauses s seconds to swap, then the in-flight sequences go on with the new version;
  drain     admits no new group, lets every admitted group finish (queued members and agents in
            tool calls included, as `policyflow.workers.RolloutWorker` does), then swaps (s seconds);
            a group therefore never straddles a swap.
Modes are configurations: sync = η 0 + drain, one-step-off = η 1 + drain, async = η ≥ 1 + continue.

Measured over the steps after a warm-up: throughput (trained trajectories per virtual second),
staleness of trained tokens (mean, p99, max), tokens dropped by the cutoff, trainer idle
fraction, engine busy fraction (decoding at all), slot utilisation (time-average n/C) and
overlap (fraction of training time during which the engine decoded).

Check, "concurrency is free": decode cost independent of n (b = 0), so a trajectory of L tokens
takes T = a·L, with C = B·G slots, t = E[T], s = 0. Then one sync step waits for the slowest of
its B·G trajectories and async runs engine and trainer side by side:

    predicted async/sync = (E[max of B·G T] + t + s) / (max(B·G·E[T]/C, t) + s)  =  1 + E[max T]/E[T]

with E[max of B·G T] and E[T] estimated by Monte Carlo from the same length distribution.
The prediction assumes the engine never waits for admission. While the trainer holds batch v,
consumed = (v+1)·B, so the bound leaves queued + running ≤ η·B: at η = 1 (with C = B·G) a slot
freed during a train step is not refilled until the step ends, and η = 1 falls well short; from
η = 2 a whole batch can wait while the next generates, and the ratio comes close. A cutoff
η_hard = η costs more on top: long trajectories span several versions and are dropped.

The report (sweeps, the check against the prediction, the plot) is `benchmarks/async_speedup.py`.

Multi-turn scheduling, simulated and real. The buffer, the admission rule, the snapshot store,
`should_update` and the drain rule are the library's; the episodes and the engine are this
file's own model of `RolloutWorker` + `EpisodeRunner` + `AsyncEngine`, because the real ones
need a model, a tokenizer and an env and run on the wall clock. The differences, each of
which the measurement in `benchmarks/agent_async.py` contains and this model does not:
  * plans: a simulated episode draws its turns, tokens per turn and tool latencies up front;
    a real one ends when the env says so (an answer) or at agent.max_turns, and a turn ends
    at a stop string, EOS or max_new_tokens;
  * tools: here every turn but the last waits; in the real search env only searches wait
    (a malformed turn gets its error observation at once, an answer ends the episode);
  * prefill: free here; the real engine prefills each call's whole context as a new request
    (under `full` the history grows every turn), and those rows share the decode step;
  * step cost: a + b·n here; really it also grows with the context lengths in the batch;
  * admission: here a group is admitted when a slot frees and the buffer allows; really the
    coordinator's producer admits every group the buffer allows at once and all G episodes
    queue in the engine (the same while C ≥ (η + 1)·B·G, as in agent_async.py);
  * compute: here the trainer and the engine run side by side at full speed; in the process
    runtime they are two OS processes that share the machine's cores (2 here, with other
    jobs), so overlapping them slows both;
  * swaps cost a fixed s here; really a safetensors write and load, whose pause is measured.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policyflow.buffer import Ledger, RolloutBuffer, staleness_summary, token_staleness  # noqa: E402
from policyflow.types import Call, Group, Segment, ToolStats, Trajectory  # noqa: E402
from policyflow.weights import SnapshotStore, should_update  # noqa: E402

SwapMode = Literal["continue", "drain"]

# ---- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Trajectories of 1..max_turns turns (uniform); lognormal tokens per turn and tool latency."""

    name: str
    mean_turn_tokens: float  # E[L] per turn before the cap; median = E[L]·exp(−σ²/2)
    sigma: float  # σ of log L
    max_turn_tokens: int  # cap (max_new_tokens)
    max_turns: int = 1
    tool_median_s: float = 0.0  # tool latency between turns: lognormal, median in virtual s
    tool_sigma: float = 0.0
    prompt_tokens: int = 64
    obs_tokens: int = 32


WORKLOADS = {
    "lognormal_s0.8": Workload("lognormal_s0.8", mean_turn_tokens=128, sigma=0.8, max_turn_tokens=1024),
    "lognormal_s1.2": Workload("lognormal_s1.2", mean_turn_tokens=128, sigma=1.2, max_turn_tokens=1024),
    "multi_turn": Workload(
        "multi_turn", mean_turn_tokens=48, sigma=0.8, max_turn_tokens=384, max_turns=4, tool_median_s=1.0, tool_sigma=1.0
    ),
}


def turn_lengths(rng: np.random.Generator, w: Workload, shape: int | tuple[int, ...]) -> np.ndarray:
    """Tokens per turn: ⌈lognormal(μ, σ)⌉ clipped to [1, cap], with μ = ln E[L] − σ²/2."""
    mu = math.log(w.mean_turn_tokens) - w.sigma**2 / 2
    return np.clip(np.ceil(rng.lognormal(mu, w.sigma, shape)), 1, w.max_turn_tokens).astype(np.int64)


def sample_trajectory_plan(rng: np.random.Generator, w: Workload) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(tokens of each turn, tool latency in s after each turn but the last)."""
    turns = int(rng.integers(1, w.max_turns + 1))
    tools_s = rng.lognormal(math.log(w.tool_median_s), w.tool_sigma, turns - 1) if turns > 1 else ()
    return tuple(int(n) for n in turn_lengths(rng, w, turns)), tuple(float(s) for s in tools_s)


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    eta: int  # staleness budget of admission
    swap: SwapMode
    eta_hard: int | None  # drop groups with tokens older than v − eta_hard (None: never)


def standard_modes(etas: tuple[int, ...] = (1, 2, 4, 8), slack: int = 0) -> list[Mode]:
    """sync (η 0, drain), one_step_off (η 1, drain), async η (continue); each with η_hard = η + slack."""
    return [Mode("sync", 0, "drain", slack), Mode("one_step_off", 1, "drain", 1 + slack)] + [
        Mode(f"async_eta{eta}", eta, "continue", eta + slack) for eta in etas
    ]


@dataclass(frozen=True)
class SimConfig:
    batch_groups: int = 16  # B
    group_size: int = 4  # G trajectories per group
    slots: int = 64  # C sequences decoded at once
    step_base_s: float = 0.010  # a: cost of one decode step ...
    step_per_seq_s: float = 0.0002  # b: ... plus b per active sequence
    train_step_s: float = 2.5  # t
    swap_s: float = 0.3  # s: engine pause to load new weights
    max_lag: int = 0  # engines update when v − v_engine > max_lag (0: eagerly)
    steps: int = 60  # train steps simulated
    warmup_steps: int = 12  # not measured
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"need 0 ≤ warmup_steps < steps, got {self.warmup_steps} and {self.steps}")

    def decode_step_s(self, active: int) -> float:
        """a + b·n for one decode step over n active sequences."""
        return self.step_base_s + self.step_per_seq_s * active


# ---- records -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Rollout:
    """One trajectory in flight: its plan, the turn it is in, and the versions of its tokens."""

    task_id: str
    index: int
    turn_tokens: tuple[int, ...]
    tools_s: tuple[float, ...]
    turn: int = 0
    left: int = 0  # tokens still to generate in this turn
    runs: list[list[int]] = field(default_factory=list)  # [version, count] of this turn's tokens
    turn_versions: list[tuple[int, ...]] = field(default_factory=list)  # finished turns

    def __post_init__(self) -> None:
        self.left = self.turn_tokens[0]

    def decode(self, steps: int, version: int) -> None:
        self.left -= steps
        if self.runs and self.runs[-1][0] == version:
            self.runs[-1][1] += steps
        else:
            self.runs.append([version, steps])

    def end_turn(self) -> float | None:
        """Close the finished turn; the tool latency before the next one, or None when done."""
        self.turn_versions.append(tuple(itertools.chain.from_iterable(itertools.repeat(v, n) for v, n in self.runs)))
        self.runs = []
        if self.turn + 1 == len(self.turn_tokens):
            return None
        self.turn += 1
        self.left = self.turn_tokens[self.turn]
        return self.tools_s[self.turn - 1]


def trajectory_record(r: Rollout, w: Workload) -> Trajectory:
    """prompt, then gen / obs / gen / … with one engine call per turn (placeholder token ids)."""
    segments, calls = [Segment("prompt", (0,) * w.prompt_tokens)], []
    for turn, versions in enumerate(r.turn_versions):
        if turn:
            segments.append(Segment("obs", (0,) * w.obs_tokens, turn=turn))
        calls.append(Call(context=tuple(range(len(segments))), produced=len(segments)))
        segments.append(Segment("gen", (0,) * len(versions), (0.0,) * len(versions), versions, turn=turn))
    all_versions = [v for vs in r.turn_versions for v in (vs[0], vs[-1])]
    return Trajectory(
        id=f"{r.task_id}/{r.index}", task_id=r.task_id, segments=segments, calls=calls,
        num_turns=len(r.turn_versions), tools=ToolStats(calls=len(r.turn_versions) - 1),
        start_version=min(all_versions),
    )


@dataclass(frozen=True)
class Chunk:
    """`steps` decode steps of `step_s` each over `active` sequences, from `start_s` on."""

    start_s: float
    step_s: float
    steps: int
    active: int

    @property
    def end_s(self) -> float:
        return self.start_s + self.steps * self.step_s

    def cut_at(self, t_s: float) -> Chunk:
        """Stop at the first step boundary at or after t_s (at least one step)."""
        steps = max(1, math.ceil((t_s - self.start_s) / self.step_s - 1e-9))
        return replace(self, steps=min(self.steps, steps))


Interval = tuple[float, float]  # [start_s, end_s) on the virtual clock


def clip(intervals: list[Interval], lo_s: float, hi_s: float) -> list[Interval]:
    """The parts of `intervals` inside [lo_s, hi_s]."""
    return [(max(a, lo_s), min(b, hi_s)) for a, b in intervals if b > lo_s and a < hi_s]


def overlap_s(xs: list[Interval], ys: list[Interval]) -> float:
    """|⋃xs ∩ ⋃ys| for two sorted lists of disjoint intervals (one merge walk)."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def busy_s(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in intervals)


@dataclass(frozen=True)
class ScheduleStats:
    """What one simulated run measured over its window (the steps after warm-up)."""

    mode: str
    eta: int
    eta_hard: int | None
    swap: str
    window_s: float
    trajectories_per_s: float
    groups_per_s: float
    staleness_mean: float
    staleness_p99: float
    staleness_max: float
    dropped_tokens: float
    dropped_groups: float
    dropped_token_fraction: float  # dropped / (dropped + trained) generated tokens
    trainer_idle_fraction: float
    engine_busy_fraction: float
    slot_utilisation: float
    overlap_fraction: float  # of training time, the engine was decoding


@dataclass(frozen=True)
class SimResult:
    stats: ScheduleStats
    trained_task_ids: tuple[str, ...]  # in training order, whole run
    ledger: Ledger
    overlap_total_s: float  # engine decoding while the trainer trains, whole run


# ---- the simulation ----------------------------------------------------------------------------


class Simulation:
    """One engine, one trainer, the real buffer and snapshot store, on a virtual clock.

    Events: a decode chunk ends (sequences finish turns), a tool call returns, a weight swap
    ends, a train step ends. Between events the engine decodes in chunks of equal steps; an
    external event cuts the running chunk at the next step boundary, where the engine reacts.
    """

    def __init__(self, cfg: SimConfig, mode: Mode, workload: Workload) -> None:
        if mode.eta_hard is not None and mode.eta_hard < cfg.max_lag:
            raise ValueError(
                f"eta_hard {mode.eta_hard} < max_lag {cfg.max_lag}: an engine max_lag versions behind samples only "
                "tokens the cutoff drops, and the run never makes progress; raise eta_hard or lower max_lag"
            )
        self.cfg, self.mode, self.workload = cfg, mode, workload
        self.rng = np.random.default_rng(cfg.seed)
        self.buffer = RolloutBuffer(cfg.batch_groups, eta=mode.eta, eta_hard=mode.eta_hard)
        self.store = SnapshotStore(keep=cfg.max_lag + 1)
        self.store.publish(0, {})
        self.now = 0.0
        self.version = 0  # trainer: optimizer steps done
        self.engine_version = 0
        self.active: list[Rollout] = []
        self.ready: deque[Rollout] = deque()  # waiting for a slot
        self.tools: list[tuple[float, int, Rollout]] = []  # heap of (return time, call order, rollout)
        self.tool_order = itertools.count()
        self.finished: dict[str, list[Trajectory]] = defaultdict(list)
        self.chunk: Chunk | None = None
        self.swap_end_s: float | None = None
        self.swap_version = 0  # the version being loaded
        self.train_end_s: float | None = None
        self.train_intervals: list[tuple[float, float]] = []
        self.next_task = 0
        self.decode_log: list[tuple[float, float, int]] = []
        self.warm_s = 0.0  # end of the warm-up steps
        self.warm_dropped = (0.0, 0.0)  # stale (tokens, groups) dropped during warm-up
        self.staleness: list[int] = []  # trained tokens, window only
        self.trained_trajectories = 0  # window only
        self.trained_ids: list[str] = []

    # -- driver --

    def run(self) -> SimResult:
        self.engine_react()
        handlers = {"decode": self.finish_chunk, "swap": self.finish_swap, "tool": self.tool_returns, "train": self.train_step_done}
        while self.version < self.cfg.steps:
            self.now, _, kind = self.next_event()
            handlers[kind]()
        return self.result()

    def next_event(self) -> tuple[float, int, str]:
        due = [
            (self.chunk.end_s if self.chunk else None, 0, "decode"),
            (self.swap_end_s, 1, "swap"),
            (self.tools[0][0] if self.tools else None, 2, "tool"),
            (self.train_end_s, 3, "train"),
        ]
        pending = [event for event in due if event[0] is not None]
        if not pending:
            raise RuntimeError(
                f"schedule deadlocked at t={self.now:.2f}s, version {self.version}: buffer {self.buffer.metrics()}; "
                f"{len(self.active)} active, {len(self.ready)} ready — check B, G, C and η"
            )
        return min(pending)

    # -- engine --

    def poke_engine(self) -> None:
        """Something outside the engine changed: it reacts now if idle, else at its next step boundary."""
        if self.chunk is not None:
            self.chunk = self.chunk.cut_at(self.now)
        elif self.swap_end_s is None:
            self.engine_react()

    def engine_react(self) -> None:
        """At a step boundary: swap weights if due (continue: now; drain: once every admitted group is done), refill slots, decode."""
        latest = self.store.latest_version
        update = should_update(self.engine_version, latest, self.cfg.max_lag)
        if update and (self.mode.swap == "continue" or not self.buffer.running):
            if self.cfg.swap_s > 0:
                self.swap_end_s, self.swap_version = self.now + self.cfg.swap_s, latest
                return
            self.engine_version = latest
            update = False
        self.fill_slots(admit=not update)  # a pending drain still runs the members of admitted groups
        if self.active:
            n = len(self.active)
            self.chunk = Chunk(self.now, self.cfg.decode_step_s(n), min(r.left for r in self.active), n)

    def fill_slots(self, admit: bool = True) -> None:
        while len(self.active) < self.cfg.slots:
            if not self.ready and not (admit and self.admit_group()):
                return
            self.active.append(self.ready.popleft())

    def admit_group(self) -> bool:
        task_id = f"task{self.next_task}"
        if not self.buffer.try_admit(task_id):
            return False
        self.next_task += 1
        for j in range(self.cfg.group_size):
            self.ready.append(Rollout(task_id, j, *sample_trajectory_plan(self.rng, self.workload)))
        return True

    def finish_swap(self) -> None:
        self.swap_end_s = None
        self.engine_version = self.swap_version
        self.engine_react()

    def finish_chunk(self) -> None:
        c, self.chunk = self.chunk, None
        for r in self.active:
            r.decode(c.steps, self.engine_version)
        self.decode_log.append((c.start_s, c.end_s, c.active))
        done = [r for r in self.active if r.left == 0]
        self.active = [r for r in self.active if r.left > 0]
        for r in done:
            self.end_turn(r)
        self.engine_react()

    def end_turn(self, r: Rollout) -> None:
        tool_s = r.end_turn()
        if tool_s is not None:
            heapq.heappush(self.tools, (self.now + tool_s, next(self.tool_order), r))
            return
        group = self.finished[r.task_id]
        group.append(trajectory_record(r, self.workload))
        if len(group) == self.cfg.group_size:
            del self.finished[r.task_id]
            self.buffer.put(Group(r.task_id, r.task_id, "", "", group))
            self.try_train()

    def tool_returns(self) -> None:
        _, _, r = heapq.heappop(self.tools)
        self.ready.append(r)
        self.poke_engine()

    # -- trainer --

    def try_train(self) -> None:
        """If idle, take the next batch (stale groups dropped first) and train for t seconds."""
        if self.train_end_s is not None or self.version >= self.cfg.steps:
            return
        batch = self.buffer.get_batch(self.cfg.batch_groups, self.version)
        if batch is None:
            return
        self.trained_ids += [g.task_id for g in batch]
        if self.version >= self.cfg.warmup_steps:
            self.staleness += token_staleness(batch, self.version)
            self.trained_trajectories += sum(len(g.trajectories) for g in batch)
        self.train_end_s = self.now + self.cfg.train_step_s
        self.train_intervals.append((self.now, self.train_end_s))

    def train_step_done(self) -> None:
        self.train_end_s = None
        self.version += 1
        self.buffer.set_version(self.version)
        self.store.publish(self.version, {})
        if self.version == self.cfg.warmup_steps:
            self.warm_s, self.warm_dropped = self.now, self.dropped()
        self.try_train()
        self.poke_engine()

    # -- results --

    def dropped(self) -> tuple[float, float]:
        m = self.buffer.metrics()
        return m["async/dropped_stale_tokens"], m["async/dropped_stale_groups"]

    def result(self) -> SimResult:
        window_s = self.now - self.warm_s
        in_progress = [(self.chunk.start_s, self.now, self.chunk.active)] if self.chunk else []
        decode_log = self.decode_log + in_progress
        decode = [(a, b) for a, b, _ in decode_log]
        dropped_tokens, dropped_groups = (end - warm for end, warm in zip(self.dropped(), self.warm_dropped))
        train_s = busy_s(clip(self.train_intervals, self.warm_s, self.now))
        slot_s = sum(n * busy_s(clip([(a, b)], self.warm_s, self.now)) for a, b, n in decode_log)
        summary = staleness_summary(self.staleness)
        stats = ScheduleStats(
            mode=self.mode.name, eta=self.mode.eta, eta_hard=self.mode.eta_hard, swap=self.mode.swap,
            window_s=window_s,
            trajectories_per_s=self.trained_trajectories / window_s,
            groups_per_s=self.trained_trajectories / self.cfg.group_size / window_s,
            staleness_mean=summary["async/staleness_mean"],
            staleness_p99=summary["async/staleness_p99"],
            staleness_max=summary["async/staleness_max"],
            dropped_tokens=dropped_tokens, dropped_groups=dropped_groups,
            dropped_token_fraction=dropped_tokens / max(1.0, dropped_tokens + len(self.staleness)),
            trainer_idle_fraction=1 - train_s / window_s,
            engine_busy_fraction=busy_s(clip(decode, self.warm_s, self.now)) / window_s,
            slot_utilisation=slot_s / (self.cfg.slots * window_s),
            overlap_fraction=overlap_s(clip(decode, self.warm_s, self.now), clip(self.train_intervals, self.warm_s, self.now)) / train_s,
        )
        return SimResult(stats, tuple(self.trained_ids), self.buffer.ledger(), overlap_s(decode, self.train_intervals))


def simulate(cfg: SimConfig, mode: Mode, workload: Workload) -> SimResult:
    return Simulation(cfg, mode, workload).run()


# ---- the "concurrency is free" prediction -----------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    mean_T_s: float  # E[T]
    max_T_s: float  # E[max of B·G T]
    ratio: float


def predicted_ratio(max_T_s: float, mean_T_s: float, train_s: float, swap_s: float, slots: int, batch_trajs: int) -> float:
    """async/sync = (E[max of B T] + t + s) / (max(B·E[T]/C, t) + s), B counted in trajectories."""
    return (max_T_s + train_s + swap_s) / (max(batch_trajs * mean_T_s / slots, train_s) + swap_s)


def monte_carlo_T(w: Workload, step_s: float, batch_trajs: int, draws: int, seed: int) -> tuple[float, float]:
    """(E[T], E[max of batch_trajs T]) for single-turn T = a·L, from `draws` simulated batches."""
    lengths = turn_lengths(np.random.default_rng(seed), w, (draws, batch_trajs))
    return step_s * float(lengths.mean()), step_s * float(lengths.max(axis=1).mean())


def free_concurrency_config(w: Workload, batch_trajs: int, steps: int, seed: int, draws: int = 20_000) -> tuple[SimConfig, Prediction]:
    """C = B (G = 1), b = 0, s = 0, t = E[T]; and the predicted async/sync ratio for it."""
    step_s = 0.01
    mean_T, max_T = monte_carlo_T(w, step_s, batch_trajs, draws, seed + 1)
    cfg = SimConfig(
        batch_groups=batch_trajs, group_size=1, slots=batch_trajs, step_base_s=step_s, step_per_seq_s=0.0,
        train_step_s=mean_T, swap_s=0.0, steps=steps, warmup_steps=steps // 10, seed=seed,
    )
    ratio = predicted_ratio(max_T, mean_T, cfg.train_step_s, cfg.swap_s, cfg.slots, batch_trajs)
    return cfg, Prediction(mean_T, max_T, ratio)
