"""Scheduling benchmark: sync vs one-step-off vs fully asynchronous RL on a virtual clock (issue 4).

Runs the simulation of `benchmarks/async_sim.py` (the real RolloutBuffer and SnapshotStore, a
fake engine whose decode step costs a + b·n) over three workloads and the modes sync,
one_step_off and async with η ∈ {1, 2, 4, 8}, then checks the "concurrency is free" case
against the predicted ratio (E[max of B T] + t + s) / (max(B·E[T]/C, t) + s); the model and the
prediction are described in async_sim.py.

Usage:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/async_speedup.py [--steps 60] [--check-steps 160]
Writes benchmarks/results/async_speedup.json and async_speedup.png (virtual time: the machine
does not matter; real run time is printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.async_sim import (  # noqa: E402
    WORKLOADS, Mode, ScheduleStats, SimConfig, free_concurrency_config, simulate, standard_modes,
)

RESULTS = Path(__file__).resolve().parent / "results"


# ---- report ------------------------------------------------------------------------------------

HEADER = (
    f"{'workload':<15} {'mode':<13} {'η':>2} {'ηh':>4} {'traj/s':>7} {'×sync':>6} {'stale μ':>7} {'p99':>4} "
    f"{'max':>4} {'drop%':>6} {'tr idle':>7} {'eng busy':>8} {'slots':>6} {'overlap':>7}"
)


def table_row(workload: str, s: ScheduleStats, sync_per_s: float) -> str:
    hard = "-" if s.eta_hard is None else str(s.eta_hard)
    return (
        f"{workload:<15} {s.mode:<13} {s.eta:>2} {hard:>4} {s.trajectories_per_s:>7.2f} {s.trajectories_per_s / sync_per_s:>6.2f} "
        f"{s.staleness_mean:>7.2f} {s.staleness_p99:>4.0f} {s.staleness_max:>4.0f} {100 * s.dropped_token_fraction:>6.1f} "
        f"{s.trainer_idle_fraction:>7.2f} {s.engine_busy_fraction:>8.2f} {s.slot_utilisation:>6.2f} {s.overlap_fraction:>7.2f}"
    )


def run_sweep(cfg: SimConfig, modes: list[Mode]) -> dict[str, list[ScheduleStats]]:
    return {name: [simulate(cfg, mode, w).stats for mode in modes] for name, w in WORKLOADS.items()}


def run_check(steps: int, seed: int, etas: tuple[int, ...]) -> dict:
    w = WORKLOADS["lognormal_s0.8"]
    cfg, pred = free_concurrency_config(w, batch_trajs=64, steps=steps, seed=seed)
    sync = simulate(cfg, Mode("sync", 0, "drain", 0), w).stats
    rows = []
    for eta in etas:
        for hard in (None, eta):
            s = simulate(cfg, Mode(f"async_eta{eta}", eta, "continue", hard), w).stats
            measured = s.trajectories_per_s / sync.trajectories_per_s
            rows.append({"stats": asdict(s), "measured_ratio": measured, "error": measured / pred.ratio - 1})
    return {"config": asdict(cfg), "workload": asdict(w), "prediction": asdict(pred), "sync": asdict(sync), "async": rows}


def print_report(sweep: dict[str, list[ScheduleStats]], check: dict) -> None:
    print(HEADER)
    for name, rows in sweep.items():
        sync = rows[0].trajectories_per_s
        for s in rows:
            print(table_row(name, s, sync))
    p, c = check["prediction"], check["config"]
    print(
        f"\nconcurrency is free: B = C = {c['slots']}, G = 1, b = 0, s = 0, t = E[T] = {p['mean_T_s']:.2f}s, "
        f"E[max of {c['slots']} T] = {p['max_T_s']:.2f}s → predicted async/sync = {p['ratio']:.2f}"
    )
    sync = check["sync"]["trajectories_per_s"]
    print(f"{HEADER}  vs predicted")
    print(table_row("free_conc", ScheduleStats(**check["sync"]), sync))
    for row in check["async"]:
        s = ScheduleStats(**row["stats"])
        print(f"{table_row('free_conc', s, sync)}  {row['error']:+.1%}")


def plot(sweep: dict[str, list[ScheduleStats]], check: dict, slack: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    modes = [s.mode for s in next(iter(sweep.values()))]
    width = 0.8 / len(sweep)
    for k, (name, rows) in enumerate(sweep.items()):
        sync = rows[0].trajectories_per_s
        ax1.bar(np.arange(len(modes)) + k * width, [s.trajectories_per_s / sync for s in rows], width, label=name)
    ax1.set_xticks(np.arange(len(modes)) + width * (len(sweep) - 1) / 2, modes, rotation=20)
    ax1.set_ylabel("throughput / sync")
    ax1.set_title(f"scheduling sweep (η_hard = η + {slack})")
    ax1.legend()
    for cutoff, marker, label in ((False, "o", "no cutoff"), (True, "s", "η_hard = η")):
        rows = [r for r in check["async"] if (r["stats"]["eta_hard"] is not None) == cutoff]
        ax2.plot([r["stats"]["eta"] for r in rows], [r["measured_ratio"] for r in rows], marker=marker, label=f"measured, {label}")
    pred = check["prediction"]["ratio"]
    ax2.axhline(pred, color="k", label=f"predicted {pred:.2f}")
    ax2.axhspan(0.85 * pred, 1.15 * pred, color="k", alpha=0.08, label="±15%")
    ax2.set_xscale("log", base=2)
    etas = sorted({r["stats"]["eta"] for r in check["async"]})
    ax2.set_xticks(etas, [str(eta) for eta in etas])
    ax2.set_xlabel("η")
    ax2.set_ylabel("async / sync")
    ax2.set_title("concurrency is free: C = B = 64, lognormal σ 0.8")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="train steps per sweep run (first 20%% not measured)")
    parser.add_argument("--check-steps", type=int, default=160, help="train steps per run of the prediction check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eta-hard-slack", type=int, default=0, help="sweep cutoff η_hard = η + this")
    args = parser.parse_args()
    start = time.perf_counter()
    cfg = SimConfig(steps=args.steps, warmup_steps=args.steps // 5, seed=args.seed)
    etas = (1, 2, 4, 8)
    sweep = run_sweep(cfg, standard_modes(etas, args.eta_hard_slack))
    check = run_check(args.check_steps, args.seed, etas)
    print_report(sweep, check)
    RESULTS.mkdir(exist_ok=True)
    out = {
        "description": "virtual-clock scheduling simulation; throughput in trajectories per virtual second",
        "config": asdict(cfg),
        "eta_hard_slack": args.eta_hard_slack,
        "workloads": {name: asdict(w) for name, w in WORKLOADS.items()},
        "sweep": {name: [asdict(s) for s in rows] for name, rows in sweep.items()},
        "concurrency_is_free": check,
        "real_s": time.perf_counter() - start,
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
    }
    (RESULTS / "async_speedup.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(sweep, check, args.eta_hard_slack, RESULTS / "async_speedup.png")
    print(f"\nwrote {RESULTS / 'async_speedup.json'} and async_speedup.png in {time.perf_counter() - start:.1f}s real time")


if __name__ == "__main__":
    main()
