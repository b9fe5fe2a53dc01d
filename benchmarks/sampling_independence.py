"""Are the G samples of a group independent draws? Agreement within a group vs across batches.

For the same prompts, P(two samples agree on correctness) is computed for pairs inside one
group (drawn in the same engine batch, one generator) and for pairs from consecutive batches
(where independence is certain up to the generator). Independent streams give equal values
up to sampling noise (standard error about 0.003 with the defaults).

Usage:  python benchmarks/sampling_independence.py [--model runs/learning_speed/sft/sft] [--batches 12]
(the default model is the shared warm-start written by benchmarks/learning_speed.py)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policyflow.config import load_config  # noqa: E402
from policyflow.rollout import rollout_groups  # noqa: E402
from policyflow.session import open_session  # noqa: E402
from policyflow.policy import PolicySpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/learning_speed/sft/sft")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"model.path={args.model}", "task.num_eval=500", "run.progress=false"])
    s = open_session(PolicySpec.of(cfg))
    problems = [s.task.train_problem(40_000_000 + i) for i in range(args.prompts)]
    G, runner = cfg.train.group_size, s.runner.with_params(top_p=1.0, top_k=0)
    generator = torch.Generator().manual_seed(cfg.run.seed)

    def groups() -> list[list[bool]]:
        made, _ = rollout_groups(runner, s.task, problems, G, generator)
        return [[t.reward_parts.get("correct", 0.0) >= 1.0 for t in g.trajectories] for g in made]

    within, across, previous = [], [], groups()
    for _ in range(args.batches):
        current = groups()
        for now, before in zip(current, previous):
            within += [a == b for a, b in itertools.combinations(now, 2)]
            across += [a == b for a in now for b in before]
        previous = current
    print(f"P(same correctness): within a group {statistics.mean(within):.4f} (n={len(within)}), "
          f"same prompt in consecutive batches {statistics.mean(across):.4f} (n={len(across)})")


if __name__ == "__main__":
    main()
