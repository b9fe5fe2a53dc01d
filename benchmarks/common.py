"""Shared by the benchmarks that train: one SFT warm-start per results folder, pipelines run
for a fixed RL wall-clock budget from it (`train_pipeline`), and a PNG figure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from policyflow import coordinator
from policyflow.config import load_config
from policyflow.coordinator import run_sft
from policyflow.logging import read_jsonl
from policyflow.workers import RolloutWorker

PIPELINES: dict[str, list[str]] = {
    "sync-inline": ["pipeline.mode=sync", "pipeline.runtime=inline"],
    "sync-process": ["pipeline.mode=sync", "pipeline.runtime=process"],
    "one_step_off": ["pipeline.mode=one_step_off", "pipeline.runtime=process", "loss.name=decoupled_ppo"],
    "async": ["pipeline.mode=async", "pipeline.runtime=process", "loss.name=decoupled_ppo"],
}


def shared_warm_start(preset: Path, common: list[str]) -> Path:
    """The SFT model of `preset` under `common` overrides, trained once and reused (<output_dir>/sft/sft)."""
    cfg = load_config(preset, [*common, "run.name=sft"])
    folder = cfg.run_dir / "sft"
    if not (folder / "config.json").is_file():
        run_sft(cfg)
    return folder


def save_figure(path: Path, draw: Callable, xlabel: str, ylabel: str) -> None:
    """`draw(ax)` adds the data; axes labels, legend and grid are added here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def third_means(steps: list[dict], budget: float) -> tuple[float, float]:
    """Mean rollout reward over the first and the last third of the RL budget."""
    first = [m["rollout/reward_mean"] for m in steps if m["wall_seconds"] <= budget / 3]
    last = [m["rollout/reward_mean"] for m in steps if m["wall_seconds"] > 2 * budget / 3]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return mean(first), mean(last)


def train_pipeline(
    preset: Path, name: str, overrides: list[str], sft_folder: Path, budget: float, seed: int, worker_cls: type = RolloutWorker,
) -> tuple[dict, list[dict]]:
    """RL from `sft_folder` under `PIPELINES[name]` for `budget` wall seconds (no evaluation during
    it), with `worker_cls` as the rollout worker; returns the pipeline's figures and its per-step metrics."""
    cfg = load_config(preset, [
        *overrides, *PIPELINES[name], f"run.name={name}", f"run.seed={seed}", f"model.path={sft_folder}",
        "sft.max_steps=0", "train.steps=100000", f"train.time_budget_s={budget}", "eval.every=0", "checkpoint.every=0",
    ])
    start = time.perf_counter()
    summary = asyncio.run(coordinator.run_rl(cfg, log=lambda *_: None, worker_cls=worker_cls))
    total = time.perf_counter() - start
    steps = [m for m in read_jsonl(cfg.run_dir / "metrics.jsonl") if "rollout/reward_mean" in m]
    early, late = third_means(steps, budget)
    rl_seconds, last = steps[-1]["wall_seconds"], steps[-1]
    row = {
        "steps": summary["steps"],
        "rl_seconds": rl_seconds,
        "total_seconds": total,
        "steps_per_s": summary["steps"] / rl_seconds,
        "samples_per_s": summary["steps"] * cfg.train.prompts_per_step * cfg.train.group_size / rl_seconds,
        "reward_first_third": early,
        "reward_last_third": late,
        "sampled_before": summary["eval_before"]["accuracy_sampled"],
        "sampled_after": summary["eval_after"]["accuracy_sampled"],
        "greedy_after": summary["eval_after"]["accuracy_greedy"],
        "trainer_idle_fraction": last["async/trainer_idle_fraction"],
        "engine_utilisation": last["async/engine_utilisation"],
        "staleness_mean": sum(m["async/staleness_mean"] for m in steps) / len(steps),
        "staleness_max": max(m["async/staleness_max"] for m in steps),
        "pipeline": summary["pipeline"],
    }
    return row, steps
