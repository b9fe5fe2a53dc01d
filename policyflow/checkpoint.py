"""Checkpoints: the model in Hugging Face format plus optimizer, RNG and loop state.

`runs/<name>/checkpoints/step-N/` loads with `AutoModelForCausalLM.from_pretrained`; the file
`trainer_state.pt` beside the weights lets `--resume` continue exactly where the run stopped.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from policyflow.model import save_pretrained

STATE_FILE = "trainer_state.pt"


@dataclass
class LoopState:
    """Where the RL loop stands; everything needed to continue besides weights and optimizer."""

    step: int = 0
    version: int = 0
    next_problem: int = 0
    wall_seconds: float = 0.0
    eval_before: dict[str, float] = field(default_factory=dict)
    consumed_task_ids: list[str] = field(default_factory=list)  # trained, in order
    in_flight_task_ids: list[str] = field(default_factory=list)  # issued, not trained when saved: dropped by a resume


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer | None,
    loop: LoopState,
    generator: torch.Generator | None,
    keep_last: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    folder = run_dir / "checkpoints" / f"step-{loop.step}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tokenizer, tmp)
    blob = {
        "loop": asdict(loop),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng_state(generator),
        **(extra or {}),
    }
    torch.save(blob, tmp / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_state(folder: Path) -> dict[str, Any]:
    """The non-weight part of a checkpoint: loop state, optimizer state, RNG state."""
    blob = torch.load(folder / STATE_FILE, weights_only=False)
    blob["loop"] = LoopState(**blob["loop"])
    return blob
