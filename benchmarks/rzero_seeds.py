"""The R-Zero demo's target: the solver's held-out sampled accuracy after 3 self-play iterations
against the end of its warm-start, over seeds, and the wall time of the whole command.

Runs `policyflow train --config configs/rzero.yaml` with run.seed = task.seed = s for each seed,
one after another, each as its own process (so the time is the command's: warm-starts included),
and reports per seed the accuracies before and after self-play, each iteration's pseudo-label
accuracy and solver accuracy, and the median gain.

Usage:  .venv/bin/python benchmarks/rzero_seeds.py [override ...] [--seeds 0 1 2]
Writes benchmarks/results/rzero_seeds.json (runs go to runs/rzero-seed-<s>/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()  # overrides go before --seeds (its nargs would take them)
    rows = []
    for seed in args.seeds:
        name = f"rzero-seed-{seed}"
        command = [sys.executable, "-m", "policyflow", "train", "--config", "configs/rzero.yaml", f"run.seed={seed}", f"task.seed={seed}",
                   f"run.name={name}", "run.progress=false", "run.overwrite=true", *args.overrides]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        summary = json.loads((ROOT / "runs" / name / "summary.json").read_text())
        before, after = summary["eval_before"], summary["eval_after"]
        rows.append({
            "seed": seed, "seconds": round(seconds, 1),
            "before_greedy": before["accuracy_greedy"], "before_sampled": before["accuracy_sampled"],
            "after_greedy": after["accuracy_greedy"], "after_sampled": after["accuracy_sampled"],
            "gain_sampled": after["accuracy_sampled"] - before["accuracy_sampled"],
            "pseudo_label_accuracy": [it["pseudo_label_accuracy"] for it in summary["iterations"]],
            "solver_sampled": [it["solver/accuracy_sampled"] for it in summary["iterations"]],
            "kept": [it["kept"] for it in summary["iterations"]],
        })
        print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "median_gain_sampled": statistics.median(r["gain_sampled"] for r in rows), "overrides": args.overrides}
    out = ROOT / "benchmarks" / "results" / "rzero_seeds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"median_gain_sampled": result["median_gain_sampled"]}))


if __name__ == "__main__":
    main()
