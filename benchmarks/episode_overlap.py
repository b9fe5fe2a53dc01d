"""Episodes waiting on tools hold no decode slot: N multi-turn episodes on one async engine,
all at once vs one at a time, with an injected tool latency (the tiny model, CPU).

Each episode takes `--turns` turns of `--new-tokens` tokens; after each turn but the last its
tool sleeps `--latency` seconds (`asyncio.sleep`, as a network call would). Run all at once,
the engine decodes the other episodes while some wait on their tools; one at a time, the engine
idles during every tool call. Reports wall times, and what the tool latency cost when the
episodes run together (together with latency − together without), against the least it can
cost, (turns − 1) × latency: one episode's own chain of waits.

Usage:  .venv/bin/python benchmarks/episode_overlap.py [--episodes 32] [--turns 4] [--latency 0.05]
Writes benchmarks/results/episode_overlap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policyflow.agent.env import Env, StepResult  # noqa: E402
from policyflow.agent.episode import EpisodeRunner  # noqa: E402
from policyflow.config import AgentConfig  # noqa: E402
from policyflow.engine import AsyncEngine, SamplingParams  # noqa: E402
from policyflow.model import build_tiny  # noqa: E402
from policyflow.types import ToolStats  # noqa: E402


class SlowToolEnv(Env):
    def __init__(self, turns: int, latency: float) -> None:
        self.turns, self.latency, self.done = turns, latency, 0

    async def initial_observation(self) -> str:
        return "Q: 12+30? "

    async def step(self, action: str) -> StepResult:
        self.done += 1
        if self.done >= self.turns:
            return StepResult(done=True)
        await asyncio.sleep(self.latency)
        return StepResult(observation=" [result] ", tools=ToolStats(calls=1))


async def timed(runner: EpisodeRunner, episodes: int, turns: int, latency: float, together: bool) -> tuple[float, float]:
    engine = runner.generator
    busy0, start = engine.stats["busy_s"], time.perf_counter()
    envs = [SlowToolEnv(turns, latency) for _ in range(episodes)]
    if together:
        await asyncio.gather(*(runner.run(env, id=str(i), task_id="b") for i, env in enumerate(envs)))
    else:
        for i, env in enumerate(envs):
            await runner.run(env, id=str(i), task_id="b")
    wall = time.perf_counter() - start
    return wall, (engine.stats["busy_s"] - busy0) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "episode_overlap.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build_tiny(seed=0)
    engine = AsyncEngine(model.eval(), tokenizer, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    runner = EpisodeRunner(engine, tokenizer, params, AgentConfig(max_turns=args.turns))

    async def both():
        await timed(runner, 2, 2, 0.0, True)  # warm-up
        no_tools = await timed(runner, args.episodes, args.turns, 0.0, True)
        return no_tools, await timed(runner, args.episodes, args.turns, args.latency, True), await timed(runner, args.episodes, args.turns, args.latency, False)

    (wall_free, _), (wall_together, busy_together), (wall_serial, busy_serial) = asyncio.run(both())
    result = {
        "machine": "shared 2-core CPU", "episodes": args.episodes, "turns": args.turns, "new_tokens": args.new_tokens,
        "tool_latency_s": args.latency, "threads": args.threads,
        "together_no_latency_s": round(wall_free, 3), "together_s": round(wall_together, 3), "one_at_a_time_s": round(wall_serial, 3),
        "latency_cost_together_s": round(wall_together - wall_free, 3), "latency_cost_least_s": round((args.turns - 1) * args.latency, 3),
        "speedup": round(wall_serial / wall_together, 2),
        "engine_busy_together": round(busy_together, 3), "engine_busy_one_at_a_time": round(busy_serial, 3),
        "tool_wait_one_at_a_time_s": round(args.episodes * (args.turns - 1) * args.latency, 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
