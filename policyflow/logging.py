"""Run outputs: metrics and samples as JSON lines, run totals across resumes, a live progress bar, and a PNG plot."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


class JsonlWriter:
    """Appends one JSON object per line; the file survives interruptions line by line."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


# Metrics counted from the start of the run (pool and buffer counters); a resume adds the checkpoint's totals.
CUMULATIVE = (
    "rollout/generated_tokens", "rollout/reward_errors", "async/weight_updates", "async/aborted_sequences",
    "async/aborted_tokens", "async/worker_restarts", "async/dropped_stale_groups", "async/dropped_stale_trajectories",
    "async/dropped_stale_tokens", "async/filtered_tokens", "async/refills",
    "async/requeues", "async/reissues", "async/issued_groups", "async/accepted_groups", "async/trained_groups",
)


def is_cumulative(key: str) -> bool:
    return key in CUMULATIVE or key.startswith("async/filtered/")


class RunTotals:
    """Cumulative counters across resumes: this process's counts plus those saved in the checkpoint."""

    def __init__(self, offsets: dict[str, float]) -> None:
        self.offsets = dict(offsets)

    def of(self, metrics: dict[str, float]) -> dict[str, float]:
        return {k: v + self.offsets.get(k, 0.0) if is_cumulative(k) else v for k, v in metrics.items()}

    def counters(self, metrics: dict[str, float]) -> dict[str, float]:
        """The run totals of the cumulative metrics, as stored in LoopState.counters."""
        return {k: v for k, v in self.of(metrics).items() if is_cumulative(k)}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Progress:
    """A tqdm bar showing step, reward, accuracy and tokens/s (tqdm computes the ETA)."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "rl"):
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def update(self, metrics: dict[str, float]) -> None:
        shown = {
            "loss": metrics.get("sft/loss"),
            "reward": metrics.get("rollout/reward_mean"),
            "acc": metrics.get("eval/accuracy_sampled"),
            "tok/s": metrics.get("perf/rollout_tokens_per_s"),
        }
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def plot_run(metrics_path: Path, out_path: Path) -> Path | None:
    """Reward and held-out accuracy against step and wall time, saved as a PNG; agents (tool calls
    logged) get a third panel with tool calls and turns per episode against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_jsonl(metrics_path) if "step" in r]
    if not rows:
        return None
    agent = any(r.get("agent/tool_calls_mean", 0.0) > 0 for r in rows)
    fig, axes = plt.subplots(1, 3 if agent else 2, figsize=(16 if agent else 11, 4))
    for ax, x_key, x_label in ((axes[0], "step", "RL step"), (axes[1], "wall_seconds", "wall time (s)")):
        for key, label in (("rollout/reward_mean", "train reward"), ("eval/accuracy_sampled", "held-out acc (sampled)"), ("eval/accuracy_greedy", "held-out acc (greedy)")):
            pts = [(r[x_key], r[key]) for r in rows if key in r and x_key in r and not math.isnan(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, label=label)
        ax.set_xlabel(x_label)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward / accuracy")
    if agent:
        for key, label in (("agent/tool_calls_mean", "tool calls per episode"), ("agent/turns_mean", "turns per episode")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                axes[2].plot(*zip(*pts), label=label)
        axes[2].set_xlabel("RL step")
        axes[2].grid(alpha=0.3)
        axes[2].legend(loc="upper right")
    axes[0].legend(loc="lower right")
    fig.suptitle(metrics_path.parent.name)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
