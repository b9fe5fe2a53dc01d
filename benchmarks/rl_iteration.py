"""Time of one RL iteration: sample and train 32 prompts x 8 samples on the tiny model (CPU).

One iteration = `rollout.rollout_groups` (sampling + scoring) + `build_batch` + one
`Trainer.step` (GRPO, one epoch, one minibatch). Completions are forced to `--new-tokens`
tokens (ignore EOS) so every repeat does the same work, and the arithmetic reward is replaced
by a dense one so no group is skipped. Reports the median over repeats of each phase, tokens/s,
and the trainer's FLOPs as a fraction of the measured fp32 matmul peak (training ≈ 3x the
forward FLOPs: forward, backward for activations, backward for weights).

Usage:  .venv/bin/python benchmarks/rl_iteration.py [--threads 2] [--repeats 5] [--new-tokens 8]
Writes benchmarks/results/rl_iteration.json (or --out). Run it when the machine is quiet.
`rl_iteration_trees.py` runs it side by side with another commit's copy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampler_throughput import measure_peak_gflops, model_flops  # noqa: E402

from policyflow.session import open_session  # noqa: E402
from policyflow.config import load_config  # noqa: E402
from policyflow.engine import SamplingParams  # noqa: E402
from policyflow.rollout import build_batch, rollout_groups  # noqa: E402
from policyflow.trainer import Trainer  # noqa: E402
from policyflow.policy import PolicySpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "rl_iteration.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [f"run.threads={args.threads}", "train.prompts_per_step=32", "train.group_size=8", f"sampling.max_new_tokens={args.new_tokens}"])
    session = open_session(PolicySpec.of(cfg))
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True)  # same work every repeat
    trainer = Trainer(session.model, cfg.train, cfg.loss, cfg.sampling)
    generator = torch.Generator().manual_seed(0)
    peak = measure_peak_gflops()

    rows = []
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        problems = [session.task.train_problem(repeat * 32 + i) for i in range(32)]
        runner = session.runner.with_params(temperature=params.temperature, max_new_tokens=params.max_new_tokens, ignore_eos=True)
        groups, _ = rollout_groups(runner, session.task, problems, 8, generator)
        for i, t in enumerate(t for g in groups for t in g.trajectories):
            t.reward = float(i % 3)  # dense, varied: every group has variance
        sampled = time.perf_counter()
        batch, _ = build_batch(groups, cfg.train, cfg.advantage, session.tokenizer.pad_token_id)
        metrics = trainer.step(batch)
        done = time.perf_counter()
        if repeat:
            trajectories = [t for g in groups for t in g.trajectories]
            prompt_lens = [len(t.segments[0].token_ids) for t in trajectories]
            new_lens = [t.num_gen_tokens for t in trajectories]
            seq_lens = [p + n for p, n in zip(prompt_lens, new_lens)]
            # A full forward over each sequence = "generating" all of it after a 1-token prompt: every position's logits.
            train_flops = 3 * model_flops(session.model, [1] * len(seq_lens), seq_lens)
            rows.append({
                "sample_seconds": sampled - start,
                "train_seconds": done - sampled,
                "iteration_seconds": done - start,
                "sampled_tokens_per_s": sum(new_lens) / (sampled - start),
                "train_tokens_per_s": metrics["perf/train_tokens_per_s"],
                "train_fraction_of_peak": train_flops / metrics["perf/train_seconds"] / (peak * 1e9),
                "sample_fraction_of_peak": model_flops(session.model, prompt_lens, new_lens) / (sampled - start) / (peak * 1e9),
            })
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result = {
        "machine": {"logical_cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "load_avg": os.getloadavg()},
        "peak_fp32_matmul_gflops": peak,
        "prompts": 32, "group_size": 8, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "median": median, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"peak fp32 matmul: {peak:.1f} GFLOP/s ({args.threads} threads)")
    for key, value in median.items():
        print(f"{key:>26}: {value:.4g}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
