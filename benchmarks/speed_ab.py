"""Side by side, in one process: one RL iteration with main's trainer and prefill against this tree's.

The machine is shared, so the two arms alternate iteration by iteration (base, new, base,
new, ...) and the speed-up is the median over pairs of base time / new time, which cancels
load drifts slower than one iteration. The base arm loads `trainer.py` and
`engine/fast_decoder.py` from `--base` (a copy of another commit's `policyflow/`, e.g.
`git archive main policyflow | tar -x -C /tmp/base`) and uses its `Trainer` and its
`FastDecoder._prefill`; everything else (task, rollout, engine loop, and `FastDecoder.prefill`
around `_prefill`, which runs a group's repeated prompts once) is shared: to compare whole
commits, use `rl_iteration_trees.py`. The
iteration is `rl_iteration.py`'s: 32 prompts x 8 samples, GRPO, forced length (`--new-tokens`)
or stop at EOS (`--eos`).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speed_ab.py --base /tmp/base/policyflow [--pairs 8] [--eos]
Writes benchmarks/results/speed_ab[_eos].json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policyflow.config import load_config  # noqa: E402
from policyflow.rollout import build_batch, rollout_groups  # noqa: E402
from policyflow.session import open_session  # noqa: E402
from policyflow.trainer import Trainer  # noqa: E402
from policyflow.policy import PolicySpec  # noqa: E402


def load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="folder holding the base commit's policyflow package files")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--eos", action="store_true", help="stop at EOS (up to --new-tokens) instead of forcing the length")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = Path(args.base)
    base_trainer = load_module(base / "trainer.py", "base_trainer")
    base_prefill = load_module(base / "engine" / "fast_decoder.py", "base_fast_decoder").FastDecoder._prefill

    cfg = load_config(None, [f"run.threads={args.threads}", "train.prompts_per_step=32", "train.group_size=8",
                             f"sampling.max_new_tokens={args.new_tokens}"])
    session = open_session(PolicySpec.of(cfg))
    backend = session.runner.generator.core.backend
    new_prefill = backend._prefill
    arms = {
        "base": (base_trainer.Trainer(session.model, cfg.train, cfg.loss, cfg.sampling), types.MethodType(base_prefill, backend)),
        "new": (Trainer(session.model, cfg.train, cfg.loss, cfg.sampling), new_prefill),
    }
    runner = session.runner.with_params(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=not args.eos)
    generator = torch.Generator().manual_seed(0)
    times = {arm: {"sample": [], "train": [], "iteration": []} for arm in arms}
    for i in range(args.pairs + 1):  # the first pair is a warm-up
        for arm, (trainer, prefill) in arms.items():
            backend._prefill = prefill
            problems = [session.task.train_problem((2 * i + (arm == "new")) * 32 + j) for j in range(32)]
            start = time.perf_counter()
            groups, _ = rollout_groups(runner, session.task, problems, 8, generator)
            for k, t in enumerate(t for g in groups for t in g.trajectories):
                t.reward = float(k % 3)  # dense, varied: every group has variance
            sampled = time.perf_counter()
            batch, _ = build_batch(groups, cfg.train, cfg.advantage, session.tokenizer.pad_token_id)
            trainer.step(batch)
            done = time.perf_counter()
            if i:
                for key, value in (("sample", sampled - start), ("train", done - sampled), ("iteration", done - start)):
                    times[arm][key].append(value)
    result = {"machine": {"logical_cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "load_avg": os.getloadavg()},
              "new_tokens": args.new_tokens, "eos": args.eos, "pairs": args.pairs, "median_seconds": {}, "speedup_median_of_pairs": {}}
    for key in ("sample", "train", "iteration"):
        result["median_seconds"][key] = {arm: statistics.median(times[arm][key]) for arm in arms}
        result["speedup_median_of_pairs"][key] = statistics.median(b / n for b, n in zip(times["base"][key], times["new"][key]))
        print(f"{key:>10}: base {result['median_seconds'][key]['base']:.3f}s  new {result['median_seconds'][key]['new']:.3f}s  "
              f"speed-up (median of pairs) {result['speedup_median_of_pairs'][key]:.2f}x")
    result["raw_seconds"] = times
    out = Path(__file__).resolve().parent / "results" / f"speed_ab{'_eos' if args.eos else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
