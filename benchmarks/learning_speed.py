"""Learning speed: sampled accuracy against RL wall-clock seconds and against RL steps.

1. One SFT warm-start of `configs/demo.yaml`, shared by every row and seed (benchmarks/common.py;
   500 held-out problems, so the warm-start is trained once with `task.num_eval=500`).
2. For each seed: RL from that checkpoint through `coordinator.train` (sync, inline runtime),
   with the trainer wrapped so that, right after the steps named by `--step-points` and the
   first step at or after each of `--time-points` seconds of RL, it measures sampled accuracy
   on `--prompts` problems. The RL clock starts when the initial weights are published (engine
   start-up counts) and excludes the measurements themselves. The run stops once both the last
   step point and the last time point are passed.
3. Per label (`--label`): the median over seeds at each point, and the time (and steps) to
   +10 points over the warm-start, linearly interpolated between measurements. Rows with other
   labels already in the JSON are kept, so "baseline main" and "new defaults" sit side by side.

`--split heldout` (default) scores the held-out problems; `--split train` scores unseen problems
drawn from the *training* distribution (indices no run reaches): use it to tune, keep held-out
for reporting. Accuracy is one sample per problem at eval.temperature with a fixed sampling seed
(the same for every row and seed, so equal weights give equal scores).

Usage:  python benchmarks/learning_speed.py [--label main] [--seeds 0 1 2] [--set train.lr=1e-3 ...]
Writes benchmarks/results/learning_speed.json (and learning_speed_{time,steps}.png, not committed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import save_figure, shared_warm_start  # noqa: E402
from policyflow import coordinator  # noqa: E402
from policyflow.config import load_config  # noqa: E402
from policyflow.evaluate import accuracy  # noqa: E402
from policyflow.policy import PolicySpec  # noqa: E402
from policyflow.workers import TrainerWorker  # noqa: E402

PROBE_SEED = 20_240_611  # sampling seed of every measurement (not a run seed: no stream is shared with rollouts)
TRAIN_SPLIT_OFFSET = 30_000_000  # unseen training-distribution problems (RL starts at 0, SFT at 10_000_000)
TARGET_GAIN = 0.10


class _Done(Exception):
    """Raised by the probe trainer once every point is measured: ends the run early."""


def probe_trainer(step_points: list[int], time_points: list[float], split: str, prompts: int, log: list[dict]) -> type:
    """A TrainerWorker that measures sampled accuracy at the planned points and appends to `log`."""

    class ProbeTrainer(TrainerWorker):
        def __init__(self, spec: PolicySpec, *args, **kwargs) -> None:
            super().__init__(spec, *args, **kwargs)
            s = self.session
            if split == "heldout":
                self.problems = list(s.eval_problems[:prompts])
            else:
                self.problems = [s.task.train_problem(TRAIN_SPLIT_OFFSET + j) for j in range(prompts)]
            if len(self.problems) < prompts:
                raise ValueError(f"only {len(self.problems)} held-out problems; raise task.num_eval and eval.num_prompts to {prompts}")
            self.clock_start: float | None = None
            self.probe_seconds = 0.0
            self.steps = 0
            self.times_left = sorted(time_points)

        def rl_seconds(self) -> float:
            return time.perf_counter() - self.clock_start - self.probe_seconds

        def probe(self, kind: str, point: float, rl_seconds: float, reward: float | None) -> None:
            start = time.perf_counter()
            runner = self.session.runner.with_params(temperature=self.spec.eval.temperature, top_p=1.0, top_k=0)
            acc, _ = accuracy(runner, self.session.task, self.problems, torch.Generator(runner.generator.device).manual_seed(PROBE_SEED))
            self.probe_seconds += time.perf_counter() - start
            log.append({"kind": kind, "point": point, "step": self.steps, "rl_seconds": rl_seconds, "accuracy": acc, "reward": reward})

        def publish(self) -> int:
            if self.clock_start is None:  # the initial weights: RL begins now
                self.probe("step", 0, 0.0, None)
                self.clock_start = time.perf_counter()
            return super().publish()

        def train_step(self, groups):
            metrics = super().train_step(groups)
            self.steps += 1
            rl_seconds, reward = self.rl_seconds(), metrics["rollout/reward_mean"]
            extra = {k: metrics[k] for k in ("loss/grad_norm", "loss/clip_frac", "rollout/groups_zero_variance") if k in metrics}
            log.append({"kind": "reward", "step": self.steps, "rl_seconds": rl_seconds, "reward": reward, **extra})
            if self.steps in step_points:
                self.probe("step", self.steps, rl_seconds, reward)
            if self.times_left and rl_seconds >= self.times_left[0]:
                while self.times_left and rl_seconds >= self.times_left[0]:
                    point = self.times_left.pop(0)
                self.probe("time", point, rl_seconds, reward)
            if not self.times_left and self.steps >= max(step_points):
                raise _Done
            return metrics

    return ProbeTrainer


def run_seed(preset: Path, overrides: list[str], seed: int, args: argparse.Namespace) -> list[dict]:
    log: list[dict] = []
    cfg = load_config(preset, [*overrides, f"run.name=ls-{seed}", f"run.seed={seed}"])
    if cfg.pipeline.runtime != "inline":
        raise ValueError("learning_speed measures inside the trainer, so it needs pipeline.runtime=inline")
    original = coordinator.TrainerWorker
    coordinator.TrainerWorker = probe_trainer(args.step_points, args.time_points, args.split, args.prompts, log)
    try:
        coordinator.train(cfg, log=lambda *_: None)
    except _Done:
        pass
    finally:
        coordinator.TrainerWorker = original
    return log


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """First x where the piecewise-linear curve through `points` (sorted by x) reaches `target`."""
    if points and points[0][1] >= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= target:  # y0 < target here
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def summarise(seeds: dict[int, list[dict]]) -> dict:
    """Per-point medians over seeds and the time/steps to +10 points."""
    by_point: dict[str, dict[str, list[float]]] = {"step": {}, "time": {}}
    to_target: dict[str, list[float | None]] = {"seconds": [], "steps": []}
    for log in seeds.values():
        probes = [r for r in log if r["kind"] in ("step", "time")]
        for r in probes:
            by_point[r["kind"]].setdefault(str(r["point"]), []).append(r["accuracy"])
        base = probes[0]["accuracy"]
        ordered = sorted(probes, key=lambda r: r["rl_seconds"])
        to_target["seconds"].append(crossing([(r["rl_seconds"], r["accuracy"]) for r in ordered], base + TARGET_GAIN))
        to_target["steps"].append(crossing([(r["step"], r["accuracy"]) for r in ordered], base + TARGET_GAIN))

    def median_or_none(values: list[float | None]) -> float | None:
        # a seed that never reached the target counts as +inf; the median is None if it is inf
        m = statistics.median(float("inf") if v is None else v for v in values)
        return None if m == float("inf") else m

    return {
        "accuracy_at_step": {k: {"median": statistics.median(v), "seeds": v} for k, v in by_point["step"].items()},
        "accuracy_at_seconds": {k: {"median": statistics.median(v), "seeds": v} for k, v in by_point["time"].items()},
        "seconds_to_plus10": {"median": median_or_none(to_target["seconds"]), "seeds": to_target["seconds"]},
        "steps_to_plus10": {"median": median_or_none(to_target["steps"]), "seeds": to_target["steps"]},
    }


def compact(log: list[dict]) -> dict:
    """A run's log as stored: the measurements, and per-step columns (reward, grad norm, ...), 4 decimals."""
    def r4(value):
        return round(value, 4) if isinstance(value, float) else value

    probes = [{k: r4(v) for k, v in r.items()} for r in log if r["kind"] != "reward"]
    steps = [r for r in log if r["kind"] == "reward"]
    keys = [k for k in steps[0] if k not in ("kind", "step")] if steps else []
    return {"probes": probes, "per_step": {k: [r4(r.get(k)) for r in steps] for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="run", help="row name in the JSON (e.g. 'baseline main', 'new defaults')")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="RL overrides, e.g. train.lr=1e-3 (not applied to the shared warm-start)")
    parser.add_argument("--step-points", type=int, nargs="+", default=[5, 10, 20, 40, 80])
    parser.add_argument("--time-points", type=float, nargs="*", default=[5, 10, 20, 40, 80])
    parser.add_argument("--split", choices=["heldout", "train"], default="heldout")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "learning_speed.json"))
    parser.add_argument("--note", default="", help="free text stored with the row (e.g. machine load)")
    args = parser.parse_args()
    preset = ROOT / "configs" / "demo.yaml"
    common = ["run.progress=false", "run.overwrite=true", "run.output_dir=runs/learning_speed", f"task.num_eval={max(500, args.prompts)}", f"eval.num_prompts={args.prompts}"]
    sft_folder = shared_warm_start(preset, common)
    rl = [*common, f"model.path={sft_folder}", "sft.max_steps=0", "train.steps=1000000", "eval.every=0",
          "checkpoint.every=0", "checkpoint.keep_last=1", "run.samples_every=1000000", *args.set]

    seeds: dict[int, list[dict]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        seeds[seed] = run_seed(preset, rl, seed, args)
        probes = [f"{r['kind'][0]}{r['point']}:{r['accuracy']:.3f}@{r['step']}/{r['rl_seconds']:.0f}s" for r in seeds[seed] if r["kind"] != "reward"]
        print(f"[{args.label}] seed {seed}: {' '.join(probes)}", flush=True)
    row = {
        "overrides": args.set, "seeds": args.seeds, "split": args.split, "prompts": args.prompts,
        "step_points": args.step_points, "time_points": args.time_points, "note": args.note,
        "benchmark_seconds": time.perf_counter() - start, **summarise(seeds),
        "runs": {str(s): compact(log) for s, log in seeds.items()},
    }
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {}
    table.setdefault("rows", {})[args.label] = row
    table["about"] = __doc__.splitlines()[0]
    out.write_text(json.dumps(table))
    print(json.dumps({k: row[k] for k in ("accuracy_at_step", "accuracy_at_seconds", "seconds_to_plus10", "steps_to_plus10")}, indent=1))
    _plot(table["rows"], out)


def _plot(rows: dict[str, dict], out: Path) -> None:
    for kind, xlabel in (("seconds", "RL seconds (measurements excluded)"), ("step", "RL steps")):
        def draw(ax, kind=kind) -> None:
            for label, row in rows.items():
                points = row[f"accuracy_at_{kind}"]
                xs = sorted(points, key=float)
                first = [(run["probes"] if isinstance(run, dict) else run)[0] for run in row["runs"].values()]  # rows of the first version kept the raw log
                base = statistics.median(probe["accuracy"] for probe in first)
                ax.plot([0.0] + [float(x) for x in xs], [base] + [points[x]["median"] for x in xs], marker="o", label=f"{label} ({row['split']})")

        save_figure(out.with_name(f"{out.stem}_{'time' if kind == 'seconds' else 'steps'}.png"), draw, xlabel, "sampled accuracy (median of seeds)")


if __name__ == "__main__":
    main()
