"""Shared by the benchmarks that train: one SFT warm-start per results folder, and a PNG figure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from policyflow.config import load_config
from policyflow.coordinator import run_sft


def shared_warm_start(preset: Path, common: list[str]) -> Path:
    """The SFT model of `preset` under `common` overrides, trained once and reused (<output_dir>/sft/sft)."""
    cfg = load_config(preset, [*common, "run.name=sft"])
    folder = cfg.run_dir / "sft"
    if not (folder / "config.json").is_file():
        run_sft(cfg)
    return folder


def save_figure(path: Path, draw: Callable, xlabel: str, ylabel: str) -> None:
    """`draw(ax)` adds the data; axes labels, legend and grid are added here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
