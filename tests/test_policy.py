"""A component serves one policy (DESIGN.md §5): `PolicySpec`, the one-role run's files where they
always were, and the components and `rl_step` serving another role under its own folder."""

import asyncio
import json
import pickle
import time

from policyflow.buffer import RolloutBuffer
from policyflow.checkpoint import LoopState
from policyflow.coordinator import PolicyRun, rl_step, train
from policyflow.logging import JsonlWriter, Progress, RunTotals
from policyflow.policy import PolicySpec
from policyflow.pool import RolloutPool
from policyflow.rundir import StopOnCtrlC
from policyflow.runtime import make_runtime
from policyflow.weights import SnapshotStore
from policyflow.workers import TrainerWorker


def test_the_one_role_is_the_run_folder_and_another_role_has_its_own(small_config) -> None:
    cfg = small_config()
    one = PolicySpec.of(cfg)
    assert one.role == "policy" and one.folder == cfg.run_dir
    solver = PolicySpec.of(cfg, "solver")
    assert solver.role == "solver" and solver.folder == cfg.run_dir / "solver"
    assert (solver.model, solver.task, solver.train, solver.advantage, solver.seed, solver.device) == (cfg.model, cfg.task, cfg.train, cfg.advantage, cfg.run.seed, cfg.run.device)
    assert PolicySpec.of(cfg, run_dir=cfg.run_dir.parent / "moved").folder == cfg.run_dir.parent / "moved"  # a resumed run where it is now
    assert pickle.loads(pickle.dumps(solver)) == solver  # it crosses the process runtime's boundary


def test_a_one_role_run_writes_its_files_where_they_always_were(small_config) -> None:
    cfg = small_config("train.kl_coef=0.05", "checkpoint.every=1", "run.samples_every=1")
    summary = train(cfg, log=lambda *_: None)
    run = cfg.run_dir
    written = {p.name for p in run.iterdir()} - {"run.lock"}
    assert written == {"config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "plot.png", "checkpoints", "reference"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert summary["final_checkpoint"] == str(run / "checkpoints" / "step-2") and summary["steps"] == 2
    assert json.loads((run / "summary.json").read_text())["pipeline"]["mode"] == "sync"


def test_the_components_and_rl_step_serve_a_role_under_its_own_folder(small_config) -> None:
    """What a self-play driver does for one role: a trainer, a pool and `rl_step` on the spec of
    role "solver"; everything the policy writes lands under runs/<name>/solver/."""
    cfg = small_config("train.kl_coef=0.05", "checkpoint.every=1")
    spec = PolicySpec.of(cfg, "solver")
    B = spec.train.prompts_per_step

    async def two_steps() -> list[dict]:
        runtime = make_runtime("inline")
        store = SnapshotStore(keep=2)
        pool = None
        try:
            trainer = await runtime.spawn(TrainerWorker, spec, store, checkpoints=cfg.checkpoint, name="trainer")
            await trainer.call("begin_rl")
            await trainer.call("publish")
            buffer = RolloutBuffer(B, 0, 0)
            pool = RolloutPool(runtime, spec, cfg.pipeline, store, buffer, next_index=0)
            await pool.start()
            run = PolicyRun(
                spec, trainer, pool, buffer, LoopState(), RunTotals({}), JsonlWriter(spec.folder / "samples.jsonl"),
                Progress(spec.train.steps, 0, enabled=False), checkpoint_every=1, samples_every=1, wall_start=time.perf_counter(),
            )
            lines, stop = [], StopOnCtrlC(spec.folder)
            while not run.finished():
                lines.append(await rl_step(run, stop))
            return lines
        finally:
            if pool is not None:
                await pool.stop()
            await runtime.shutdown()

    lines = asyncio.run(two_steps())
    assert [line["step"] for line in lines] == [1, 2] and all("rollout/reward_mean" in line for line in lines)
    folder = cfg.run_dir / "solver"
    assert (folder / "reference" / "config.json").is_file()
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-1"]  # the last step's is the driver's, after the final evaluation
    assert not (cfg.run_dir / "checkpoints").exists() and not (cfg.run_dir / "reference").exists()
