"""The driver: warm-start, then the RL loop — read it top to bottom.

One loop for every mode (DESIGN.md §4). Rollout workers generate continuously; the buffer's
admission bound decides how far ahead of the trainer they may run:

    for each step:  wait for the oldest B finished groups  →  one trainer step (version v+1,
                    published to the snapshot store)  →  eval, checkpoint  →  engines take the
                    new weights  →  the admission window moves one batch

sync (η 0, drain) admits B groups only once the weights of v are in every engine, so each
batch is sampled entirely by the current policy; one_step_off (η 1, drain) samples batch v+1
while batch v trains; async (η ≥ 1, continue) keeps engines busy and swaps weights between
decode steps. The runtime (inline or process) only decides where the trainer and the
workers run.

The components serve one policy (`policy.PolicySpec`); a one-policy run is the one-role case.
One step of one policy is `rl_step(PolicyRun)`, which `_run_rl` calls in its loop and a
self-play driver can call for either role.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from policyflow.agent.context import context_policy
from policyflow.buffer import RolloutBuffer
from policyflow.checkpoint import LoopState, check_destination, save_model_folder
from policyflow.config import Config, ConfigError
from policyflow.evaluate import EvalResult, write_report
from policyflow.logging import JsonlWriter, Progress, RunTotals, plot_run
from policyflow.policy import PolicySpec
from policyflow.pool import RolloutPool, task_index
from policyflow.runtime import Handle, make_runtime
from policyflow.rundir import RunFolder, RunInterrupted, RunLock, StopOnCtrlC, open_run_folder
from policyflow.session import configured_evaluation, open_endpoint, open_session, pick_device
from policyflow.sft import warm_start
from policyflow.threads import configure_threads, thread_share
from policyflow.trackers import MetricsWriter, check_trackers, open_trackers
from policyflow.weights import FileSnapshotStore, SnapshotStore
from policyflow.workers import RolloutWorker, TrainerWorker, check_probe


def train(cfg: Config, *, resume: Path | None = None, log=print) -> dict:
    """Warm-start (fresh runs), then RL for `train.steps` steps; returns the summary written to summary.json.
    A config with roles runs its self-play method instead (`selfplay.METHODS[selfplay.method]`)."""
    if cfg.roles:
        if cfg.selfplay.method == "none":
            raise ConfigError(f"roles ({', '.join(cfg.roles)}) are trained by a self-play method: set selfplay.method=rzero (roles challenger and solver) or rlt (teacher and student), or remove roles")
        from policyflow.selfplay.driver import METHODS, run_with_roles  # the self-play drivers import this module

        return asyncio.run(run_with_roles(cfg, METHODS[cfg.selfplay.method], resume=resume, log=log))
    return asyncio.run(run_rl(cfg, resume=resume, log=log))


async def run_rl(cfg: Config, *, resume: Path | None = None, log=print, worker_cls: type = RolloutWorker) -> dict:
    """`train` as a coroutine; `worker_cls` replaces the rollout worker (fault-injection tests)."""
    pick_device(PolicySpec.of(cfg))  # run.device=cuda without a GPU fails here, before anything is written
    check_trackers(cfg.run.trackers)  # and so does run.trackers=[wandb] without wandb installed
    folder = open_run_folder(cfg, resume)  # locked until the run ends
    try:
        for note in folder.notes:
            log(note)
        (folder.path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        with StopOnCtrlC(folder.path) as stop:
            return await _run_rl(cfg, folder, log, worker_cls, stop)
    finally:
        folder.close()  # snapshot files removed, lock released


async def _run_rl(cfg: Config, folder: RunFolder, log, worker_cls: type, stop: StopOnCtrlC) -> dict:
    run_dir, checkpoint = folder.path, folder.checkpoint
    spec = PolicySpec.of(cfg, run_dir=run_dir)  # the one role; its folder is the run folder
    p, B = cfg.pipeline, spec.train.prompts_per_step
    threads = thread_share(cfg.run.threads, processes=1 + p.rollout_workers if p.runtime == "process" else 1)
    torch.set_num_threads(threads if p.runtime == "inline" else 1)  # the driver itself computes little in the process runtime
    keep = p.max_lag + 2
    store = SnapshotStore(keep) if p.runtime == "inline" else FileSnapshotStore(run_dir / "snapshots", keep)
    samples_log = JsonlWriter(run_dir / "samples.jsonl")
    runtime = make_runtime(p.runtime)
    pool: RolloutPool | None = None
    metrics_log: MetricsWriter | None = None  # every metric line, SFT's included, goes through it to every tracker (run.trackers)
    try:
        trainer = await runtime.spawn(TrainerWorker, spec, store, str(checkpoint) if checkpoint else None, checkpoints=cfg.checkpoint, name="trainer", cpus=threads)
        log(f"{await trainer.call('describe')}; pipeline: {p.mode} (η {p.eta}, η_hard {p.eta_hard}, {p.swap_mode}), {p.rollout_workers} rollout worker(s), {p.runtime} runtime; run folder: {run_dir}")
        if checkpoint is None:
            loop, worker_rng = LoopState(), []
            metrics_log = open_run_trackers(cfg, run_dir, first_step=0)
            if spec.sft.max_steps > 0:
                sft = await warm_start_logged(trainer, metrics_log)
                log(f"SFT warm-start: {sft['steps']} steps, {sft['seconds']:.0f}s, greedy held-out accuracy {sft['accuracy_greedy']:.1%}")
            await trainer.call("begin_rl")  # the KL reference (and with LoRA the adapter's base) is the model RL starts from
            loop.eval_before = await trainer.call("evaluate")
            metrics_log.write({"step": 0, "wall_seconds": 0.0, **EvalResult(**loop.eval_before).as_metrics()})
            log(accuracy_line("before RL", loop.eval_before))
        else:
            loop, worker_rng = await trainer.call("restore", str(checkpoint))
            metrics_log = open_run_trackers(cfg, run_dir, first_step=loop.step + 1)
            log(f"resumed from {checkpoint} at step {loop.step}; {len(loop.in_flight_task_ids)} group(s) in flight then are dropped")
            metrics_log.write({"resumed_at_step": loop.step, "checkpoint": str(checkpoint), "overrides": folder.resume_overrides})
        totals = RunTotals(loop.counters)  # cumulative counters continue from the checkpoint's
        await trainer.call("publish")  # version loop.version, which every engine starts from
        buffer = RolloutBuffer(
            B, p.eta, p.eta_hard, filters=("dynamic_sampling",) if spec.train.dynamic_sampling else (),
            refill_limit=spec.train.max_resample_rounds * B, start_version=loop.version,
        )
        pool = RolloutPool(runtime, spec, p, store, buffer, next_index=loop.next_problem, worker_cls=worker_cls, rng_states=worker_rng, cpus=threads)
        await pool.start(before_producing=lambda: probe_engines(trainer, pool, loop.version, spec))  # a bad weight hand-over stops the run here

        run = PolicyRun(
            spec, trainer, pool, buffer, loop, totals, samples_log, Progress(spec.train.steps, loop.step, spec.progress),
            checkpoint_every=cfg.checkpoint.every, samples_every=cfg.run.samples_every,
            wall_start=time.perf_counter() - loop.wall_seconds, checkpointed_at=loop.step if checkpoint else None,
        )
        pending: dict | None = None  # the last step's metrics line, written together with the final evaluation
        last = run.finished()
        stop.graceful = True  # from here Ctrl-C finishes the current step and records it
        while not last and not stop.requested:
            line = await rl_step(run, stop)
            if line is None:  # Ctrl-C while waiting for the batch: the step did not begin
                break
            last = run.finished() or stop.requested  # a Ctrl-C stop records this step whatever run.log_every says
            if last:
                pending = line
            elif loop.step % cfg.run.log_every == 0:
                metrics_log.write(line)
        run.progress.close()
        if stop.requested:  # Ctrl-C: the last completed step is recorded (metrics line and checkpoint), then stop
            if pending is not None:
                metrics_log.write(pending)
            if run.checkpointed_at != loop.step:
                await save_policy_checkpoint(run)
            raise RunInterrupted(f"interrupted at step {loop.step}; resume with `policyflow train --resume {run_dir}`", stop.signum)
        await pool.stop()

        eval_after = await trainer.call("evaluate")
        loop.wall_seconds = time.perf_counter() - run.wall_start
        if pending is not None:  # one line per step: the last step's metrics and the final evaluation
            metrics_log.write(pending | EvalResult(**eval_after).as_metrics())  # wall_seconds: when the step ended
        final = await save_policy_checkpoint(run)
    finally:
        if pool is not None:
            await pool.stop()
        await runtime.shutdown()
        if metrics_log is not None:
            metrics_log.close()

    plot = plot_run(run_dir / "metrics.jsonl", run_dir / "plot.png")
    ledger = buffer.ledger()
    summary = {
        "eval_before": loop.eval_before,
        "eval_after": eval_after,
        "wall_seconds": loop.wall_seconds,
        "final_checkpoint": final,
        "steps": loop.step,
        "plot": str(plot) if plot else None,
        "pipeline": pipeline_summary(p),
        "groups": {name: len(getattr(ledger, name)) for name in ("trained", "buffered", "running", "requeued", "filtered", "stale")},
        "async": {k: v for k, v in totals.of(buffer.metrics() | pool.metrics()).items() if k.startswith("async/")},
        "resume_overrides": folder.resume_overrides,
    }
    if spec.eval.report:  # the final model's full report, by `policyflow eval`'s own path (off in the timed demos)
        summary["eval_report"] = str(eval_report(cfg, Path(final), step=loop.step)[1])
        log(f"evaluation report: {summary['eval_report']}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(accuracy_line("after RL ", eval_after))
    log(f"plot: {plot}\nsummary: {run_dir / 'summary.json'}\ncheckpoint: {final}")
    return summary


def pipeline_summary(p) -> dict:
    """summary.json's `pipeline`: how the run's rollouts and training were scheduled (pipeline.*)."""
    return {"mode": p.mode, "runtime": p.runtime, "eta": p.eta, "eta_hard": p.eta_hard, "swap": p.swap_mode, "max_lag": p.max_lag, "rollout_workers": p.rollout_workers}


@dataclass
class PolicyRun:
    """One policy's RL as the driver holds it: its trainer and rollout pool, the buffer between
    them, its loop state, counters and samples log, and the step's clocks. `rl_step` moves it
    one step; a self-play driver holds one per role and steps whichever role's turn it is."""

    spec: PolicySpec
    trainer: Handle
    pool: RolloutPool
    buffer: RolloutBuffer
    loop: LoopState
    totals: RunTotals
    samples_log: JsonlWriter
    progress: Progress
    checkpoint_every: int  # checkpoint.every (0: only at the end)
    samples_every: int  # run.samples_every
    wall_start: float  # perf_counter() when this policy's RL clock (loop.wall_seconds) read 0
    checkpointed_at: int | None = None  # the step of the last checkpoint written or resumed from
    loop_start: float = field(default_factory=time.perf_counter)  # this process's first step: trainer idle fraction
    idle_s: float = 0.0  # waiting for batches since loop_start
    tokens_before: float = 0.0  # rollout/generated_tokens at the last step (tokens per second)
    probed_trained: bool = False  # engines are probed again once one holds a version this run trained (LoRA's B is 0 before)

    def finished(self) -> bool:
        """train.steps done, or train.time_budget_s spent."""
        budget = self.spec.train.time_budget_s or float("inf")
        return self.loop.step >= self.spec.train.steps or time.perf_counter() - self.wall_start >= budget


async def rl_step(run: PolicyRun, stop: StopOnCtrlC, *, advance: bool = True) -> dict | None:
    """One RL step of one policy: wait for a batch → train_step → eval, checkpoint → weight update →
    its metrics line, which is returned for the caller to write (None: Ctrl-C came while waiting,
    and the step did not begin). `advance=False` (a self-play phase's last step): the engines keep
    their weights and no new group is admitted, since the pool stops after this step."""
    spec, trainer, pool, buffer, loop = run.spec, run.trainer, run.pool, run.buffer, run.loop
    B = spec.train.prompts_per_step
    step_start = time.perf_counter()
    # 1. The oldest B finished groups; the time spent waiting is trainer idle time.
    #    Ctrl-C here stops before the step begins; during steps 2-5 it lets the step finish.
    groups = await stop.unless_requested(pool.guard(buffer.wait_for_batch(B, loop.version)))
    if groups is None:
        return None
    run.idle_s += time.perf_counter() - step_start
    groups.sort(key=lambda g: task_index(g.task_id))  # issue order: a batch does not depend on finishing order
    # 2. One policy version: advantages, μ epochs × minibatches, the new weights published.
    metrics = await trainer.call("train_step", groups)
    loop.step, loop.version = loop.step + 1, loop.version + 1
    # 3. Bookkeeping before new groups start (in sync mode nothing is in flight now).
    if spec.eval.every and loop.step % spec.eval.every == 0 and loop.step < spec.train.steps:
        metrics |= EvalResult(**await trainer.call("evaluate")).as_metrics()
    loop.wall_seconds = time.perf_counter() - run.wall_start
    if run.checkpoint_every and loop.step % run.checkpoint_every == 0 and loop.step < spec.train.steps:
        await save_policy_checkpoint(run)
        run.checkpointed_at = loop.step
    # 4. Engines take the new weights (eagerly, or when they lag more than max_lag), then
    #    the admission window moves one batch.
    if advance:
        await advance_pool(run, metrics)
    # 5. Metrics: this batch, the buffer (staleness, waste), the engines, the clock.
    pool_metrics = pool.metrics()
    now = time.perf_counter()
    metrics |= buffer.metrics() | pool_metrics | {
        "async/trainer_idle_fraction": run.idle_s / max(now - run.loop_start, 1e-9),
        "perf/step_seconds": now - step_start,
        "perf/rollout_tokens_per_s": (pool_metrics["rollout/generated_tokens"] - run.tokens_before) / max(now - step_start, 1e-9),
    }
    run.tokens_before = pool_metrics["rollout/generated_tokens"]
    line = {"step": loop.step, "wall_seconds": loop.wall_seconds, **run.totals.of(metrics)}
    if loop.step % run.samples_every == 0:  # whole episodes of the first SAMPLE_GROUPS groups (docs/trackers.md)
        for record in await trainer.call("step_records", loop.step, SAMPLE_GROUPS):
            run.samples_log.write(record)
    run.progress.update(metrics)
    return line


async def advance_pool(run: PolicyRun, metrics: dict) -> None:
    """Engines take the new weights (probed once a trained version reaches them), then the
    admission window moves one batch (`rl_step`'s part 4)."""
    await run.pool.update_weights(run.loop.version)
    if not run.probed_trained:  # before new groups start (sync: the engines are idle)
        gap = await probe_engines(run.trainer, run.pool, run.loop.version, run.spec)
        run.probed_trained = gap is not None
        metrics |= {"async/probe_logprob_gap": gap} if run.probed_trained else {}
    run.buffer.set_version(run.loop.version)


async def probe_engines(trainer, pool: RolloutPool, version: int, spec: PolicySpec) -> float | None:
    """The engines holding `version` continue a prompt greedily and the trainer recomputes the
    log-probs (`workers.check_probe`): a `PolicyMismatch` line when they disagree beyond the
    dtype's tolerance. Returns the largest gap seen, or None when no engine holds `version`."""
    gaps = []
    for sample in await pool.probes(version):
        gaps.append(check_probe(sample, await trainer.call("probe_logprobs", sample), getattr(torch, spec.model.dtype)))
    return max(gaps) if gaps else None


async def save_policy_checkpoint(run: PolicyRun) -> str:
    """Weights, optimizer, RNG (trainer and engines) and the loop state, in the policy's folder; in-flight groups are recorded as dropped."""
    ledger = run.buffer.ledger()
    run.loop.next_problem = run.pool.next_index
    run.loop.counters = run.totals.counters(run.buffer.metrics() | run.pool.metrics())
    run.loop.in_flight_task_ids = sorted(ledger.running | ledger.buffered | ledger.requeued)
    return await run.trainer.call("save_checkpoint", run.loop, await run.pool.rng_states())


def accuracy_line(label: str, result: dict) -> str:
    splits = ", ".join(f"{k} {v:.1%}" for k, v in result.get("accuracy_sampled_by_split", {}).items())
    return f"held-out accuracy {label}: greedy {result['accuracy_greedy']:.1%}, sampled {result['accuracy_sampled']:.1%}" + (f" ({splits})" if splits else "")


SAMPLE_GROUPS = 4  # groups per written step in samples.jsonl, each with all its episodes (run.samples_every)


def open_run_trackers(cfg: Config, run_dir: Path, first_step: int) -> MetricsWriter:
    return open_trackers(run_dir, cfg.run.trackers, first_step=first_step, run_name=run_dir.name, config=cfg.model_dump(mode="json"))


async def warm_start_logged(trainer, metrics_log: MetricsWriter, poll_s: float = 0.5) -> dict:
    """The trainer's SFT warm-start, its metric lines written through `metrics_log` as they come
    (polled every `poll_s` while it runs in the trainer's helper thread: `warm_start_live`)."""
    sft = asyncio.ensure_future(trainer.call("warm_start_live"))
    try:
        while not sft.done():
            await asyncio.wait({sft}, timeout=poll_s)
            metrics_log.write_all(await trainer.call("take_metrics"))
    finally:
        if not sft.done():  # the driver stops (Ctrl-C): so does the warm-start, at its next step
            sft.cancel()
    return sft.result()


def run_sft(cfg: Config, log=print) -> Path:
    """Warm-start only; the model is saved in Hugging Face format to runs/<name>/sft.

    An existing runs/<name>/sft is refused before any work unless run.overwrite=true; the run
    folder is locked meanwhile, and the model is written beside it and renamed into place.
    """
    out, spec = cfg.run_dir / "sft", PolicySpec.of(cfg)
    pick_device(spec)  # run.device=cuda without a GPU fails here, before anything is written
    check_destination(out, reads=Path(cfg.model.path) if cfg.model.path else None, overwrite=cfg.run.overwrite, how="run.overwrite=true")
    configure_threads(cfg.run.threads)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(cfg.run_dir)
    note = lock.acquire()
    if note:
        log(note)
    try:
        session = open_session(spec, master_weights=True)
        result = warm_start(
            session.model, session.tokenizer, session.task, spec.sft, chat_template=spec.model.chat_template,
            greedy_accuracy=session.greedy_accuracy, compute_dtype=getattr(torch, spec.model.dtype),
            context=context_policy(spec.agent.context), max_obs_tokens=spec.agent.max_obs_tokens,
            on_eval=lambda step, accuracy: log(f"SFT step {step}: greedy held-out accuracy {accuracy:.1%}"),
        )
        folder = save_model_folder(out, session.model, session.tokenizer, "the SFT model")
    finally:
        lock.release()
    log(f"SFT: {result.steps} steps, loss {result.final_loss:.3f}, greedy held-out accuracy {result.accuracy_greedy:.1%}; saved to {folder}")
    return folder


def run_eval(cfg: Config, model_path: Path | None = None, *, endpoint: str | None = None, endpoint_model: str | None = None, log=print) -> dict:
    """`policyflow eval`: the headline (`EvalResult` as a dict; the CLI prints it as one JSON line)
    of `eval_report`, whose folder is logged."""
    result, folder = eval_report(cfg, model_path, endpoint=endpoint, endpoint_model=endpoint_model)
    log(f"evaluation report: {folder}")
    return asdict(result)


def eval_report(cfg: Config, model_path: Path | None = None, *, endpoint: str | None = None, endpoint_model: str | None = None, step: int = 0) -> tuple[EvalResult, Path]:
    """The full evaluation of a model folder (`model_path`, else model.path, else the tiny model) or
    of the model behind an OpenAI-compatible `endpoint` (`session.open_endpoint`), written to a new
    folder under runs/<name>/eval/ (`evaluate.write_report`); returns the headline and the folder."""
    configure_threads(cfg.run.threads)
    spec = PolicySpec.of(cfg)
    if endpoint:
        runner, task, problems, tokenizer = open_endpoint(spec, endpoint, endpoint_model, model_path)
        try:
            evaluation = configured_evaluation(spec, runner, task, problems)
        finally:
            runner.generator.close()
    else:
        session = open_session(spec, model_path=model_path)
        runner, task, problems, tokenizer = session.runner, session.task, session.eval_problems, session.tokenizer
        evaluation = configured_evaluation(spec, runner, task, problems)
    return evaluation.result, write_report(cfg.run_dir, evaluation, task, tokenizer=tokenizer, step=step)
