"""Checkpoints: the model in Hugging Face format plus optimizer, RNG and loop state.

`runs/<name>/checkpoints/step-N/` loads with `AutoModelForCausalLM.from_pretrained`; the file
`trainer_state.pt` beside the weights lets `--resume` continue exactly where the run stopped.

Safety: a checkpoint is written into a hidden temporary folder beside `step-N/`, its `manifest.json` (size and sha256 of
every file) last, and only then renamed to `step-N/`, so a folder named `step-N` is complete.
A write that fails removes the temporary folder and raises one `CheckpointError` line; the
previous checkpoints are untouched. Every load checks the files against the manifest; a resume
whose newest checkpoint fails the check moves it aside (`step-N.corrupt`) and uses the one
before, saying so. Only damage moves a checkpoint: one that is intact but cannot be used (its
LoRA base is missing, it was written by an incompatible version) is never renamed or deleted.

One field is a pointer, not content: `base_model_name_or_path` in a LoRA checkpoint's
`adapter_config.json` names the base folder, and a user who moves the base may edit it. The
manifest's digest of that file leaves the field out (`POINTER_FIELDS`), so such an edit is not
damage.

Folders written for the user (`policyflow export`, `policyflow sft`) go through
`check_destination` first: a non-empty destination is refused unless the user says
`--overwrite` (and even then only a model folder is replaced, never a folder of other files),
and nothing is ever written inside a checkpoint or the folder being read.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from policyflow.model import save_pretrained

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
# file name -> JSON fields left out of its manifest digest (pointers a user may edit when moving files)
POINTER_FIELDS = {"adapter_config.json": ("base_model_name_or_path",)}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or fails verification; the message is one line."""


@dataclass
class LoopState:
    """Where the RL loop stands; everything needed to continue besides weights and optimizer.

    Bounded: its size does not grow with the run. Problems are issued in index order, so
    `next_problem` is all a resume needs to never re-issue one; the groups in flight when it
    was saved (at most (η+1)·B) are dropped by a resume and listed for the record.
    """

    step: int = 0
    version: int = 0
    next_problem: int = 0
    wall_seconds: float = 0.0
    eval_before: dict[str, Any] = field(default_factory=dict)
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
    """Write `folder` atomically: `write(tmp)` into a fresh hidden folder beside it, the manifest last, then rename.

    On any failure the temporary folder is removed (no debris) and the error propagates; an
    existing `folder` stays as it was until the rename.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))  # a name of its own: no user folder is ever removed
    try:
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
    """Rename `tmp` to `folder`; an existing `folder` is moved aside under a name of its own first,
    put back if the rename fails, and deleted once the new one is in place."""
    if not folder.exists():
        tmp.rename(folder)
        return
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:12]}")
    folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        if not folder.exists():
            old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _json_digest(path: Path, leave_out: tuple[str, ...]) -> str:
    """sha256 of a JSON object file's content without the `leave_out` fields (canonical key order)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    kept = {k: v for k, v in data.items() if k not in leave_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _manifest_entry(path: Path) -> dict[str, Any]:
    leave_out = POINTER_FIELDS.get(path.name)
    if leave_out:  # the size changes with an edited pointer: only the rest of the content is checked
        return {"json_sha256": _json_digest(path, leave_out), "leaves_out": list(leave_out)}
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path) -> None:
    """`manifest.json`: size and sha256 of every file in `folder` (written after them)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): _manifest_entry(p) for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def _damage(path: Path, entry: dict[str, Any]) -> str | None:
    """Why `path` does not match its manifest entry, or None when it does."""
    if "json_sha256" in entry:
        try:
            same = _json_digest(path, tuple(entry["leaves_out"])) == entry["json_sha256"]
        except (ValueError, UnicodeDecodeError) as err:
            return f"is not readable JSON ({err})"
        return None if same else f"differs from the manifest in more than {', '.join(entry['leaves_out'])}"
    pointer_file = path.name in POINTER_FIELDS  # a manifest from before POINTER_FIELDS: its digest covers the pointer too
    if path.stat().st_size != entry["bytes"] and not pointer_file:
        return f"has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if _sha256(path) != entry["sha256"]:
        if not pointer_file:
            return "does not match its sha256 in the manifest"
        try:  # an edited pointer cannot be told from other edits here: readable JSON is accepted (loading checks the rest)
            _json_digest(path, POINTER_FIELDS[path.name])
        except (ValueError, UnicodeDecodeError) as err:
            return f"is not readable JSON ({err})"
    return None


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
        why = _damage(path, entry)
        if why:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} {why}")


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
            n = 1
            while aside.exists():  # an earlier step-N.corrupt is kept, never replaced
                n += 1
                aside = folder.with_name(f"{folder.name}.corrupt-{n}")
            folder.rename(aside)
            notes.append(f"{err}; moved it to {aside.name}, trying the one before")
    return None, notes


# Fields older versions wrote into LoopState and nothing reads: a checkpoint holding them resumes unchanged.
_DROPPED_LOOP_FIELDS = frozenset({"consumed_task_ids"})  # every trained task id, a list that grew with the run


def load_state(folder: Path) -> dict[str, Any]:
    """The non-weight part of a checkpoint: loop state, optimizer state, RNG state (verified against the manifest).

    An intact file this version cannot read is a `CheckpointError` that names the checkpoint;
    the checkpoint is left where it is.
    """
    verify_checkpoint(folder, only=(STATE_FILE,))
    try:
        blob = torch.load(folder / STATE_FILE, weights_only=False)
        blob["loop"] = LoopState(**{k: v for k, v in blob["loop"].items() if k not in _DROPPED_LOOP_FIELDS})
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {folder} is intact but this version of policyflow cannot read its {STATE_FILE} ({_reason(err)}); "
            "resume it with the policyflow and torch versions that wrote it (the checkpoint was left as it is)"
        ) from err
    return blob


def protected_folder(path: Path) -> Path | None:
    """The checkpoint (or a run's checkpoints/, base/, reference/) that `path` is or lies in, if any."""
    path = path.expanduser().resolve()
    return next((part for part in [path, *path.parents] if _part_of_a_run(part)), None)


def _part_of_a_run(folder: Path) -> bool:
    """A training checkpoint (`trainer_state.pt`), or a run's `checkpoints/` (and anything in it), `base/` or `reference/`."""
    if (folder / STATE_FILE).is_file():
        return True
    run_part = folder.name in ("checkpoints", "base", "reference") and (folder.parent / "config.yaml").is_file()
    return run_part or (folder.parent.name == "checkpoints" and (folder.parent.parent / "config.yaml").is_file())


def check_destination(out: Path, *, reads: Path | None = None, overwrite: bool = False, how: str = "--overwrite") -> None:
    """Refuse to write the folder `out` where that would destroy something (a `CheckpointError` line).

    - never inside (or as) a checkpoint, nor inside or around `reads`, the folder being read;
    - a non-empty `out` only with `overwrite` (`how` names the switch), and even then only a
      model folder (config.json, adapter_config.json or manifest.json in it), never a folder of
      other files, which `write_folder`'s final rename would delete.
    """
    out = out.expanduser()
    target = out.resolve()
    protected = protected_folder(target)
    if protected is not None:
        raise CheckpointError(f"will not write {out}: {protected} is a checkpoint (or a run's base or reference), and nothing is ever written inside one; choose a new folder")
    if reads is not None:
        source = reads.expanduser().resolve()
        if target == source or source in target.parents or target in source.parents:
            raise CheckpointError(f"will not write {out}: it overlaps {reads}, the folder being read; choose a new folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"will not write {out}: it is a file; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"will not write {out}: the folder is not empty; choose a new folder, or pass {how} to replace it")
        if not any((out / name).is_file() for name in ("config.json", "adapter_config.json", MANIFEST)):
            raise CheckpointError(f"will not write {out}: it holds files that are not a model folder, which {how} would delete; choose a new folder")
