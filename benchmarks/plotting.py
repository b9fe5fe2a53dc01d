"""One figure of curves against wall time, saved as PNG (matplotlib without a display)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


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
