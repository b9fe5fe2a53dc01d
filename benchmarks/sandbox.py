"""What the code sandbox (`policyflow.tools.code`) costs: start-up latency and executions per second.

Measured side by side in one run, interleaved so that other jobs on a shared machine slow both
alike:
- **start-up**: wall time of `run_python("pass")` (p50 and p99 over `--runs` calls), against a
  bare `subprocess.run([sys.executable, "-c", "pass"])` (what "a local subprocess, not
  sandboxed" costs: this interpreter with its site-packages, .pth files included) and
  `[sys.executable, "-I", "-S", "-c", "pass"]` (the interpreter start the sandbox itself uses).
  Also `run_python(..., isolation="none")` (the same plumbing, no namespaces) and the pieces of
  the sandbox on their own, to show where the time goes: `unshare` making and tearing down the
  namespaces around `true`, the interpreter with the modules our supervisor imports, and both.
- **throughput**: executions per second of a small program (`print(sum(range(10000)))`) with 1, 4
  and 16 at once (asyncio, `run_python_async`), against bare subprocesses at the same concurrency,
  in five interleaved slices per runner.

Goal (issue 18): p50 start-up under 50 ms on a 2-core machine (`docker run` takes ~300 ms).

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sandbox.py [--runs 200] [--seconds 10]
Writes benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policyflow.tools import code  # noqa: E402

PYTHON = sys.executable  # this interpreter as a caller would start it (a venv's python loads the venv's site)
NAMESPACES = ["--mount", "--pid", "--net", "--ipc", "--uts", "--kill-child"]
WORK = "print(sum(range(10000)))"


def startup_commands() -> dict[str, Callable[[], object]]:
    """name -> a call that starts something, runs `pass` and waits for the end."""
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    unshare = [code.UNSHARE, *userns, *NAMESPACES]
    supervisor_imports = "import _signal, ctypes, os, resource, select, sys, time, site, types"
    return {
        "sandbox": lambda: code.run_python("pass"),
        "sandbox_isolation_none": lambda: code.run_python("pass", isolation="none"),
        "bare_python": lambda: subprocess.run([PYTHON, "-c", "pass"], check=True),
        "bare_python_-I_-S": lambda: subprocess.run([PYTHON, "-I", "-S", "-c", "pass"], check=True),
        "piece_unshare_true": lambda: subprocess.run([*unshare, "true"], check=True),
        "piece_python_-I_-S_supervisor_imports": lambda: subprocess.run([PYTHON, "-I", "-S", "-c", supervisor_imports], check=True),
        "piece_unshare_python_-I_-S_supervisor_imports": lambda: subprocess.run(
            [*unshare, os.path.realpath(PYTHON), "-I", "-S", "-c", supervisor_imports], check=True),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def startup(runs: int) -> dict[str, dict[str, float]]:
    commands = startup_commands()
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, call in commands.items():  # warm-up: page cache, first-call costs
        call()
    for _ in range(runs):
        for name, call in commands.items():  # interleaved, so noise hits every row alike
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: {"p50_ms": round(1000 * percentile(t, 0.5), 1), "p99_ms": round(1000 * percentile(t, 0.99), 1),
                   "mean_ms": round(1000 * sum(t) / len(t), 1)} for name, t in times.items()}


async def bare_run(source: str, *flags: str) -> None:
    proc = await asyncio.create_subprocess_exec(PYTHON, *flags, "-c", source, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    await proc.communicate()


async def bare_run_isolated_flags(source: str) -> None:
    await bare_run(source, "-I", "-S")


async def sandbox_run(source: str) -> None:
    result = await code.run_python_async(source)
    assert result.ok and result.stdout == f"{sum(range(10000))}\n", result


async def throughput(run: Callable[[str], Awaitable[None]], concurrency: int, seconds: float) -> tuple[int, float]:
    """(executions, seconds taken) with `concurrency` runs always in flight for about `seconds`."""
    done = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await run(WORK)
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - start


def rates(concurrency: int, seconds: float, rounds: int = 5) -> dict[str, float]:
    """Executions per second of each runner, measured in `rounds` interleaved slices."""
    runners = {"sandbox": sandbox_run, "bare_python": bare_run, "bare_python_-I_-S": bare_run_isolated_flags}
    totals = {name: [0, 0.0] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            done, taken = asyncio.run(throughput(run, concurrency, seconds / rounds))
            totals[name][0] += done
            totals[name][1] += taken
    return {name: done / taken for name, (done, taken) in totals.items()}


def machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "kernel": platform.release(),
        "python": platform.python_version(), "caller": "root" if os.geteuid() == 0 else "unprivileged user",
        "sandbox_mode": "root: mount/pid/net/ipc/uts namespaces, code under its own uid" if os.geteuid() == 0
        else "user namespace (unshare --user --map-root-user) + mount/pid/net/ipc/uts",
        "shared": "machine shared with other jobs; rows interleaved", "git_commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="start-up runs per row")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per runner and concurrency (5 interleaved slices)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sandbox.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    latency = startup(args.runs)
    for name, row in latency.items():
        print(f"start-up {name:40s} p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms")
    rows = []
    for concurrency in (1, 4, 16):
        r = rates(concurrency, args.seconds)
        rows.append({"concurrency": concurrency, **{f"{name}_per_s": round(v, 1) for name, v in r.items()},
                     "sandbox_over_bare_python": round(r["sandbox"] / r["bare_python"], 2),
                     "sandbox_over_bare_python_-I_-S": round(r["sandbox"] / r["bare_python_-I_-S"], 2)})
        print(f"throughput x{concurrency:<3d} sandbox {r['sandbox']:6.1f}/s  bare python -c {r['bare_python']:6.1f}/s  "
              f"bare python -I -S -c {r['bare_python_-I_-S']:6.1f}/s")
    sandbox_p50, bare_p50 = latency["sandbox"]["p50_ms"], latency["bare_python"]["p50_ms"]
    result = {
        "machine": {**machine(), "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "runs": args.runs, "throughput_seconds": args.seconds, "throughput_program": WORK,
        "startup": latency, "throughput": rows,
        "summary": {"sandbox_p50_ms": sandbox_p50, "sandbox_p99_ms": latency["sandbox"]["p99_ms"],
                    "goal_p50_ms": 50, "meets_goal": sandbox_p50 < 50,
                    "sandbox_minus_bare_python_p50_ms": round(sandbox_p50 - bare_p50, 1),
                    "sandbox_minus_bare_python_-I_-S_p50_ms": round(sandbox_p50 - latency["bare_python_-I_-S"]["p50_ms"], 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
