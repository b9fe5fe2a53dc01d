"""The two components a runtime places (DESIGN.md §5): a rollout worker and the trainer.

Both are plain classes; their async methods are meant to be awaited on one event loop (the
inline runtime's, or the loop of the process that hosts them).

`RolloutWorker` owns one `AsyncEngine` and runs episodes on it: each submitted group is a
task that runs the G episodes of its problem (`EpisodeRunner.run_group`); all episodes of all
groups await the one engine, which batches whatever is in flight. Finished groups are collected
by `poll`. The worker's task is given what the worker holds (`agent.env.WorkerResources`: its
engine by role, its tokenizer, frozen models, tool pools) once, with `Task.attach`, so a group
builder's reward may come from a model. Weight updates come from the snapshot store with `update_weights`, in one of three
swap modes:

* continue — swap between two decode steps; in-flight requests keep their KV cache and their
  later tokens carry the new version, and so do the later turns of running episodes (AReaL's
  interruptible generation);
* drain — start no new group; let every running group finish all its episodes, all their
  turns (so a group never mixes versions); then swap and start the groups that waited;
* abort — stop in-flight requests, swap, and continue each from its partial output (the
  partial tokens keep their old versions and behaviour log-probs; done inside the engine).

The staleness of a group is its oldest token (`Group.min_version`), whatever turn produced it.

`TrainerWorker` owns the policy being optimised: SFT warm-start, evaluation, one RL step per
batch of groups, publishing each new version to the snapshot store, and checkpoints.

Each serves one policy (DESIGN.md §5): it takes that policy's `PolicySpec` and writes only under
the policy's folder (`PolicySpec.folder`), never the whole `Config`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from policyflow.agent.context import context_policy
from policyflow.agent.env import WorkerResources, group_builder
from policyflow.checkpoint import LoopState, load_state, save_checkpoint, save_model_folder, set_rng_state, verify_checkpoint
from policyflow.config import CheckpointConfig
from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.frozen import FrozenModel, FrozenSource
from policyflow.logging import Progress
from policyflow.lora import RUN_BASE_REF, adapter_base_path, attach_lora, is_adapter_folder, is_lora, load_adapter, lora_weights
from policyflow.model import load_pretrained, num_parameters
from policyflow.policy import PolicySpec
from policyflow.rollout import episode_record, rollout_metrics, score_groups, shape_overlong
from policyflow.session import build_task, episode_runner, load_policy, model_context, open_session, pick_device, sampling_params
from policyflow.sft import warm_start
from policyflow.tasks.base import Problem
from policyflow.tokens import task_prompt_ids
from policyflow.trainer import Trainer, compute_precision, sequence_logprobs
from policyflow.types import Group, Sample


REFERENCE_DIR = "reference"  # <policy folder>/reference/: the KL reference (HF format), written once per run
BASE_DIR = "base"  # <policy folder>/base/: with LoRA, the frozen base under the adapter (HF format), written once per run


@dataclass(frozen=True)
class GroupSpec:
    """One unit of rollout work: the G episodes of `problem`, known as `task_id`.

    `index` is the issue order (the resume ledger's); the problem itself travels with the work,
    so it may come from a training set or be made at run time.
    """

    task_id: str
    index: int
    problem: Problem


@dataclass
class WorkerReport:
    """Groups finished since the last poll, and the worker's cumulative counters."""

    groups: list[Group]
    stats: dict[str, float]


class RolloutWorker:
    """One engine of one policy (`spec`) and the episodes running on it, at most `engine_slots`
    sequences decoded at once (pipeline.engine_slots). Construct it inside the process (and
    loop) that runs it."""

    def __init__(self, spec: PolicySpec, store, *, seed: int, engine_slots: int, rng: torch.Tensor | None = None,
                 models: Mapping[str, FrozenSource] | None = None) -> None:
        model, self.tokenizer = load_policy(spec)
        self.spec = spec
        self.task = build_task(spec, self.tokenizer, model_context(model.config))
        self.store = store
        version, state = store.latest()
        generator = torch.Generator(pick_device(spec)).manual_seed(seed)
        if rng is not None:
            generator.set_state(rng)
        self.engine = AsyncEngine(model, self.tokenizer, version=version, max_batch=engine_slots, generator=generator)
        self.engine.update_weights(state, version)
        self.runner = episode_runner(spec, self.engine, self.tokenizer, sampling_params(spec, self.task))
        frozen = {name: FrozenModel.open(source, seed=seed) for name, source in (models or {}).items()}  # e.g. R-Zero's frozen solver
        self.resources = WorkerResources(spec.role, generators={spec.role: self.engine}, tokenizer=self.tokenizer, models=frozen)
        self.task.attach(self.resources)  # once, before any group builder is made: rewards may come from a model
        self._open: dict[str, asyncio.Task] = {}  # task id -> the task running its group
        self._held: deque[GroupSpec] = deque()  # submitted during a drain: start after the swap
        self._draining = False  # a drain swap waits for the running groups to finish
        self._drain_since = 0.0
        self._done: list[Group] = []
        self._news = asyncio.Event()  # a group finished (or failed)
        self._error: BaseException | None = None  # what stopped a group, raised by every later call
        self._closed = False
        self._born = time.perf_counter()
        self.stats = {"tokens": 0.0, "alive_s": 0.0, "groups": 0.0, "reward_errors": 0.0, "swaps": 0.0, "pause_s": 0.0}

    # -- the calls ---------------------------------------------------------------------------
    async def submit(self, specs: list[GroupSpec]) -> None:
        """Start these groups (in order); their episodes join the engine's running batch."""
        self._check()
        for spec in specs:
            if spec.task_id in self._open or any(h.task_id == spec.task_id for h in self._held):
                raise ValueError(f"task {spec.task_id!r} was submitted twice to this worker")
            if self._draining:
                self._held.append(spec)
            else:
                self._start(spec)

    async def update_weights(self, mode: str) -> int:
        """Take the latest published weights (see the module docstring for the modes); returns the version held afterwards."""
        self._check()
        latest = self.store.latest_version
        if latest is None or latest <= self.engine.version:
            return self.engine.version
        if mode == "drain" or self._draining:
            if not self._draining:
                self._drain_since = time.perf_counter()
                self._draining = True
            if not self._open:  # nothing running (or the drain is complete): swap now
                self._finish_drain()
            return self.engine.version
        start = time.perf_counter()
        self._load_latest(mode)
        self._swapped(time.perf_counter() - start)
        return self.engine.version

    async def poll(self) -> WorkerReport:
        """Wait until at least one group has finished (or the worker is closed); return them all."""
        self._check()
        while not self._done and not self._closed:
            self._news.clear()
            await self._news.wait()
            self._check()
        done, self._done = self._done, []
        self.stats["alive_s"] = time.perf_counter() - self._born
        return WorkerReport(done, dict(self.stats) | self.engine.stats | {"version": float(self.engine.version)})

    def held_version(self) -> int:
        return self.engine.version

    async def probe(self) -> Sample:
        """A greedy continuation (`PROBE_TOKENS`, EOS ignored) of the first held-out prompt by the
        engine as it is now: its log-probs are the engine's T=1 log-softmax, which the trainer
        recomputes (`TrainerWorker.probe_logprobs`) to check both run the same policy. Greedy
        draws no random numbers, so the sampling of the run itself is not changed."""
        problem = self.task.eval_problems()[0]
        prompt = task_prompt_ids(self.tokenizer, self.task, problem, self.spec.model.chat_template)  # as RL renders it
        room = (self.engine.max_positions or len(prompt) + PROBE_TOKENS) - len(prompt)
        params = SamplingParams(temperature=0.0, max_new_tokens=max(1, min(PROBE_TOKENS, room)), ignore_eos=True)
        return await self.engine.generate(prompt, params)

    def rng_state(self) -> torch.Tensor:
        return self.engine.generator.get_state()

    def close(self) -> None:
        self._closed = True
        for task in self._open.values():
            task.cancel()
        self.engine.close()
        for frozen in self.resources.models.values():
            frozen.close()
        self._news.set()

    # -- groups ------------------------------------------------------------------------------
    def _check(self) -> None:
        """Re-raise what stopped a group (an engine failure, a broken env), if anything did."""
        if self._error is not None:
            raise self._error

    def _start(self, spec: GroupSpec) -> None:
        self._open[spec.task_id] = asyncio.get_running_loop().create_task(self._run_group(spec), name=spec.task_id)

    async def _run_group(self, spec: GroupSpec) -> None:
        try:
            builder = group_builder(self.task, spec.problem)
            train = self.spec.train
            group, errors = await self.runner.run_group(builder, train.group_size, task_id=spec.task_id)
            if train.overlong_cache_len is not None:
                shape_overlong([group], self.spec.sampling.max_new_tokens, train.overlong_cache_len)
            self.stats["groups"] += 1
            self.stats["reward_errors"] += errors
            self.stats["tokens"] += sum(t.num_gen_tokens for t in group.trajectories)
            del self._open[spec.task_id]
            self._done.append(group)
            self._group_done(group)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # surfaced by the next call; a poll is always waiting
            self._error = err
        finally:
            self._open.pop(spec.task_id, None)
            self._news.set()
        if self._draining and not self._open:
            self._finish_drain()

    def _group_done(self, group: Group) -> None:
        """Called as each group finishes (a hook for fault-injection tests)."""

    # -- weights -----------------------------------------------------------------------------
    def _load_latest(self, mode: str) -> None:
        version, state = self.store.latest()  # retries if a newer publish removes the one listed
        self.engine.update_weights(state, version, mode=mode)

    def _finish_drain(self) -> None:
        self._load_latest("continue")
        self._swapped(time.perf_counter() - self._drain_since)
        self._draining = False
        while self._held:
            self._start(self._held.popleft())

    def _swapped(self, pause_s: float) -> None:
        self.stats["swaps"] += 1
        self.stats["pause_s"] += pause_s


class TrainerWorker:
    """The policy of `spec` being optimised, with its optimizer; publishes every new version to
    `store`, and writes its checkpoints (keeping `checkpoints.keep_last`), KL reference and LoRA
    base under `spec.folder`. `checkpoint`: a checkpoint of this policy to start from (resume)."""

    def __init__(self, spec: PolicySpec, store, checkpoint: str | None = None, *, checkpoints: CheckpointConfig | None = None) -> None:
        self.spec = spec
        self.store = store
        self.keep_last = (checkpoints or CheckpointConfig()).keep_last
        adapter = checkpoint is not None and is_adapter_folder(checkpoint)
        if checkpoint is not None and adapter != (spec.model.lora.rank > 0):
            raise ValueError(f"checkpoint {checkpoint} {'holds' if adapter else 'holds no'} LoRA adapter but model.lora.rank={spec.model.lora.rank}; resume with the run's own config")
        if adapter:
            verify_checkpoint(Path(checkpoint))  # the adapter files are read here, not by open_session
        start = adapter_base_path(checkpoint) if adapter else checkpoint  # a LoRA checkpoint: its base, then the adapter
        self.session = open_session(spec, model_path=start, master_weights=True)  # fp32 master weights
        self.compute_dtype = getattr(torch, spec.model.dtype)  # bf16/fp16 models compute under autocast
        self._sft_steps = 0  # warm-start steps taken here (none: the weights are still model.path's)
        self._metric_lines: deque[dict] = deque()  # SFT metric lines waiting for the driver's writer (`take_metrics`)
        self._stop_sft = threading.Event()  # set when the driver gives up on a warm-start (Ctrl-C): it stops at its next step
        self._last_step: tuple[list[Group], dict[str, float], int] = ([], {}, 0)  # the last step's groups, advantages and the version they trained (`step_records`)
        self._use_model(load_adapter(self.session.model, checkpoint, trainable=True) if adapter else self.session.model)

    def _use_model(self, model: torch.nn.Module) -> None:
        """Train `model` from now on (the policy, or with LoRA the policy wrapped in its adapter)."""
        s = self.session
        s.model.zero_grad(set_to_none=True)  # the warm-start's gradients: a frozen base would keep them forever
        if model is not s.model:  # the evaluation engine must run the adapter: a fresh one over the wrapped modules
            s.engine.close()
            s.model, s.engine = model, AsyncEngine(model.get_base_model(), s.tokenizer)
        train = self.spec.train
        if is_lora(model):  # the adapter's own lr: train.lr × model.lora.lr_multiplier
            train = train.model_copy(update={"lr": train.lr * self.spec.model.lora.lr_multiplier})
        self.trainer = Trainer(model, train, self.spec.loss, self.spec.sampling, compute_dtype=self.compute_dtype)

    def describe(self) -> str:
        s = self.session
        trained = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
        rank = self.spec.model.lora.rank
        lr = f"RL lr {self.spec.train.lr:g} × {self.spec.model.lora.lr_multiplier:g}"
        lora = f" (LoRA rank {rank}, {lr}: {trained:,} trained)" if is_lora(s.model) else f" (LoRA rank {rank} added when RL starts, {lr})" if rank else ""
        return f"model: {num_parameters(s.model):,} parameters{lora} on {s.device}; task: {s.task.name}"

    def warm_start(self) -> dict[str, float]:
        """Supervised warm-start (sft.*) with a progress bar. Its metric lines ({"sft_step", "sft/loss"}
        every 10 steps, {"sft_step", "sft/accuracy_greedy"} at each evaluation) wait in `take_metrics`
        for the driver, which writes every metric of the run (`trackers.MetricsWriter`)."""
        spec, s = self.spec, self.session
        bar = Progress(spec.sft.max_steps, 0, spec.progress, desc="sft")

        def on_step(step: int, loss: float) -> None:
            if self._stop_sft.is_set():
                raise RuntimeError("the SFT warm-start was stopped by the driver")
            bar.update({"sft/loss": loss})
            if step % 10 == 0:
                self._metric_lines.append({"sft_step": step, "sft/loss": loss})

        def on_eval(step: int, accuracy: float) -> None:
            self._metric_lines.append({"sft_step": step, "sft/accuracy_greedy": accuracy})

        result = warm_start(s.model, s.tokenizer, s.task, spec.sft, chat_template=spec.model.chat_template, greedy_accuracy=s.greedy_accuracy,
                            on_step=on_step, on_eval=on_eval, compute_dtype=self.compute_dtype, context=context_policy(spec.agent.context),
                            max_obs_tokens=spec.agent.max_obs_tokens)
        self._sft_steps += result.steps
        bar.close()
        return asdict(result)

    async def warm_start_live(self) -> dict[str, float]:
        """`warm_start` in a helper thread, so that this component's loop answers `take_metrics` while
        it runs (the driver writes SFT lines as they come, in either runtime). Cancelled (the driver
        stopped: Ctrl-C), it stops the warm-start at its next step. The helper thread takes this
        process's torch thread count (run.threads): OpenMP's count is per thread, and a new thread
        would otherwise use every core (measured 5x slower SFT beside one other busy process on 2 cores)."""
        threads = torch.get_num_threads()

        def run() -> dict[str, float]:
            torch.set_num_threads(threads)
            return self.warm_start()

        try:
            return await asyncio.to_thread(run)
        except asyncio.CancelledError:
            self._stop_sft.set()
            raise

    def take_metrics(self) -> list[dict]:
        """The metric lines made since the last call, oldest first (they leave this component)."""
        lines = []
        while self._metric_lines:
            lines.append(self._metric_lines.popleft())
        return lines

    def evaluate(self) -> dict[str, Any]:
        return asdict(self.session.evaluate())

    def begin_rl(self) -> None:
        """The current weights (after any warm-start) are where RL starts.

        With LoRA (model.lora.rank > 0) they become the frozen base of a fresh adapter: model.path
        itself when no warm-start ran, else a copy stored once in <policy folder>/base/ (the adapter
        checkpoints name this folder). With train.kl_coef > 0
        they are the KL reference: with LoRA the base with the adapter disabled; otherwise a copy,
        stored once in <policy folder>/reference/ so that a resumed run uses the same one.
        """
        lora, folder = self.spec.model.lora, self.spec.folder
        if lora.rank > 0:
            if self.spec.model.path and self._sft_steps == 0:  # outside the run: named by its absolute path
                base_ref = str(Path(self.spec.model.path).expanduser().resolve())
            else:  # the run's own copy, named relative to each checkpoint (<folder>/checkpoints/step-N)
                self._save_once(folder / BASE_DIR, "the LoRA base")
                base_ref = RUN_BASE_REF
            self._use_model(attach_lora(self.session.model, lora, base_ref))
        elif self.spec.train.kl_coef > 0:
            self._save_once(folder / REFERENCE_DIR, "the KL reference")
        if self.spec.train.kl_coef > 0:
            self.trainer.set_reference()

    def _save_once(self, folder: Path, what: str) -> Path:
        """The current model in Hugging Face format in `folder`, written and later verified like a checkpoint."""
        return save_model_folder(folder, self.session.model, self.session.tokenizer, what)

    def _load_reference(self, run_dir: Path) -> None:
        folder = run_dir / REFERENCE_DIR
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"train.kl_coef={self.spec.train.kl_coef} but {folder} (the KL reference this run started from) is missing; "
                "resume with train.kl_coef=0 or start a new run"
            )
        verify_checkpoint(folder)
        reference, _ = load_pretrained(folder, dtype=next(self.session.model.parameters()).dtype)
        self.trainer.set_reference(reference.to(self.session.device))

    def publish(self) -> int:
        """Publish the current weights as the trainer's version (done after every step).

        With LoRA the engines get the merged weights W + (α/r)·B·A under the plain model's
        names: merged here for the inline runtime, from the base and the adapter's factors in
        each engine process for the process runtime (docs/benchmarks.md "LoRA": the bytes per update).
        """
        model = self.session.model
        if is_lora(model):  # the store merges: the inline one here, the file one in each engine process
            state = lora_weights(model, self.compute_dtype)
        else:
            state = {k: v.to(self.compute_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        self.store.publish(self.trainer.version, state)  # in the engines' dtype (model.dtype)
        return self.trainer.version

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """Advantages, one policy version (μ epochs × minibatches), publish. Returns float metrics;
        the groups and their advantages stay for `step_records`."""
        scored, metrics = score_groups(groups, self.spec.train, self.spec.advantage)
        metrics |= rollout_metrics(groups)
        self._last_step = (groups, scored.advantage_by_episode() if scored is not None else {}, self.trainer.version)  # the version they trained
        if scored is not None:
            metrics |= self.trainer.step(scored.collate(self.session.tokenizer.pad_token_id).to(self.session.device))
        else:
            self.trainer.version += 1  # nothing to learn from: the version still advances so steps and versions agree
        self.publish()
        return metrics

    def step_records(self, step: int, max_groups: int) -> list[dict]:
        """samples.jsonl lines (`rollout.episode_record`) of every episode of the first `max_groups`
        groups of the last `train_step`, with their advantages (None: not trained) and token texts."""
        groups, advantages, version = self._last_step
        return [
            episode_record(t, kind="train", step=step, version=version, prompt=g.prompt, answer=g.answer,
                           advantage=advantages.get(t.id), tokenizer=self.session.tokenizer)
            for g in groups[:max_groups] for t in g.trajectories
        ]

    def save_checkpoint(self, loop: LoopState, worker_rng: list) -> str:
        """<policy folder>/checkpoints/step-N: weights, optimizer, RNG, `loop` and the rollout workers' RNG states."""
        s = self.session
        return str(save_checkpoint(self.spec.folder, s.model, s.tokenizer, self.trainer.optimizer, loop, None, self.keep_last, extra={"worker_rng": worker_rng}))

    def restore(self, checkpoint: str) -> tuple[LoopState, list]:
        """Optimizer, version and RNG state of `checkpoint` (its weights were loaded at construction)."""
        state = load_state(Path(checkpoint))
        if self.spec.train.kl_coef > 0 and is_lora(self.session.model):
            self.trainer.set_reference()  # the base the adapter was loaded on, adapter disabled
        elif self.spec.train.kl_coef > 0:
            self._load_reference(Path(checkpoint).parent.parent)  # <policy folder>/checkpoints/step-N
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.trainer.version = state["loop"].version
        set_rng_state(state["rng"])
        return state["loop"], state.get("worker_rng") or []

    @torch.no_grad()
    def probe_logprobs(self, sample: Sample) -> list[float]:
        """log π(token | context) of a probe sample's tokens under the policy being trained (T=1, dropout off)."""
        s = self.session
        ids_BT = torch.tensor([[*sample.prompt_ids, *sample.token_ids]], device=s.device)
        s.model.eval()
        with compute_precision(s.device, self.compute_dtype):
            logprobs_BT = sequence_logprobs(s.model, ids_BT, torch.ones_like(ids_BT))
        return logprobs_BT[0, len(sample.prompt_ids):].float().tolist()


PROBE_TOKENS = 8  # tokens of the start-up probe (engines vs trainer)


class PolicyMismatch(RuntimeError):
    """An engine's log-probs differ from the trainer's: RL would train on another policy's samples."""


def check_probe(sample: Sample, trainer_logprobs: list[float], dtype: torch.dtype) -> float:
    """The largest |engine − trainer| log-prob over a probe's tokens; a `PolicyMismatch` line when it
    exceeds the dtype's tolerance, max(1e-3, 64·eps): 1e-3 in float32, 0.06 in float16, 0.5 in bfloat16."""
    tolerance = max(1e-3, 64 * torch.finfo(dtype).eps)
    gap = max(abs(a - b) for a, b in zip(sample.logprobs, trainer_logprobs))
    if not gap <= tolerance:  # nan fails too
        raise PolicyMismatch(
            f"the rollout engine's log-probs differ from the trainer's by up to {gap:.3g} at version {sample.versions[0]} "
            f"(tolerance {tolerance:.3g} in {str(dtype).removeprefix('torch.')}): the engines do not run the policy being trained, "
            "so RL would learn from another policy's samples; stopped before that (a LoRA placement or weight loading the engine cannot represent?)"
        )
    return gap
