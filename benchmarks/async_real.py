"""The tiny model on CPU, arithmetic task: reward against wall clock for sync, one-step-off and async.

All runs start from one shared SFT warm-start (`configs/demo.yaml`, saved once) and get the
same RL wall-clock budget (train.time_budget_s; process start-up and the evaluations before
and after are outside it and reported separately). Pipelines compared:

  sync-inline        sync mode, everything in this process (the default; 2 threads)
  sync-process       sync mode, trainer and one rollout worker as processes (1 thread each)
  one_step_off       η 1, drain, process runtime
  async              η 2, continue, decoupled PPO, process runtime

Reported per pipeline: RL steps and trained samples per second, mean rollout reward in the
first and last third of the budget, held-out sampled/greedy accuracy after RL, trainer idle
fraction, engine utilisation, staleness. On 2 cores the trainer and the engine share the
machine, so overlap buys little; this measures what it does buy here.

Usage:  .venv/bin/python benchmarks/async_real.py [--budget 60] [--seed 0] [--set run.threads=2] [--out NAME]
Writes benchmarks/results/async_real.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_figure, shared_warm_start  # noqa: E402
from policyflow import coordinator  # noqa: E402
from policyflow.config import load_config  # noqa: E402
from policyflow.logging import read_jsonl  # noqa: E402

PIPELINES: dict[str, list[str]] = {
    "sync-inline": ["pipeline.mode=sync", "pipeline.runtime=inline"],
    "sync-process": ["pipeline.mode=sync", "pipeline.runtime=process"],
    "one_step_off": ["pipeline.mode=one_step_off", "pipeline.runtime=process", "loss.name=decoupled_ppo"],
    "async": ["pipeline.mode=async", "pipeline.runtime=process", "loss.name=decoupled_ppo"],
}


def third_means(steps: list[dict], budget: float) -> tuple[float, float]:
    first = [m["rollout/reward_mean"] for m in steps if m["wall_seconds"] <= budget / 3]
    last = [m["rollout/reward_mean"] for m in steps if m["wall_seconds"] > 2 * budget / 3]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return mean(first), mean(last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="RL wall-clock seconds per pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, e.g. run.threads=2")
    parser.add_argument("--out", default="async_real", help="result file name under benchmarks/results/")
    args = parser.parse_args()
    demo = ROOT / "configs" / "demo.yaml"
    common = ["run.progress=false", "run.output_dir=runs/async-real", "run.overwrite=true"]  # a rerun replaces the last one
    sft_folder = shared_warm_start(demo, common)

    results, curves = {}, {}
    for name in args.pipelines:
        cfg = load_config(demo, [
            *common, *PIPELINES[name], *args.set, f"run.name={name}", f"run.seed={args.seed}", f"model.path={sft_folder}",
            "sft.max_steps=0", "train.steps=100000", f"train.time_budget_s={args.budget}", "eval.every=0", "checkpoint.every=0",
        ])
        start = time.perf_counter()
        summary = coordinator.train(cfg, log=lambda *_: None)
        total = time.perf_counter() - start
        steps = [m for m in read_jsonl(cfg.run_dir / "metrics.jsonl") if "rollout/reward_mean" in m]
        early, late = third_means(steps, args.budget)
        rl_seconds = steps[-1]["wall_seconds"]
        last = steps[-1]
        results[name] = {
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
        curves[name] = [(m["wall_seconds"], m["rollout/reward_mean"]) for m in steps]
        print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results[name].items() if k != "pipeline"}), flush=True)

    base = results.get("sync-inline") or next(iter(results.values()))
    for row in results.values():
        row["samples_per_s_vs_sync_inline"] = row["samples_per_s"] / base["samples_per_s"]
    out = ROOT / "benchmarks" / "results" / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"budget_s": args.budget, "seed": args.seed, "overrides": args.set, "results": results}, indent=2))
    _plot(curves, out.with_suffix(".png"))
    print(f"{'pipeline':14} steps/s  samples/s  ×sync-inline  reward first→last third  sampled acc before→after  idle  util  staleness mean/max")
    for name, r in results.items():
        print(f"{name:14} {r['steps_per_s']:7.2f}  {r['samples_per_s']:9.0f}  {r['samples_per_s_vs_sync_inline']:12.2f}  "
              f"{r['reward_first_third']:.3f} → {r['reward_last_third']:.3f}            {r['sampled_before']:.3f} → {r['sampled_after']:.3f}"
              f"             {r['trainer_idle_fraction']:.2f}  {r['engine_utilisation']:.2f}  {r['staleness_mean']:.2f}/{r['staleness_max']:.0f}")


def _plot(curves: dict[str, list[tuple[float, float]]], path: Path, window: int = 10) -> None:
    def draw(ax) -> None:
        for name, points in curves.items():
            xs, ys = zip(*points)
            smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, label=name)

    save_figure(path, draw, "RL wall time (s)", f"rollout reward (moving mean of {window} steps)")


if __name__ == "__main__":
    main()
