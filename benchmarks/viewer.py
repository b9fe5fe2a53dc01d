"""What the trajectory viewer (`policyflow view`) costs with many episodes.

A synthetic run folder holds `--episodes` (default 10,000) agent episodes in the episode-record
format of samples.jsonl: a prompt, `--turns` calls of `--gen-tokens` generated tokens each with
an observation of `--obs-tokens` between them, per-token texts, ids, loss masks, log-probs (full
float precision, as written) and versions. Measured:
- **page generation**: wall time of `view.write_view` (read and normalise the lines, write the
  page), best and median of `--runs`; the sizes of samples.jsonl and of the page;
- **load to first render** in headless Debian Chromium (Playwright, `/usr/bin/chromium`), all
  since navigation start: the page's own `performance.now()` when its first page of rows is in
  the DOM (HTML up to the page's script, `JSON.parse` of the summaries, the first filter and
  render), the first contentful paint, and the end of DOMContentLoaded (the whole page, every
  episode's record, parsed); the wall time from `page.goto` until Python sees the rows (it waits
  while the browser is busy parsing); the JS heap after load;
- **interactions** timed inside the page (synchronous DOM work): next page, a status filter, a sort
  by reward over all episodes, and opening one episode (its token spans).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/viewer.py [--episodes 10000] [--runs 3]
Writes benchmarks/results/viewer.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policyflow.view import PAGE_SIZE, write_view  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
WORDS = [" the", " answer", " is", " search", "(", ")", " 42", "\n", " Paris", " we", " need", " to", "<tool_call>", "</tool_call>", " first", "."]


def synthetic_episode(rng: random.Random, n: int, turns: int, prompt_tokens: int, gen_tokens: int, obs_tokens: int) -> dict:
    """One agent episode record: prompt, then `turns` × (gen, obs), the last gen without an obs."""
    step = 1 + n // 64
    version = step

    def segment(kind: str, turn: int | None, size: int) -> dict:
        texts = [rng.choice(WORDS) for _ in range(size)]
        gen = kind == "gen"
        return {
            "kind": kind, "turn": turn, "text": "".join(texts), "token_ids": [rng.randrange(50_000) for _ in range(size)], "token_texts": texts,
            "loss_mask": [int(gen)] * size, "logprobs": [-rng.expovariate(2.0) for _ in range(size)] if gen else None,
            "versions": [max(0, version - rng.choice((0, 0, 0, 1, 2))) for _ in range(size)] if gen else None,
        }

    segments, calls = [segment("prompt", None, prompt_tokens)], []
    for turn in range(turns):
        calls.append({"context": list(range(len(segments))), "produced": len(segments)})
        segments.append(segment("gen", turn, gen_tokens))
        if turn < turns - 1:
            segments.append(segment("obs", turn, obs_tokens))
    correct = float(rng.random() < 0.4)
    parts = {"correct": correct, "search_penalty": -0.05 * (turns - 1)}
    return {
        "kind": "train", "step": step, "version": version, "episode_id": f"ep-{n}", "task_id": f"q{n // 8}", "prompt": segments[0]["text"], "answer": "42",
        "reward": sum(parts.values()), "reward_parts": parts, "advantage": rng.gauss(0, 1), "status": "truncated" if rng.random() < 0.1 else "complete",
        "finish_reason": "stop", "turns": turns, "tool_calls": turns - 1, "tool_errors": 0, "segments": segments, "calls": calls,
        "steps": [{"calls": [{"tool": "search", "arguments": {"query": "x"}, "error": None}]}] * (turns - 1) + [{"answer": "42"}],
    }


def browser_figures(page_path: Path, runs: int) -> dict:
    from playwright.sync_api import sync_playwright

    loads, first_renders, paints, parsed, heaps, interactions = [], [], [], [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        for _ in range(runs):
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            page = context.new_page()
            page.set_default_timeout(300_000)
            start = time.perf_counter()
            page.goto(page_path.resolve().as_uri(), wait_until="commit")
            page.wait_for_function("window.viewer !== undefined", polling=10)
            loads.append(time.perf_counter() - start)
            first_renders.append(page.evaluate("window.viewer.firstRenderMs") / 1000)
            assert page.locator("#rows tr").count() == PAGE_SIZE
            page.wait_for_load_state("load")
            paints.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime") / 1000)
            parsed.append(page.evaluate("performance.getEntriesByType('navigation')[0].domContentLoadedEventEnd") / 1000)
            heaps.append(page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : null"))
            interactions.append(page.evaluate("""() => {
                const time = (f) => { const t = performance.now(); f(); return (performance.now() - t) / 1000; };
                const $ = (id) => document.getElementById(id);
                const change = (id, value) => { $(id).value = value; $(id).dispatchEvent(new Event("change")); };
                return {
                    next_page_s: time(() => $("next").click()),
                    filter_status_s: time(() => change("status", "truncated")),
                    sort_by_reward_s: time(() => { change("status", ""); change("sort", "reward-desc"); }),
                    open_episode_s: time(() => $("rows").firstElementChild.click()),
                    tokens_shown: document.querySelectorAll("#episode .tok").length,
                };
            }"""))
            context.close()
        version = browser.version
        browser.close()
    median = lambda key: statistics.median(i[key] for i in interactions)  # noqa: E731
    return {
        "chromium": version, "load_to_first_render_s_in_page": {"best": min(first_renders), "median": statistics.median(first_renders)},
        "first_contentful_paint_s": {"best": min(paints), "median": statistics.median(paints)},
        "whole_page_parsed_s": {"best": min(parsed), "median": statistics.median(parsed)},
        "goto_to_first_render_s_wall": {"best": min(loads), "median": statistics.median(loads)}, "js_heap_mb": (heaps[-1] or 0) / 2**20,
        "interactions_median_s": {k: median(k) for k in ("next_page_s", "filter_status_s", "sort_by_reward_s", "open_episode_s")},
        "tokens_shown_in_opened_episode": interactions[-1]["tokens_shown"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=10_000)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--gen-tokens", type=int, default=150)
    parser.add_argument("--obs-tokens", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "viewer.json")
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "runs" / "bench"
        run.mkdir(parents=True)
        with (run / "samples.jsonl").open("w") as f:
            for n in range(args.episodes):
                f.write(json.dumps(synthetic_episode(rng, n, args.turns, args.prompt_tokens, args.gen_tokens, args.obs_tokens)) + "\n")
        generation = []
        for _ in range(args.runs):
            start = time.perf_counter()
            page = write_view(run)
            generation.append(time.perf_counter() - start)
        result = {
            "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), python {platform.python_version()}",
            "episodes": args.episodes, "tokens_per_episode": args.prompt_tokens + args.turns * args.gen_tokens + (args.turns - 1) * args.obs_tokens,
            "page_size_rows": PAGE_SIZE, "samples_jsonl_mb": (run / "samples.jsonl").stat().st_size / 2**20, "page_mb": page.stat().st_size / 2**20,
            "page_generation_s": {"best": min(generation), "median": statistics.median(generation)},
        } | browser_figures(page, args.runs)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
