"""Checkpoints: the model in Hugging Face format plus optimizer, RNG and loop state.

`runs/<name>/checkpoints/step-N/` loads with `AutoModelForCausalLM.from_pretrained`; the file
`trainer_state.pt` beside the weights lets `--resume` continue exactly where the run stopped.

Safety: a checkpoint is written into `step-N.tmp/`, its `manifest.json` (size and sha256 of
every file) last, and only then renamed to `step-N/`, so a folder named `step-N` is complete.
A write that fails removes the temporary folder and raises one `CheckpointError` line; the
previous checkpoints are untouched. Every load checks the files against the manifest; a resume
whose newest checkpoint fails the check moves it aside (`step-N.corrupt`) and uses the one
before, saying so.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from policyflow.model import save_pretrained

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or fails verification; the message is one line."""


@dataclass
class LoopState:
    """Where the RL loop stands; everything needed to continue besides weights and optimizer."""

    step: int = 0
    version: int = 0
    next_problem: int = 0
    wall_seconds: float = 0.0
    eval_before: dict[str, Any] = field(default_factory=dict)
    consumed_task_ids: list[str] = field(default_factory=list)  # trained, in order
    in_flight_task_ids: list[str] = field(default_factory=list)  # issued, not trained when saved: dropped by a resume
    counters: dict[str, float] = field(default_factory=dict)  # run totals of the cumulative metrics (continued by a resume)


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
    """Write `checkpoints/step-N/` atomically (temporary folder, manifest last, rename); keep the newest `keep_last`."""
    folder = run_dir / "checkpoints" / f"step-{loop.step}"

    def write(tmp: Path) -> None:
        save_pretrained(model, tokenizer, tmp)
        blob = {
            "loop": asdict(loop),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": rng_state(generator),
            **(extra or {}),
        }
        torch.save(blob, tmp / STATE_FILE)

    try:
        write_folder(folder, write)
    except Exception as err:
        kept = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"could not write checkpoint {folder}: {_reason(err)}; nothing was left behind, and "
            f"{f'the previous checkpoint {kept} is intact' if kept else 'there is no earlier checkpoint'}"
        ) from err
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write `folder` atomically: `write(tmp)` into `folder.tmp`, the manifest last, then rename.

    On any failure the temporary folder is removed (no debris) and the error propagates; an
    existing `folder` stays as it was until the rename.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        write_manifest(tmp)
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_folder(folder: Path, model: torch.nn.Module, tokenizer, what: str) -> Path:
    """`model` and `tokenizer` in Hugging Face format, written like a checkpoint (manifest, atomic); a failure is one CheckpointError line."""
    try:
        write_folder(folder, lambda tmp: save_pretrained(model, tokenizer, tmp))
    except Exception as err:
        raise CheckpointError(f"could not write {what} {folder}: {_reason(err)}; nothing was left behind") from err
    return folder


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f" ({err.filename})" if err.filename else "")
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Rename `tmp` to `folder`; an existing `folder` (the same step saved again) is swapped out first."""
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """`manifest.json`: size and sha256 of every file in `folder` (written after them)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def verify_checkpoint(folder: Path, only: tuple[str, ...] | None = None) -> None:
    """Raise CheckpointError unless every file (or those in `only`) matches the manifest."""
    manifest = folder / MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST} (an incomplete write, or not a policyflow checkpoint)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {folder}: {MANIFEST} is unreadable ({err})") from None
    for name in only or entries:
        path, entry = folder / name, entries.get(name)
        if entry is None or not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its sha256 in the manifest")


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` looks like a policyflow checkpoint (so loading it must verify it)."""
    return (folder / MANIFEST).is_file() or (folder / STATE_FILE).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run (`step-N`, written completely), oldest first."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def latest_good_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes verification, and one note per newer one moved aside as `step-N.corrupt`."""
    notes: list[str] = []
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(folder)
            return folder, notes
        except CheckpointError as err:
            aside = folder.with_name(folder.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
            notes.append(f"{err}; moved it to {aside.name}, trying the one before")
    return None, notes


def load_state(folder: Path) -> dict[str, Any]:
    """The non-weight part of a checkpoint: loop state, optimizer state, RNG state (verified against the manifest)."""
    verify_checkpoint(folder, only=(STATE_FILE,))
    blob = torch.load(folder / STATE_FILE, weights_only=False)
    blob["loop"] = LoopState(**blob["loop"])
    return blob
