"""Seeded sampling cost per decode step: `sample_tokens` on N rows, all unseeded vs all seeded.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/seeded_sampling.py [--rows 256] [--vocab 4096] [--device cpu]

Prints the median milliseconds per call of each case. Seeded rows draw their uniforms from
(seed, position) in one vectorised counter-based hash (`engine.sampling.counter_uniforms`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from policyflow.engine import sampling


def seeded_rows(n: int, device: str):
    """The engine's per-step argument for n seeded rows, in whichever form this version takes."""
    if hasattr(sampling, "RowSeeds"):
        return sampling.RowSeeds.of([7 + i for i in range(n)], [10] * n, device)
    return [torch.Generator(device).manual_seed(7 + i) for i in range(n)]


def time_calls(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    logits = torch.randn(args.rows, args.vocab, device=args.device)
    shared = torch.Generator(args.device).manual_seed(0)
    rows = seeded_rows(args.rows, args.device)
    for name, extra in (("unseeded", None), ("seeded", rows)):
        fn = lambda: sampling.sample_tokens(logits, 1.0, 1.0, shared, 0, extra)  # noqa: E731
        for _ in range(10):
            fn()
        print(f"{name:9s} rows={args.rows} vocab={args.vocab} device={args.device}: {time_calls(fn, args.repeats, args.device):.3f} ms per call")


if __name__ == "__main__":
    main()
