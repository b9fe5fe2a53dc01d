"""Async over sync on multi-turn search episodes with a slow search tool: measured, and predicted
by the scheduling simulation for the same settings (issue 10 §6).

Measured: `configs/search.yaml` (search_qa, the BM25 tool, up to `--max-turns` turns), with
`task.search.search_latency_s` injected into every search, from one shared SFT warm-start (so
the model does search), in the process runtime: `sync-process` (η 0, drain) against `async`
(η 2, continue, decoupled PPO), each for the same RL wall-clock budget (`common.train_pipeline`).
The figure is trained samples per second, async / sync.

Predicted: `async_sim.Simulation` (the real RolloutBuffer and SnapshotStore on a virtual clock)
run for both modes with settings taken from this machine and the measured sync run:
  * a, b (decode step cost a + b·n): timed on the warm-started model at n = 1 and n = B·G;
  * t: mean `perf/train_seconds`; s: the async run's `async/pause_per_update_s`;
  * tokens per turn: `rollout/response_tokens_mean / agent/turns_mean` (lognormal, σ `--sigma`);
  * turns: uniform on 1..K with K = round(2·turns_mean − 1), so the mean matches;
  * tool latency: exactly `--latency` after every turn but the last;
  * B = train.prompts_per_step, G = train.group_size, C = pipeline.engine_slots.
What the simulation leaves out, and the real run has, is listed in async_sim.py ("Multi-turn
scheduling, simulated and real"); the largest on this machine: the trainer and the engine are
two processes on the same 2 shared cores, whereas the simulation runs them side by side at
full speed.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agent_async.py [--budget 60] [--latency 0.5]
Writes benchmarks/results/agent_async.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.async_sim import Mode, SimConfig, Workload, simulate  # noqa: E402
from benchmarks.common import shared_warm_start, train_pipeline  # noqa: E402
from policyflow.config import load_config  # noqa: E402
from policyflow.engine import AsyncEngine, SamplingParams  # noqa: E402
from policyflow.model import load_pretrained  # noqa: E402


def decode_step_cost(model_folder: Path, n: int, prompt_tokens: int, new_tokens: int = 32) -> float:
    """Mean seconds of one engine step (prefill included) decoding `n` sequences at once."""
    model, tokenizer = load_pretrained(model_folder)
    engine = AsyncEngine(model.eval(), tokenizer, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    prompt = [tokenizer.pad_token_id + 5] * prompt_tokens

    async def timed() -> float:
        await engine.generate_many([prompt] * n, params)  # warm-up
        busy, steps = engine.stats["busy_s"], engine.stats["steps"]
        await engine.generate_many([prompt] * n, params)
        return (engine.stats["busy_s"] - busy) / (engine.stats["steps"] - steps)

    return asyncio.run(timed())


def predict(cfg, sync_steps: list[dict], pause_s: float, a: float, b: float, latency: float, sigma: float, sim_steps: int) -> dict:
    """The simulation's async/sync throughput for the measured settings (see the module docstring)."""
    mean = lambda key: sum(m[key] for m in sync_steps) / len(sync_steps)  # noqa: E731
    turns = mean("agent/turns_mean")
    per_turn = mean("rollout/response_tokens_mean") / turns
    workload = Workload(
        "measured", mean_turn_tokens=per_turn, sigma=sigma, max_turn_tokens=cfg.sampling.max_new_tokens,
        max_turns=max(1, round(2 * turns - 1)), tool_median_s=max(latency, 1e-9), tool_sigma=0.0,
    )
    sim = SimConfig(
        batch_groups=cfg.train.prompts_per_step, group_size=cfg.train.group_size, slots=cfg.pipeline.engine_slots,
        step_base_s=a, step_per_seq_s=b, train_step_s=mean("perf/train_seconds"), swap_s=pause_s,
        steps=sim_steps, warmup_steps=sim_steps // 5,
    )
    sync = simulate(sim, Mode("sync", 0, "drain", 0), workload).stats
    async_ = simulate(sim, Mode("async", 2, "continue", 3), workload).stats
    return {
        "workload": asdict(workload), "sim": asdict(sim),
        "sync_trajectories_per_s": sync.trajectories_per_s, "async_trajectories_per_s": async_.trajectories_per_s,
        "async_over_sync": async_.trajectories_per_s / sync.trajectories_per_s,
        "sync_trainer_idle": sync.trainer_idle_fraction, "async_trainer_idle": async_.trainer_idle_fraction,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="RL wall-clock seconds per pipeline")
    parser.add_argument("--latency", type=float, default=0.5, help="injected seconds per search call")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sigma", type=float, default=0.3, help="σ of log tokens per turn in the simulation")
    parser.add_argument("--sim-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agent_async.json"))
    args = parser.parse_args()
    preset = ROOT / "configs" / "search.yaml"
    common = ["run.progress=false", "run.output_dir=runs/agent-async", f"sft.max_steps={args.sft_steps}"]
    start = time.perf_counter()
    sft_folder = shared_warm_start(preset, common)
    sft_s = time.perf_counter() - start
    rl = [*common, f"task.search.search_latency_s={args.latency}", f"agent.max_turns={args.max_turns}", "eval.num_prompts=20"]
    measured, steps = {}, {}
    for name in ("sync-process", "async"):
        measured[name], steps[name] = train_pipeline(preset, name, rl, sft_folder, args.budget, args.seed)
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in measured[name].items() if k != "pipeline"}), flush=True)

    cfg = load_config(preset, rl)
    prompt_tokens = 16
    n = cfg.train.prompts_per_step * cfg.train.group_size
    one, full = decode_step_cost(sft_folder, 1, prompt_tokens), decode_step_cost(sft_folder, n, prompt_tokens)
    b = max(0.0, (full - one) / (n - 1))
    a = one - b
    pause_s = steps["async"][-1]["async/pause_per_update_s"]
    predicted = predict(cfg, steps["sync-process"], pause_s, a, b, args.latency, args.sigma, args.sim_steps)
    ratio = measured["async"]["samples_per_s"] / measured["sync-process"]["samples_per_s"]
    result = {
        "machine": "shared 2-core CPU (other jobs running)", "budget_s": args.budget, "latency_s": args.latency,
        "max_turns": args.max_turns, "sft_steps": args.sft_steps, "sft_seconds": round(sft_s, 1),
        "turns_mean_sync": sum(m["agent/turns_mean"] for m in steps["sync-process"]) / len(steps["sync-process"]),
        "tool_calls_mean_sync": sum(m["agent/tool_calls_mean"] for m in steps["sync-process"]) / len(steps["sync-process"]),
        "decode_step_s": {"a": a, "b": b, "n1": one, f"n{n}": full},
        "measured": measured, "measured_async_over_sync": ratio,
        "predicted": predicted, "measured_over_predicted": ratio / predicted["async_over_sync"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"async/sync measured {ratio:.2f}, predicted {predicted['async_over_sync']:.2f}, measured/predicted {result['measured_over_predicted']:.2f}")


if __name__ == "__main__":
    main()
