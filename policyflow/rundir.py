"""The run folder `<output_dir>/<name>/`: who may write it, and what a fresh run or a resume finds there.

- One run at a time: `run.lock` is held with `fcntl.flock` for the whole run and names the
  holder (pid, host). The kernel drops the lock when its process dies, so a lock left by a
  crashed run is simply taken over, with a note. (flock is per machine: two hosts sharing
  the folder over NFS are not guarded.)
- A fresh run never mixes with an old one: a folder that already holds a run is refused
  unless `run.overwrite=true`, which deletes that run's files first (`RUN_FILES`; anything
  else in the folder, such as `sft/` from `policyflow sft`, is left alone).
- A resume continues the run recorded in the folder: `config.yaml` must be there, and only
  settings in `RESUMABLE` may change (how long to train, logging, evaluation, checkpoints,
  where it runs, where the same model now lies). The folder may have been copied or moved:
  `run.output_dir` and `run.name` are taken from where it is now (`resume_location`), and
  nothing inside it names it by an absolute path. Anything else (task, model, sampling, loss, batch shape, pipeline) would make
  the checkpoint continue a different experiment, and is refused; in a run with roles the same
  rules apply to each role's settings (`roles.<role>.train.steps`), and the roles themselves
  may not change. Allowed changes are recorded
  as a `{"resumed_at_step": ...}` line in metrics.jsonl. Lines written after the checkpoint's
  step (by a run that stopped before its next checkpoint) are dropped from metrics.jsonl and
  samples.jsonl, so no step is ever logged twice.
- Snapshot files (`snapshots/`, the process runtime's weight hand-over) are removed when the
  run ends, however it ends.
- Ctrl-C or SIGTERM (what a cluster scheduler sends before preemption; `StopOnCtrlC`) stops
  the RL loop at a step boundary; the coordinator then records the last completed step,
  checkpoints it and raises `RunInterrupted` (the CLI exits 128 + the signal: 130 or 143).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policyflow.checkpoint import latest_checkpoint, latest_good_checkpoint, protected_folder
from policyflow.config import POLICY_SECTIONS, RUN_SECTIONS, Config, ConfigError, read_yaml, validate_config

LOCK_FILE = "run.lock"
# What a run writes (deleted by run.overwrite=true) ...
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "summary.json", "plot.png", "config.yaml", "checkpoints", "snapshots", "reference", "base", "tensorboard", "wandb", "view.html", "selfplay.jsonl", "problems.jsonl")
# ... and what makes a folder hold a run (a run that failed before its first metrics line left only config.yaml).
RUN_MARKERS = ("metrics.jsonl", "samples.jsonl", "summary.json", "checkpoints", "selfplay.jsonl")
# Settings a resume may change (a trailing ".*" covers a whole section); every other change is refused.
RESUMABLE = (
    "train.steps", "train.time_budget_s", "run.log_every", "run.samples_every", "run.progress", "run.threads",
    "run.device", "run.overwrite", "run.trackers", "run.output_dir", "run.name", "model.path", "eval.*", "checkpoint.*",
)


class RunLockedError(RuntimeError):
    """Another live run holds the run folder."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; the message says where and how to resume. `signum` is the signal."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class RunLock:
    """An exclusive, non-blocking `flock` on `<run_dir>/run.lock`, released by `release()` or by the process dying."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when it takes over one left by a run that died."""
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunLockedError(f"run folder {self.path.parent} is in use by another run ({holder}; {self.path}); wait for it to end or choose another run.name") from None
            try:  # a releasing holder may have unlinked the file between our open and flock: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise RunLockedError(f"could not take {self.path}: it keeps being replaced")
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._fd = fd
        return f"took over {self.path} left by a run that is no longer running ({previous})" if previous else None

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


@dataclass
class RunFolder:
    """The locked run folder; `checkpoint` is the one a resume starts from (None for a fresh run)."""

    path: Path
    lock: RunLock
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)
    role_checkpoints: dict[str, Path] = field(default_factory=dict)  # a run with roles: each role's checkpoint to resume from
    resume_overrides: dict[str, list] = field(default_factory=dict)  # setting -> [saved, now]

    def close(self) -> None:
        """Remove the snapshot files and release the lock (called however the run ends)."""
        shutil.rmtree(self.path / "snapshots", ignore_errors=True)
        self.lock.release()


def check_output_dir(run_dir: Path) -> None:
    """A ConfigError when a part of the run folder's path is a file, or the folder lies in a checkpoint."""
    protected = protected_folder(run_dir)
    if protected is not None:
        raise ConfigError(f"run folder {str(run_dir)!r} lies in {protected}, a checkpoint (or a run's base or reference) that a run must never write into; point run.output_dir elsewhere")
    for part in [run_dir, *run_dir.parents]:
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"run.output_dir: {str(part)!r} is a file, so the run folder {str(run_dir)!r} cannot be made there; point run.output_dir at a folder")
            return


def existing_run_files(run_dir: Path, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    return [name for name in names if (run_dir / name).exists()]


def clear_run(run_dir: Path, roles: tuple[str, ...] = ()) -> list[str]:
    """Delete an old run's files, and the folders of `roles` (run.overwrite=true); returns what was deleted."""
    found = existing_run_files(run_dir, RUN_FILES + roles)
    for name in found:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return found


def open_run_folder(cfg: Config, resume: Path | None = None) -> RunFolder:
    """Lock the run folder and check it: a fresh run needs an empty one (or run.overwrite), a resume a good checkpoint."""
    run_dir = Path(resume) if resume else cfg.run_dir
    check_output_dir(run_dir)
    if resume and not run_dir.is_dir():
        raise ConfigError(f"--resume {str(run_dir)!r}: no such run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(run_dir, RunLock(run_dir))
    note = folder.lock.acquire()
    folder.notes += [note] if note else []
    try:
        if resume:
            _prepare_resume(cfg, folder)
        else:
            _prepare_fresh(cfg, folder)
    except BaseException:
        folder.lock.release()
        raise
    return folder


def _prepare_fresh(cfg: Config, folder: RunFolder) -> None:
    roles = tuple(cfg.roles)
    found = existing_run_files(folder.path, RUN_MARKERS + roles)
    if found and not cfg.run.overwrite:
        raise ConfigError(
            f"run folder {str(folder.path)!r} already holds a run ({', '.join(found)}); continue it with "
            f"`policyflow train --resume {folder.path}`, choose another run.name, or set run.overwrite=true to delete it first"
        )
    deleted = clear_run(folder.path, roles)
    if found:
        folder.notes.append(f"run.overwrite=true: deleted the previous run's {', '.join(deleted)} in {folder.path}")


def _prepare_resume(cfg: Config, folder: RunFolder) -> None:
    saved = read_saved_config(folder.path)
    folder.resume_overrides = changed_settings(saved, cfg)
    refused = [key for key in folder.resume_overrides if not resumable(key)]
    if refused:
        key, (old, new) = refused[0], folder.resume_overrides[refused[0]]
        raise ConfigError(
            f"--resume cannot change {key} ({old!r} in the run's config.yaml, {new!r} now): the checkpoint was trained with "
            f"the saved value; a resume may change only {', '.join(RESUMABLE)} (a role's too: roles.<role>.train.steps); start a new run (another run.name) to change it"
        )
    if cfg.roles:
        _prepare_role_resume(cfg, folder)
        return
    folder.checkpoint, notes = latest_good_checkpoint(folder.path)
    folder.notes += notes
    if folder.checkpoint is None:
        why = "none of them passed verification (they were moved to step-N.corrupt)" if notes else "none was written"
        raise ConfigError(f"--resume {str(folder.path)!r}: no checkpoint under {folder.path / 'checkpoints'} to resume from ({why}); start a new run with another run.name")
    step = int(folder.checkpoint.name[5:])
    for name in ("metrics.jsonl", "samples.jsonl"):
        dropped = drop_lines_after(folder.path / name, step)
        if dropped:
            folder.notes.append(f"{name}: dropped {dropped} line(s) written after step {step} (they are run again)")


def _prepare_role_resume(cfg: Config, folder: RunFolder) -> None:
    """A run with roles resumes each role from its own newest good checkpoint (`<run>/<role>/checkpoints`);
    each role's metric and sample lines written after it are dropped (they are run again)."""
    for role in cfg.roles:
        found, notes = latest_good_checkpoint(folder.path / role)
        folder.notes += notes
        if found is None:
            raise ConfigError(f"--resume {str(folder.path)!r}: no checkpoint of role {role} under {folder.path / role / 'checkpoints'} (the run stopped before its warm-start ended); start a new run with another run.name")
        folder.role_checkpoints[role] = found
        step = int(found.name[5:])
        for name in ("metrics.jsonl", "samples.jsonl"):
            dropped = drop_lines_after(folder.path / role / name, step)
            if dropped:
                folder.notes.append(f"{role}/{name}: dropped {dropped} line(s) written after step {step} (they are run again)")


def resume_location(run_dir: Path) -> list[str]:
    """Overrides that place a resumed run where its folder is now (it may have been copied or moved)."""
    return [f"run.output_dir={json.dumps(str(run_dir.parent))}", f"run.name={json.dumps(run_dir.name)}"]


def saved_config_path(run_dir: Path) -> Path:
    """`<run_dir>/config.yaml`, the settings of the run a resume continues; a ConfigError when missing."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: there is no config.yaml, so the run's settings are unknown; give the run folder itself (<output_dir>/<name>, holding config.yaml and checkpoints/)")
    return path


def read_saved_config(run_dir: Path) -> Config:
    """The config a run was started with; resuming without it is refused (never the defaults)."""
    path = saved_config_path(run_dir)
    try:
        return validate_config(read_yaml(path))
    except ConfigError as err:
        raise ConfigError(f"--resume {str(run_dir)!r}: its config.yaml is not valid: {err}") from None


def changed_settings(before: Config, after: Config) -> dict[str, list]:
    """`{"section.key": [before, after]}` for every leaf setting that differs. A run with roles is
    compared role by role: `roles` (the role names), the run-level sections, and each role's whole
    sections as it trains with them, `roles.<role>.section.key` (a change to a shared top-level
    section is a change to every role that does not override it)."""
    a, b = _settings(before), _settings(after)
    changed = {key: [a.get(key), b.get(key)] for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}
    if "roles" in changed:  # other roles, or none: the rest differs by name only, so say this first
        changed = {"roles": changed.pop("roles"), **changed}
    return changed


def _settings(cfg: Config) -> dict:
    if not cfg.roles:
        return _flatten(cfg.model_dump(mode="json")) | {"roles": None}
    flat = _flatten(cfg.model_dump(mode="json", include=set(RUN_SECTIONS))) | {"roles": list(cfg.roles)}
    for role in cfg.roles:
        flat |= _flatten(cfg.role_config(role).model_dump(mode="json", include=set(POLICY_SECTIONS)), f"roles.{role}.")
    return flat


def resumable(key: str) -> bool:
    """Whether a resume may change `key`; a role's setting `roles.<role>.section.key` as the same top-level one."""
    if key.startswith("roles."):
        key = key.split(".", 2)[2] if key.count(".") >= 2 else key
    return any(key == allowed or (allowed.endswith(".*") and key.startswith(allowed[:-1])) for allowed in RESUMABLE)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _keep_line(line: str, step: int) -> bool:
    """A complete JSON line logged at or before `step` (lines without a step, e.g. SFT, are kept)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False  # half a line, cut by a crash
    if not isinstance(record, dict):
        return False
    at = record.get("step", record.get("resumed_at_step"))
    return not isinstance(at, int) or at <= step


def drop_lines_after(path: Path, step: int) -> int:
    """Remove the JSON lines of `path` logged after `step`, and broken ones (atomically); returns how many."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _keep_line(line, step)]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


class StopOnCtrlC:
    """Ctrl-C or SIGTERM during the RL loop stops it at the next step boundary; otherwise at once.

    Once `graceful` (set by the coordinator when the RL loop starts), the first signal sets
    `requested` (and `signum`) and says so: a wait for the next batch is abandoned, a step in
    progress finishes and is recorded and checkpointed. Before that (model loading, SFT
    warm-start, the first evaluation), or on a second signal, `RunInterrupted` is raised wherever
    the program is, even inside a long synchronous call; checkpoints already on disk are intact
    (written atomically). Installed only in the main thread.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.graceful = False
        self.requested = False
        self.signum = signal.SIGINT
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._loop = asyncio.get_running_loop()
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNAL_NAMES}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.requested or not self.graceful:
            raise RunInterrupted(self._at_once(), signum)
        self.requested, self.signum = True, signum
        self._loop.call_soon_threadsafe(self._event.set)
        print(f"policyflow: {SIGNAL_NAMES[signum]}: stopping after the current step and writing a checkpoint (signal again to stop at once)", file=sys.stderr, flush=True)

    def _at_once(self) -> str:
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return f"interrupted before any checkpoint of {self.run_dir} was written; start again with run.overwrite=true"
        return f"interrupted at once; resume from {latest.name} with `policyflow train --resume {self.run_dir}`"

    async def unless_requested(self, awaitable):
        """The awaitable's result, or None (the awaitable cancelled) if Ctrl-C comes first."""
        work, stopped = asyncio.ensure_future(awaitable), asyncio.ensure_future(self._event.wait())
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None
