"""RL iteration time of two source trees side by side: another commit's `rl_iteration.py` and this tree's.

Each round runs the base tree's `benchmarks/rl_iteration.py`, then this tree's, each in its own
process with its own tree on PYTHONPATH and the same arguments, so every piece of code (engine,
trainer, rollout) is the commit's own. Rounds alternate (base, ours, base, ours, ...), and the
speed-up is the median over rounds of base iteration seconds / ours, which cancels load drifts
slower than one pair. Each run's figure is that run's median over `--repeats` iterations.
The base run writes its own tree's `benchmarks/results/rl_iteration.json` (read back here).

Usage:  git worktree add --detach /tmp/base282 282ff09
        taskset -c 1 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_iteration_trees.py --base /tmp/base282 [--rounds 5]
Writes benchmarks/results/rl_iteration_trees.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PHASES = ("sample_seconds", "train_seconds", "iteration_seconds")


def run_tree(tree: Path, args: argparse.Namespace, out: Path | None) -> dict[str, float]:
    """One `rl_iteration.py` process of `tree`; its median seconds per phase."""
    cmd = [sys.executable, str(tree / "benchmarks" / "rl_iteration.py"), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)]
    if out is not None:
        cmd += ["--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads((out or tree / "benchmarks" / "results" / "rl_iteration.json").read_text())
    return {k: result["median"][k] for k in PHASES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="root of the base commit's checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=str(HERE / "benchmarks" / "results" / "rl_iteration_trees.json"))
    args = parser.parse_args()
    base = Path(args.base).resolve()
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            pair = {"base": run_tree(base, args, None), "ours": run_tree(HERE, args, Path(tmp) / "ours.json")}
            pairs.append(pair)
            print(f"round {i}: base {pair['base']['iteration_seconds']:.3f} s, ours {pair['ours']['iteration_seconds']:.3f} s", flush=True)
    commit = subprocess.run(["git", "-C", str(base), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    speedup = {k: statistics.median(p["base"][k] / p["ours"][k] for p in pairs) for k in PHASES}
    result = {"base": str(base), "base_commit": commit, "threads": args.threads, "repeats": args.repeats,
              "new_tokens": args.new_tokens, "load_avg_after": os.getloadavg(),
              "speedup_median_of_pairs": speedup, "pairs": pairs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    for k in PHASES:
        print(f"{k:>18}: base/ours median of pairs {speedup[k]:.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
