"""Cache folders that are checked, not trusted (issue 17 §6).

Rule: a cache folder holds its files and, written last, `manifest.json`: the size and sha256
of every file plus a `key` saying what the cache was built from. A folder is used only when its
manifest matches the expected key and every file, and loading it raises nothing. Anything else
(no manifest: a half-written cache or one from before manifests; another key; a file missing,
of another size or digest; a load that raises) is moved aside and rebuilt, with one warning
line on the `policyflow` logger; it is never used.

Builds are safe for processes building the same cache at once (rollout workers): each builds
into a private temporary folder, loads its result from there, and renames the folder into place.
The loser of the race keeps its own (verified by construction) result and removes its folder.
Nothing in this module deletes a folder it did not create or first move aside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)
T = TypeVar("T")


class CacheError(Exception):
    """A cache folder that fails verification; the message says why, in one line."""


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, key: dict[str, Any]) -> None:
    """Write `folder/manifest.json` (size and sha256 of every other file, and `key`) atomically, after the files."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps({"key": key, "files": entries}, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def verify_folder(folder: Path, key: dict[str, Any]) -> None:
    """Raise CacheError unless `folder`'s manifest has `key` and every file it lists matches it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        found_key, entries = manifest["key"], manifest["files"]
        expected = {name: (int(e["bytes"]), str(e["sha256"])) for name, e in entries.items()}
    except FileNotFoundError:
        raise CacheError(f"no {MANIFEST} (a partial write, or a cache from before manifests)") from None
    except Exception as err:  # any damage to the manifest itself: JSON, structure, encoding
        raise CacheError(f"{MANIFEST} is unreadable ({type(err).__name__})") from None
    if found_key != key:
        raise CacheError(f"{MANIFEST} is for another build ({found_key!r}, expected {key!r})")
    if not expected:
        raise CacheError(f"{MANIFEST} lists no files")
    for name, (size, sha256) in expected.items():
        path = folder / name
        if not path.is_file():
            raise CacheError(f"{name} is missing")
        if path.stat().st_size != size:
            raise CacheError(f"{name} has {path.stat().st_size} bytes, the manifest says {size}")
        if sha256_file(path) != sha256:
            raise CacheError(f"{name} does not match its sha256 in the manifest")


def load_or_build(folder: Path, key: dict[str, Any], build: Callable[[Path], None], load: Callable[[Path], T], what: str) -> tuple[T, bool]:
    """`load(folder)` if `folder` verifies against `key` and loads; else build it afresh.

    Returns the loaded value and whether this call built it. `build(tmp)` writes the cache
    files into an empty folder. A `folder` that exists but fails (verification, or `load`
    raising anything) is moved aside and deleted, and one warning names it and the reason.
    """
    if folder.exists():
        try:
            verify_folder(folder, key)
            return load(folder), False
        except Exception as err:  # deliberate: a damaged cache of any kind is rebuilt, never used
            reason = str(err).splitlines()[0] if str(err) else ""
            log.warning("%s %s is unusable (%s: %s); rebuilding it", what, folder, type(err).__name__, reason)
            _discard(folder)
    return _build(folder, key, build, load), True


def _build(folder: Path, key: dict[str, Any], build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """Build into a private temporary folder, load from it, then rename it into place (if nobody was first)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.building-"))
    try:
        build(tmp)
        write_manifest(tmp, key)
        value = load(tmp)  # loaded before the rename: a process that later discards `folder` cannot pull it away
        try:
            os.rename(tmp, folder)  # atomic; fails when another process put its build there first
        except OSError:
            pass  # the loser of a race: keep this build's value; the winner's folder stays for later loads
        return value
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    """Move a damaged cache aside under a unique name, then delete it (another process may have done so first)."""
    aside = path.with_name(f".{path.name}.damaged-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
