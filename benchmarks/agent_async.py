"""Async over sync on multi-turn search episodes with a slow search tool: measured, and predicted
by the scheduling simulation for the same settings (issue 10 §6).

Measured: `configs/search.yaml` (search_qa, the BM25 tool) with `task.search.search_latency_s`
injected into every search, in the process runtime, from one shared SFT warm-start:
`sync-process` (η 0, drain) against `async` (η 2, continue, decoupled PPO), each for the same RL
wall-clock budget (`common.train_pipeline`). The rollout worker is `ScriptedSearchWorker`
(`benchmarks/scripted_search.py`): the model samples every turn (`--new-tokens` tokens, no
EOS or stop strings) and is trained on it, while a script picks the actions, so each episode
makes 0..K−1 searches (uniform, K = `--max-turns`) and then answers. (The warm-started demo
model does not search reliably yet, and without searches there is no tool latency to hide.)
The tool pool's concurrency limit is raised above the episodes in flight (the simulation has
none), B = 8 prompts × G = 4 per step by default, so that a train step and a step's chain of
tool waits are of a size. The figure is trained samples per second, async / sync.

Predicted: `async_sim.Simulation` (the real RolloutBuffer and SnapshotStore on a virtual clock)
for both modes, with the same workload (turns uniform on 1..K, exactly `--new-tokens` tokens
per turn, exactly `--latency` s after every turn but the last) and costs from this machine:
  * a, b (decode step cost a + b·n): timed on the warm-started model at n = 1 and n = B·G;
  * t: mean `perf/train_seconds` of the sync run; s: the async run's `async/pause_per_update_s`;
  * B = train.prompts_per_step, G = train.group_size, C = pipeline.engine_slots.
What the simulation leaves out, and the real run has, is listed in async_sim.py ("Multi-turn
scheduling, simulated and real"); the largest on this machine: the trainer and the engine are
two processes on the same 2 shared cores, whereas the simulation runs them side by side at
full speed. The result also holds the simulation rerun with the train step as long as it was in
the async run (`predicted_with_async_train_step`), which isolates that effect.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agent_async.py [--budget 60] [--latency 1.0]
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
from benchmarks.scripted_search import ScriptedSearchWorker  # noqa: E402
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


def mean_train_s(steps: list[dict]) -> float:
    train_s = [m["perf/train_seconds"] for m in steps if "perf/train_seconds" in m]
    return sum(train_s) / len(train_s)


def predict(cfg, train_s: float, pause_s: float, a: float, b: float, latency: float, sim_steps: int) -> dict:
    """The simulation's async/sync throughput for the measured settings (see the module docstring)."""
    workload = Workload(
        "scripted_search", mean_turn_tokens=cfg.sampling.max_new_tokens, sigma=0.0, max_turn_tokens=cfg.sampling.max_new_tokens,
        max_turns=cfg.agent.max_turns, tool_median_s=max(latency, 1e-9), tool_sigma=0.0,
    )
    sim = SimConfig(
        batch_groups=cfg.train.prompts_per_step, group_size=cfg.train.group_size, slots=cfg.pipeline.engine_slots,
        step_base_s=a, step_per_seq_s=b, train_step_s=train_s, swap_s=pause_s,
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
    parser.add_argument("--latency", type=float, default=1.0, help="injected seconds per search call")
    parser.add_argument("--prompts", type=int, default=8, help="train.prompts_per_step (B)")
    parser.add_argument("--group-size", type=int, default=4, help="train.group_size (G)")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens the model samples per turn")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sim-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agent_async.json"))
    args = parser.parse_args()
    preset = ROOT / "configs" / "search.yaml"
    common = ["run.progress=false", "run.output_dir=runs/agent-async", "run.overwrite=true", f"sft.max_steps={args.sft_steps}"]  # a rerun replaces the last one
    start = time.perf_counter()
    sft_folder = shared_warm_start(preset, common)
    sft_s = time.perf_counter() - start
    rl = [
        *common, f"task.search.search_latency_s={args.latency}", f"agent.max_turns={args.max_turns}", "agent.max_total_tokens=480",
        f"sampling.max_new_tokens={args.new_tokens}", "eval.num_prompts=20", f"train.prompts_per_step={args.prompts}",
        f"train.group_size={args.group_size}", "task.search.tool_concurrency=1024",
    ]
    measured, steps = {}, {}
    for name in ("sync-process", "async"):
        measured[name], steps[name] = train_pipeline(preset, name, rl, sft_folder, args.budget, args.seed, ScriptedSearchWorker)
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in measured[name].items() if k != "pipeline"}), flush=True)

    cfg = load_config(preset, rl)
    prompt_tokens = 16
    n = cfg.train.prompts_per_step * cfg.train.group_size
    one, full = decode_step_cost(sft_folder, 1, prompt_tokens), decode_step_cost(sft_folder, n, prompt_tokens)
    b = max(0.0, (full - one) / (n - 1))
    a = one - b
    pause_s = steps["async"][-1]["async/pause_per_update_s"]
    t_sync, t_async = mean_train_s(steps["sync-process"]), mean_train_s(steps["async"])
    predicted = predict(cfg, t_sync, pause_s, a, b, args.latency, args.sim_steps)
    contended = predict(cfg, t_async, pause_s, a, b, args.latency, args.sim_steps)
    ratio = measured["async"]["samples_per_s"] / measured["sync-process"]["samples_per_s"]
    per_s = {name: measured[name]["samples_per_s"] for name in measured}
    result = {
        "machine": "shared 2-core CPU (other jobs running)", "budget_s": args.budget, "latency_s": args.latency,
        "batch": f"{args.prompts} prompts x {args.group_size}", "max_turns": args.max_turns, "new_tokens": args.new_tokens, "sft_steps": args.sft_steps, "sft_seconds_this_run": round(sft_s, 1),
        "turns_mean_sync": sum(m["agent/turns_mean"] for m in steps["sync-process"]) / len(steps["sync-process"]),
        "tool_calls_mean_sync": sum(m["agent/tool_calls_mean"] for m in steps["sync-process"]) / len(steps["sync-process"]),
        "decode_step_s": {"a": a, "b": b, "n1": one, f"n{n}": full},
        "measured": measured, "measured_async_over_sync": ratio,
        "train_step_s": {"sync": t_sync, "async": t_async},
        "predicted": predicted, "measured_over_predicted": ratio / predicted["async_over_sync"],
        "measured_over_predicted_sync": per_s["sync-process"] / predicted["sync_trajectories_per_s"],
        "measured_over_predicted_async": per_s["async"] / predicted["async_trajectories_per_s"],
        # the same simulation with the train step as long as it was in the async run (sharing the cores with decoding)
        "predicted_with_async_train_step": contended,
        "measured_over_predicted_async_contended": per_s["async"] / contended["async_trajectories_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"async/sync measured {ratio:.2f}, predicted {predicted['async_over_sync']:.2f}, measured/predicted {result['measured_over_predicted']:.2f}; "
          f"train step {t_sync:.2f} s in sync, {t_async:.2f} s in async; async measured/predicted with that train step "
          f"{result['measured_over_predicted_async_contended']:.2f}")


if __name__ == "__main__":
    main()
