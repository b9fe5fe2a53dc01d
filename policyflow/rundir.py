"""The run folder `<output_dir>/<name>/`: who may write it, and what a fresh run or a resume finds there.

- One run at a time: `run.lock` is held with `fcntl.flock` for the whole run and names the
  holder (pid, host). The kernel drops the lock when its process dies, so a lock left by a
  crashed run is simply taken over, with a note. (flock is per machine: two hosts sharing
  the folder over NFS are not guarded.)
- A fresh run never mixes with an old one: a folder that already holds a run is refused
  unless `run.overwrite=true`, which deletes that run's files first (`RUN_FILES`; anything
  else in the folder, such as `sft/` from `policyflow sft`, is left alone).
- Snapshot files (`snapshots/`, the process runtime's weight hand-over) are removed when the
  run ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from policyflow.checkpoint import latest_good_checkpoint
from policyflow.config import Config, ConfigError

LOCK_FILE = "run.lock"
# What a run writes (deleted by run.overwrite=true) ...
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "summary.json", "plot.png", "config.yaml", "checkpoints", "snapshots")
# ... and what makes a folder hold a run (a run that failed before its first metrics line left only config.yaml).
RUN_MARKERS = ("metrics.jsonl", "samples.jsonl", "summary.json", "checkpoints")


class RunLockedError(RuntimeError):
    """Another live run holds the run folder."""


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

    def close(self) -> None:
        """Remove the snapshot files and release the lock (called however the run ends)."""
        shutil.rmtree(self.path / "snapshots", ignore_errors=True)
        self.lock.release()


def check_output_dir(run_dir: Path) -> None:
    """A ConfigError when a part of the run folder's path is a file."""
    for part in [run_dir, *run_dir.parents]:
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"run.output_dir: {str(part)!r} is a file, so the run folder {str(run_dir)!r} cannot be made there; point run.output_dir at a folder")
            return


def existing_run_files(run_dir: Path, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    return [name for name in names if (run_dir / name).exists()]


def clear_run(run_dir: Path) -> list[str]:
    """Delete an old run's files (run.overwrite=true); returns what was deleted."""
    found = existing_run_files(run_dir)
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
    found = existing_run_files(folder.path, RUN_MARKERS)
    if found and not cfg.run.overwrite:
        raise ConfigError(
            f"run folder {str(folder.path)!r} already holds a run ({', '.join(found)}); continue it with "
            f"`policyflow train --resume {folder.path}`, choose another run.name, or set run.overwrite=true to delete it first"
        )
    deleted = clear_run(folder.path)
    if found:
        folder.notes.append(f"run.overwrite=true: deleted the previous run's {', '.join(deleted)} in {folder.path}")


def _prepare_resume(cfg: Config, folder: RunFolder) -> None:
    folder.checkpoint, notes = latest_good_checkpoint(folder.path)
    folder.notes += notes
    if folder.checkpoint is None:
        why = "none of them passed verification" if notes else "none was written"
        raise ConfigError(f"--resume {str(folder.path)!r}: no checkpoint under {folder.path / 'checkpoints'} to resume from ({why}); start the run again with run.overwrite=true")
