"""Every objective from the same warm-start, under the same wall-clock budget, over seeds.

1. One SFT warm-start with `configs/demo.yaml` (saved once to runs/compare-sft/sft).
2. For each objective and seed: RL from that checkpoint for `--budget` seconds of wall clock
   (train.time_budget_s; evaluation every `--eval-every` steps counts against the budget for
   every objective alike), then the held-out evaluation.
3. A table per objective (median over seeds): held-out sampled and greedy accuracy after RL,
   mean response length, clip fraction; and a plot of held-out sampled accuracy against time.

Objectives: the seven policy losses with their paper defaults; Dr.GRPO also uses its advantage
(no std scaling); DAPO also uses dynamic sampling; GFPO is the GRPO loss with GFPO's advantage
(keep the 4 shortest of 8).

Usage:  .venv/bin/python benchmarks/compare_objectives.py [--budget 30] [--seeds 0 1 2] [--set train.epochs=2 ...]
Writes benchmarks/results/compare_objectives.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_figure, shared_warm_start  # noqa: E402
from policyflow import coordinator  # noqa: E402
from policyflow.config import load_config  # noqa: E402
from policyflow.logging import read_jsonl  # noqa: E402

OBJECTIVES: dict[str, list[str]] = {
    "grpo": ["loss.name=grpo"],
    "dapo": ["loss.name=dapo", "train.dynamic_sampling=true"],
    "dr_grpo": ["loss.name=dr_grpo", "advantage.name=dr_grpo"],
    "gspo": ["loss.name=gspo"],
    "gspo_token": ["loss.name=gspo_token"],
    "gmpo": ["loss.name=gmpo"],
    "gfpo": ["loss.name=grpo", "advantage.name=gfpo", "advantage.gfpo_k=4"],
    "decoupled_ppo": ["loss.name=decoupled_ppo"],
}


def mean_of(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=30.0, help="RL wall-clock seconds per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every RL run, e.g. train.epochs=2 train.minibatches=4")
    args = parser.parse_args()
    demo = ROOT / "configs" / "demo.yaml"
    common = ["run.progress=false", "run.output_dir=runs/compare", "run.overwrite=true"]  # a rerun replaces the last one

    sft_folder = shared_warm_start(demo, common)

    results: dict[str, list[dict]] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for name in args.objectives:
        for seed in args.seeds:
            cfg = load_config(demo, [
                *common, *OBJECTIVES[name], *args.set, f"run.name={name}-{seed}", f"run.seed={seed}",
                f"model.path={sft_folder}", "sft.max_steps=0", "train.steps=100000",
                f"train.time_budget_s={args.budget}", f"eval.every={args.eval_every}", "checkpoint.keep_last=1",
            ])
            summary = coordinator.train(cfg, log=lambda *_: None)
            metrics = read_jsonl(cfg.run_dir / "metrics.jsonl")
            steps = [m for m in metrics if "rollout/reward_mean" in m]
            row = {
                "seed": seed, "steps": summary["steps"],
                "before_sampled": summary["eval_before"]["accuracy_sampled"],
                "after_sampled": summary["eval_after"]["accuracy_sampled"],
                "after_greedy": summary["eval_after"]["accuracy_greedy"],
                "response_tokens": mean_of(steps, "rollout/response_tokens_mean"),
                "clip_fraction": mean_of(steps, "loss/clip_frac"),
            }
            results.setdefault(name, []).append(row)
            curves.setdefault(name, []).extend((m["wall_seconds"], m["eval/accuracy_sampled"]) for m in metrics if "eval/accuracy_sampled" in m)
            print(name, json.dumps(row), flush=True)

    table = ["| objective | held-out sampled acc (before → after) | greedy after | response tokens | clip fraction | RL steps |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "seed"}
        table.append(
            f"| {name} | {med['before_sampled']:.3f} → {med['after_sampled']:.3f} | {med['after_greedy']:.3f} | "
            f"{med['response_tokens']:.2f} | {med['clip_fraction']:.4f} | {med['steps']:.0f} |"
        )
    note = f"median over seeds {args.seeds}; {args.budget:.0f} s of RL wall clock per run; 200 held-out problems; overrides {args.set or 'none'}"
    out = ROOT / "benchmarks" / "results" / "compare_objectives"
    out.with_suffix(".md").write_text("\n".join(table) + f"\n\n{note}\n")
    out.with_suffix(".json").write_text(json.dumps({"budget_s": args.budget, "seeds": args.seeds, "overrides": args.set, "results": results}, indent=2))
    _plot(curves, out.with_suffix(".png"))
    print("\n".join(table) + f"\n{note}")


def _plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    def draw(ax) -> None:
        for name, points in curves.items():
            xs, ys = zip(*sorted(points))
            ax.scatter(xs, ys, s=10, alpha=0.6, label=name)

    save_figure(path, draw, "wall time (s)", "held-out accuracy (sampled)")


if __name__ == "__main__":
    main()
