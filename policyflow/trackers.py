"""Metrics trackers: every metrics line of a run goes through one `MetricsWriter`, which hands it
to each tracker named in `run.trackers`, under the same names.

The driver (coordinator) is the only writer; the lines it writes are of three kinds:

* RL:     {"step": int (strictly increasing; 0 is the evaluation before RL), "wall_seconds": float, name: float, ...}
* SFT:    {"sft_step": int, "sft/loss" or "sft/accuracy_greedy": float} (the trainer's warm-start, collected by the driver)
* resume: {"resumed_at_step": int, "checkpoint": str, "overrides": {...}}

Trackers:

* `jsonl` — `<run>/metrics.jsonl`, every line as written (a resume drops the lines after its
  checkpoint step: `rundir.drop_lines_after`).
* `tensorboard` — event files: RL scalars under `<run>/tensorboard/rl` at global step `step`,
  SFT scalars (`sft/*`) under `<run>/tensorboard/sft` at global step `sft_step` (two TensorBoard
  runs, so that a resume's purge of RL steps never touches SFT's). Each writer starts with a
  purge at the first step it writes (0 for a fresh run, the checkpoint step + 1 for a resume),
  so TensorBoard drops the events a stopped run wrote after its checkpoint, as a resume drops
  those lines from metrics.jsonl (and a fresh run with run.overwrite=true hides an old run's).
* `wandb` — Weights & Biases (`pip install 'policyflow[wandb]'`), imported only when named.
  `WANDB_MODE=offline` (read by wandb itself) runs with no network; files go under
  `<run>/wandb/`. The wandb run id is kept in `<run>/wandb/policyflow-run-id`, so a resume
  continues the same wandb run; wandb cannot drop steps, so the steps between the checkpoint
  and the stop are logged again after a resume. `sft/*` are plotted against `sft_step`,
  everything else against `step`.

Only numbers (not booleans) go to TensorBoard and wandb; the resume line goes to jsonl only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol

from policyflow.config import ConfigError
from policyflow.logging import JsonlWriter

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


class Tracker(Protocol):
    def write(self, line: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(line: dict[str, Any]) -> tuple[str, int, dict[str, float]] | None:
    """(axis, step, numeric values) of a metrics line: axis "sft" for SFT lines, "rl" for RL lines;
    None for lines without a step (the resume line). The step key itself is not among the values."""
    if isinstance(line.get("sft_step"), int):
        axis, key = "sft", "sft_step"
    elif isinstance(line.get("step"), int):
        axis, key = "rl", "step"
    else:
        return None
    values = {k: float(v) for k, v in line.items() if k != key and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return axis, line[key], values


class JsonlTracker:
    """`<run>/metrics.jsonl`: every line as written."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = JsonlWriter(run_dir / "metrics.jsonl")

    def write(self, line: dict[str, Any]) -> None:
        self.writer.write(line)

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files under `<run>/tensorboard/{rl,sft}` (torch's SummaryWriter), flushed after every line."""

    def __init__(self, run_dir: Path, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._make = lambda axis: SummaryWriter(str(run_dir / TENSORBOARD_DIR / axis), purge_step=first_step if axis == "rl" else 0)
        self.writers: dict[str, Any] = {}

    def write(self, line: dict[str, Any]) -> None:
        found = scalars(line)
        if found is None:
            return
        axis, step, values = found
        if axis not in self.writers:  # the SFT writer only when SFT runs (fresh runs only)
            self.writers[axis] = self._make(axis)
        writer = self.writers[axis]
        for name, value in values.items():
            writer.add_scalar(name, value, global_step=step)
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


WANDB_MISSING = (
    "run.trackers includes wandb but the wandb package is not installed: pip install 'policyflow[wandb]' "
    "(WANDB_MODE=offline runs it with no network), or remove wandb from run.trackers"
)


class WandbTracker:
    """A wandb run in `<run>/wandb/` (project $WANDB_PROJECT, default "policyflow"; mode from $WANDB_MODE)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], first_step: int) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(WANDB_MISSING) from None
        folder = run_dir / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "policyflow-run-id"
        if first_step == 0 or not id_file.is_file():  # a fresh run starts a new wandb run; a resume continues its own
            id_file.write_text(uuid.uuid4().hex[:16])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "policyflow"), name=run_name, dir=str(run_dir),
            id=id_file.read_text().strip(), resume="allow", config=config,
        )
        self.run.define_metric("sft_step")
        self.run.define_metric("sft/*", step_metric="sft_step")
        self.run.define_metric("step")
        self.defined: set[str] = set()

    def write(self, line: dict[str, Any]) -> None:
        found = scalars(line)
        if found is None:
            return
        axis, step, values = found
        if axis == "rl":
            for name in values.keys() - self.defined:  # plotted against `step`, not wandb's own counter
                self.run.define_metric(name, step_metric="step")
                self.defined.add(name)
        self.run.log({"sft_step" if axis == "sft" else "step": step, **values})

    def close(self) -> None:
        self.run.finish()


class MetricsWriter:
    """The one writer of a run's metrics: each line goes to every tracker, in `run.trackers` order."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def write(self, line: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.write(line)

    def write_all(self, lines: list[dict[str, Any]]) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def check_trackers(names: tuple[str, ...]) -> None:
    """A one-line ConfigError when a tracker of `names` cannot run here (wandb not installed);
    called before a run starts, so that nothing is loaded or written first."""
    if "wandb" in names and not _importable("wandb"):
        raise ConfigError(WANDB_MISSING)


def _importable(name: str) -> bool:
    """Whether `import name` would find the module (checked without importing it)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def open_trackers(run_dir: Path, names: tuple[str, ...], *, first_step: int, run_name: str, config: dict[str, Any]) -> MetricsWriter:
    """A `MetricsWriter` over the trackers `names` (`run.trackers`) of the run in `run_dir`, whose
    first RL line is step `first_step` (0: a fresh run; a resume: its checkpoint step + 1)."""
    makers = {
        "jsonl": lambda: JsonlTracker(run_dir),
        "tensorboard": lambda: TensorBoardTracker(run_dir, first_step),
        "wandb": lambda: WandbTracker(run_dir, run_name, config, first_step),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ConfigError(f"run.trackers={list(names)}: {unknown[0]!r} is not a tracker; allowed: {', '.join(makers)}")
    check_trackers(names)
    return MetricsWriter([makers[name]() for name in names])
