"""Peak context and time per turn of long search episodes under `full` and `mem1` (issue 10 §6).

One search episode per (context policy, number of turns) on the real pieces: the async engine
decoding the tiny model (`model.build_tiny`), the `EpisodeRunner` with the context policy under
test, and `ToolEnv` (search_qa's configuration) calling the BM25 `search_tool` through a `ToolPool` over the search_qa
corpus (`tasks/search_qa.py`, 200 made-up places).

The policy is scripted (`benchmarks/scripted_search.py`), because an untrained model would
answer, or write malformed turns, at random: every turn the model samples exactly
`--new-tokens` tokens (ignore_eos, no stop strings) into the episode as its `gen` segment, and
`ScriptedSearchEnv` hands the real `ToolEnv` the scripted action
`<state>k</state><search>NAME_k</search>` (turn k searches place k) in place of the model's
text; it never answers, so every episode runs `turns` turns, or stops
`truncated` when the next call would pass `agent.max_total_tokens`. Token counts per turn are
those of a policy writing `--new-tokens`-token actions; decode, tool and context policy are the
library's own.

Under `full` the context is the whole history, so it grows by one turn (gen + obs tokens) per
turn until `--max-total-tokens` (the model is built with that many positions), where the
episode ends `truncated`: the row's `turns_done` says how far it got. Under `mem1` each call
sees the prompt, the latest turn and the latest observation.

Each row: context, turns (asked), turns_done, status, stopped_by, peak_context_tokens (the largest context
any call saw, in tokens), seconds_per_turn (episode wall time / turns_done).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/agent_turns.py [--turns 8 32 128 256]
Writes benchmarks/results/agent_turns.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scripted_search import ScriptedSearchEnv  # noqa: E402
from policyflow.agent.context import context_policy, context_tokens  # noqa: E402
from policyflow.agent.episode import EpisodeRunner  # noqa: E402
from policyflow.config import AgentConfig  # noqa: E402
from policyflow.engine import AsyncEngine, SamplingParams  # noqa: E402
from policyflow.model import build_tiny  # noqa: E402
from policyflow.tasks.search_qa import SearchQATask  # noqa: E402


def scripted_runner(engine: AsyncEngine, tokenizer, context: str, turns: int, new_tokens: int, max_obs_tokens: int, max_total_tokens: int) -> EpisodeRunner:
    """The runner of one benchmark episode: `new_tokens` sampled tokens per turn, at most `turns` turns."""
    agent = AgentConfig(max_turns=turns, max_total_tokens=max_total_tokens, max_obs_tokens=max_obs_tokens, context=context)
    return EpisodeRunner(engine, tokenizer, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), agent, context=context_policy(context))


def peak_context(trajectory) -> int:
    return max(context_tokens(trajectory.segments, call.context) for call in trajectory.calls)


async def run_episode(runner: EpisodeRunner, task: SearchQATask, seed: int) -> tuple[object, float]:
    problem = task.train_problem(seed)
    inner = (await task.group_builder(problem).make_envs(1))[0]
    start = time.perf_counter()
    trajectory = await runner.run(ScriptedSearchEnv(task, inner), id=f"bench/{seed}", task_id="bench")
    return trajectory, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, nargs="+", default=[8, 32, 128, 256])
    parser.add_argument("--contexts", nargs="+", default=["full", "mem1"])
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens the model writes per turn")
    parser.add_argument("--max-obs-tokens", type=int, default=48)
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="agent.max_total_tokens, and the model's positions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "agent_turns.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = build_tiny(seed=0, max_positions=args.max_total_tokens)
    engine = AsyncEngine(model.eval(), tokenizer, generator=torch.Generator().manual_seed(0))
    task = SearchQATask(seed=0, corpus_dir=ROOT / "runs" / "bench-agent-turns")

    rows = []
    for context in args.contexts:
        for turns in args.turns:
            runner = scripted_runner(engine, tokenizer, context, turns, args.new_tokens, args.max_obs_tokens, args.max_total_tokens)
            trajectory, seconds = asyncio.run(run_episode(runner, task, seed=turns))
            row = {
                "context": context, "turns": turns, "turns_done": trajectory.num_turns, "status": trajectory.status,
                "stopped_by": "max_turns" if trajectory.num_turns == turns else "max_total_tokens",
                "peak_context_tokens": peak_context(trajectory), "seconds_per_turn": round(seconds / trajectory.num_turns, 4),
                "tool_calls": trajectory.num_tool_calls,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    mem1 = {r["turns"]: r["peak_context_tokens"] for r in rows if r["context"] == "mem1"}
    result = {
        "machine": "shared 2-core CPU (other jobs running)", "model": "build_tiny (char-level, 4 layers, hidden 128)",
        "threads": args.threads, "new_tokens_per_turn": args.new_tokens, "max_obs_tokens": args.max_obs_tokens,
        "max_total_tokens": args.max_total_tokens, "backend": engine.backend_name, "rows": rows,
        "mem1_peak_ratio_128_over_8": round(mem1[128] / mem1[8], 3) if 8 in mem1 and 128 in mem1 else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
