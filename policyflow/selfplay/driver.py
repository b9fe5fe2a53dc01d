"""What every run with roles shares (R-Zero: `rzero.py`, RLT: `rlt.py`): the run folder, the
runtime, and per role a trainer, a snapshot store, a loop state and its own files.

Each role is one policy (`PolicySpec`, its folder `runs/<name>/<role>/`): its trainer (own
optimizer), its checkpoints `<role>/checkpoints/step-N`, its `metrics.jsonl` and `samples.jsonl`,
its snapshot store and version counter. The run keeps `config.yaml`, `summary.json` and the
method's own log at its root. A role trains in phases: `SelfPlay.phase` spawns the role's rollout
workers, runs `coordinator.rl_step` for the phase's steps, stops the workers and checkpoints
the role, so that `--resume` continues from any phase boundary (or from the step Ctrl-C stopped
at) with every role's optimizer, RNG and step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from policyflow.buffer import RolloutBuffer
from policyflow.checkpoint import LoopState, latest_checkpoint
from policyflow.config import Config
from policyflow.coordinator import PolicyRun, accuracy_line, open_run_trackers, probe_engines, rl_step, save_policy_checkpoint, warm_start_logged
from policyflow.evaluate import EvalResult
from policyflow.frozen import FrozenSource
from policyflow.logging import JsonlWriter, Progress, RunTotals
from policyflow.policy import PolicySpec
from policyflow.pool import RolloutPool
from policyflow.problems import ProblemSource
from policyflow.runtime import Handle, make_runtime
from policyflow.rundir import RunFolder, RunInterrupted, StopOnCtrlC, open_run_folder
from policyflow.session import pick_device
from policyflow.threads import thread_share
from policyflow.trackers import MetricsWriter, check_trackers
from policyflow.weights import FileSnapshotStore, SnapshotStore
from policyflow.workers import TrainerWorker


@dataclass
class Role:
    """One policy of the run as the driver holds it between phases."""

    spec: PolicySpec
    store: Any  # its snapshot store: in memory (inline runtime) or files under <run>/snapshots/<role>/
    trainer: Handle
    loop: LoopState
    metrics: MetricsWriter  # <run>/<role>/metrics.jsonl (and the run's other trackers)
    samples_log: JsonlWriter
    worker_rng: list  # its rollout workers' RNG states, carried from phase to phase (and in its checkpoints)
    wall_start: float  # perf_counter() when its RL clock read 0

    async def publish(self) -> None:
        """Its current weights (version loop.version) in its store, where its engines and frozen copies read them."""
        if self.loop.version not in self.store:
            await self.trainer.call("publish")

    async def frozen(self) -> FrozenSource:
        """Its current weights as a frozen model's source (`frozen.FrozenModel.open`), published first."""
        await self.publish()
        return FrozenSource(self.spec, self.store)

    def summary(self) -> dict:
        """summary.json's section of this role."""
        final = latest_checkpoint(self.spec.folder)
        return {"steps": self.loop.step, "folder": str(self.spec.folder), "final_checkpoint": str(final) if final else None}


class SelfPlay:
    """The run folder, the runtime and the roles of one run with roles. Use `async with`."""

    def __init__(self, cfg: Config, folder: RunFolder, stop: StopOnCtrlC, log: Callable[[str], None]) -> None:
        self.cfg, self.folder, self.stop, self.log = cfg, folder, stop, log
        p = cfg.pipeline
        self.threads = thread_share(cfg.run.threads, processes=1 + p.rollout_workers if p.runtime == "process" else 1)
        torch.set_num_threads(self.threads if p.runtime == "inline" else 1)  # as `coordinator._run_rl`: the driver computes little in the process runtime
        self.runtime = make_runtime(p.runtime)
        self.roles: dict[str, Role] = {}

    @property
    def resumed(self) -> bool:
        return bool(self.folder.role_checkpoints)

    async def open_role(self, name: str, job: str, steps: int) -> Role:
        """Spawn the trainer of role `name` doing `job` (`selfplay.jobs`), for `steps` RL steps in the
        whole run; restored from its checkpoint when the run resumes."""
        cfg, p = self.cfg, self.cfg.pipeline
        spec = PolicySpec.of(cfg, name, self.folder.path)
        spec = dataclasses.replace(spec, job=job, train=spec.train.model_copy(update={"steps": steps}))
        keep = p.max_lag + 2
        store = SnapshotStore(keep) if p.runtime == "inline" else FileSnapshotStore(self.folder.path / "snapshots" / name, keep)
        checkpoint = self.folder.role_checkpoints.get(name)
        trainer = await self.runtime.spawn(TrainerWorker, spec, store, str(checkpoint) if checkpoint else None, checkpoints=cfg.checkpoint, name=f"trainer-{name}", cpus=self.threads)
        if checkpoint is None:
            loop, worker_rng = LoopState(), []
        else:
            loop, worker_rng = await trainer.call("restore", str(checkpoint))
        metrics = open_run_trackers(cfg, spec.folder, first_step=loop.step + 1 if checkpoint else 0)
        role = Role(spec, store, trainer, loop, metrics, JsonlWriter(spec.folder / "samples.jsonl"), worker_rng, time.perf_counter() - loop.wall_seconds)
        self.roles[name] = role
        self.log(f"{name}: {await trainer.call('describe')}" + (f"; resumed from {checkpoint} at step {loop.step}" if checkpoint else ""))
        return role

    async def start(self, role: Role, *, evaluate: bool) -> None:
        """A fresh role: its warm-start (sft.*), where RL starts (`begin_rl`), the evaluation before RL
        (`evaluate`), and checkpoint step-0, so that a resume finds every role."""
        name = role.spec.role
        if role.spec.sft.max_steps > 0:
            sft = await warm_start_logged(role.trainer, role.metrics)
            self.log(f"{name}: SFT warm-start: {sft['steps']} steps, {sft['seconds']:.0f}s, greedy held-out accuracy {sft['accuracy_greedy']:.1%}")
        await role.trainer.call("begin_rl")
        if evaluate:
            role.loop.eval_before = await role.trainer.call("evaluate")
            role.metrics.write({"step": 0, "wall_seconds": 0.0, **EvalResult(**role.loop.eval_before).as_metrics()})
            self.log(f"{name}: " + accuracy_line("before self-play", role.loop.eval_before))
        await role.trainer.call("save_checkpoint", role.loop, [])

    async def phase(self, role: Role, steps: int, *, source: ProblemSource | None = None, models: dict | None = None, label: str = "") -> None:
        """`steps` RL steps of `role` on problems from `source` (default: its task's training set),
        its workers holding the frozen models `models` (name -> `frozen.FrozenSource`), each step's
        metric line written to the role's metrics; the role is checkpointed at the end."""
        spec, p, loop = role.spec, self.cfg.pipeline, role.loop
        await role.publish()  # version loop.version, which the phase's engines start from
        buffer = RolloutBuffer(
            spec.train.prompts_per_step, p.eta, p.eta_hard, filters=("dynamic_sampling",) if spec.train.dynamic_sampling else (),
            refill_limit=spec.train.max_resample_rounds * spec.train.prompts_per_step, start_version=loop.version,
        )
        pool = RolloutPool(self.runtime, spec, p, role.store, buffer, next_index=loop.next_problem, rng_states=role.worker_rng,
                           cpus=self.threads, source=source, worker_kwargs={"models": models} if models else None)
        run = PolicyRun(spec, role.trainer, pool, buffer, loop, RunTotals(loop.counters), role.samples_log,
                        Progress(loop.step + steps, loop.step, spec.progress, desc=label or spec.role),
                        checkpoint_every=self.cfg.checkpoint.every, samples_every=self.cfg.run.samples_every, wall_start=role.wall_start)
        self.stop.graceful = True  # from here Ctrl-C finishes the current step, checkpoints the role and stops
        try:
            await pool.start(before_producing=lambda: probe_engines(role.trainer, pool, loop.version, spec))
            for i in range(steps):
                line = await rl_step(run, self.stop, advance=i < steps - 1)
                if line is None:
                    break
                role.metrics.write(line)
                if self.stop.requested:
                    break
            run.progress.close()
            await pool.stop()
            role.worker_rng = await pool.rng_states()
            await save_policy_checkpoint(run)
        finally:
            await pool.stop()
        if self.stop.requested:
            raise RunInterrupted(f"interrupted at {spec.role} step {loop.step}; resume with `policyflow train --resume {self.folder.path}`", self.stop.signum)

    async def evaluate(self, role: Role) -> dict:
        return await role.trainer.call("evaluate")

    async def close(self) -> None:
        await self.runtime.shutdown()
        for role in self.roles.values():
            role.metrics.close()


def write_atomic(path: Path, text: str) -> None:
    """`text` to `path` through a temporary file renamed into place: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _rzero(selfplay: SelfPlay) -> dict:
    from policyflow.selfplay.rzero import rzero  # the methods import this module

    return await rzero(selfplay)


async def _rlt(selfplay: SelfPlay) -> dict:
    from policyflow.selfplay.rlt import rlt

    return await rlt(selfplay)


METHODS = {"rzero": _rzero, "rlt": _rlt}  # selfplay.method -> the driver of its run


async def run_with_roles(cfg: Config, method: Callable, *, resume: Path | None = None, log=print) -> dict:
    """Open the run folder (locked; a resume finds every role's checkpoint), write config.yaml, run
    `method(selfplay)`, and write the summary it returns to summary.json at the run's root."""
    pick_device(PolicySpec.of(cfg, next(iter(cfg.roles))))  # run.device=cuda without a GPU fails here, before anything is written
    check_trackers(cfg.run.trackers)
    folder = open_run_folder(cfg, resume)
    try:
        for note in folder.notes:
            log(note)
        (folder.path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        with StopOnCtrlC(folder.path) as stop:
            selfplay = SelfPlay(cfg, folder, stop, log)
            try:
                summary = await method(selfplay)
            finally:
                await selfplay.close()
        (folder.path / "summary.json").write_text(json.dumps(summary, indent=2))
        log(f"summary: {folder.path / 'summary.json'}")
        return summary
    finally:
        folder.close()

