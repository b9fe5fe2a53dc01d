"""The demo target: held-out sampled accuracy after RL vs after the warm-start, over seeds.

Runs `configs/demo.yaml` with run.seed = task.seed = s for each seed (one after another, in
this process) and reports per seed the SFT steps, accuracy before/after RL (greedy and sampled)
and wall time, plus the median gain in sampled accuracy.

Usage:  .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2] [override ...]
Writes benchmarks/results/demo_seeds.json (runs go to runs/demo-seed-<s>/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policyflow import coordinator  # noqa: E402
from policyflow.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run.seed={seed}", f"task.seed={seed}", f"run.name=demo-seed-{seed}", "run.progress=false", "run.overwrite=true", *args.overrides])
        start = time.perf_counter()
        summary = coordinator.train(cfg, log=lambda *_: None)
        before, after = summary["eval_before"], summary["eval_after"]
        rows.append({
            "seed": seed,
            "before_greedy": before["accuracy_greedy"], "before_sampled": before["accuracy_sampled"],
            "after_greedy": after["accuracy_greedy"], "after_sampled": after["accuracy_sampled"],
            "gain_sampled": after["accuracy_sampled"] - before["accuracy_sampled"],
            "total_seconds": time.perf_counter() - start, "rl_seconds": summary["wall_seconds"],
        })
        print(json.dumps(rows[-1]), flush=True)
    median_gain = statistics.median(r["gain_sampled"] for r in rows)
    out = ROOT / "benchmarks" / "results" / "demo_seeds.json"
    out.write_text(json.dumps({"overrides": args.overrides, "rows": rows, "median_gain_sampled": median_gain}, indent=2))
    print(f"median gain in held-out sampled accuracy: {median_gain:+.3f}  (wrote {out})")


if __name__ == "__main__":
    main()
