"""Versioned model snapshots (DESIGN.md §4): the trainer publishes, engines pull.

`v` = optimizer steps done. The trainer publishes its weights as version v; an engine holding
version e decides with `should_update(e, v, max_lag)` whether to load them (eager for
max_lag 0, ECHO-style lazy updates otherwise). Two stores with one API:

* `SnapshotStore` — in memory, for one process (inline runtime): CPU copies, last K kept.
* `FileSnapshotStore` / `save_snapshot` / `load_snapshot` — safetensors files in a folder, for
  the process runtime. A file appears under its final name only when complete (written to a
  temporary name, then `os.replace`), so a reader never sees half a snapshot.

Engines that update lazily may lag; keep K > max_lag so the version they ask for still exists.

LoRA (`lora.LoRAWeights`): the in-memory store keeps the merged weights; the file store writes
the frozen base once (`base-<id>.safetensors`) and then only the adapter's factors per version,
and a reader merges them (`lora.merge_low_rank`), so engines always receive full plain weights.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from policyflow.lora import LoRAWeights, merge_low_rank

StateDict = Mapping[str, torch.Tensor]


class SnapshotMissingError(LookupError):
    """The asked-for version was never published or has been removed (only the last K are kept)."""


def should_update(engine_version: int, latest_version: int, max_lag: int = 0) -> bool:
    """Should an engine at `engine_version` load `latest_version`? True when the lag exceeds max_lag.

    max_lag = 0 is eager (load every new version); max_lag = k > 0 is ECHO's lazy update
    (2508.05387): sample with weights up to k versions old, pay for fewer weight loads.
    """
    if max_lag < 0:
        raise ValueError(f"max_lag must be ≥ 0, got {max_lag}")
    if engine_version > latest_version:
        raise ValueError(f"engine holds version {engine_version}, newer than the latest published {latest_version}")
    return latest_version - engine_version > max_lag


def cpu_copy(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Detached CPU copies: later optimizer steps on the originals cannot change them."""
    return {name: t.detach().to("cpu", copy=True) for name, t in state_dict.items()}


def _check_keep(keep: int | None) -> None:
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be ≥ 1 (or None for all), got {keep}")


def _missing(version: int, available: list[int], keep: int | None) -> SnapshotMissingError:
    kept = f"the store keeps the last {keep}" if keep else "the store"
    return SnapshotMissingError(
        f"snapshot version {version} is not available; {kept} holds versions {available}. "
        "Ask for latest(), or raise keep above the engines' max_lag."
    )


class SnapshotStore:
    """In-memory snapshots of the last `keep` versions, stored as CPU copies.

    Treat returned tensors as read-only: they are the store's own copies.
    """

    def __init__(self, keep: int = 2) -> None:
        _check_keep(keep)
        self.keep = keep
        self._snapshots: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def publish(self, version: int, state_dict: StateDict | LoRAWeights) -> None:
        """Store a CPU copy of `state_dict` (LoRA: merged) as `version` (> every earlier one); drop beyond keep."""
        if self._snapshots and version <= self.latest_version:
            raise ValueError(f"publish version {version} after {self.latest_version}: versions must increase")
        if isinstance(state_dict, LoRAWeights):
            state_dict = state_dict.merged()
        self._snapshots[version] = cpu_copy(state_dict)
        while len(self._snapshots) > self.keep:
            self._snapshots.popitem(last=False)

    @property
    def versions(self) -> list[int]:
        return list(self._snapshots)

    @property
    def latest_version(self) -> int | None:
        return next(reversed(self._snapshots)) if self._snapshots else None

    def latest(self) -> tuple[int, dict[str, torch.Tensor]]:
        if not self._snapshots:
            raise SnapshotMissingError("no snapshot published yet; the trainer publishes version 0 first")
        version = self.latest_version
        return version, dict(self._snapshots[version])

    def __contains__(self, version: object) -> bool:
        return version in self._snapshots

    def __len__(self) -> int:
        return len(self._snapshots)


# ---- files ---------------------------------------------------------------------------------

_NAME = re.compile(r"^v(\d+)\.safetensors$")


def snapshot_path(folder: str | os.PathLike, version: int) -> Path:
    return Path(folder) / f"v{version:010d}.safetensors"


def snapshot_versions(folder: str | os.PathLike) -> list[int]:
    """Complete snapshot versions in `folder`, ascending (temporary files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def latest_snapshot_version(folder: str | os.PathLike) -> int | None:
    versions = snapshot_versions(folder)
    return versions[-1] if versions else None


def _file_tensors(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no shared storage (tied embeddings), as safetensors needs."""
    out, seen = {}, set()
    for name, t in state_dict.items():
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone(memory_format=torch.contiguous_format)
        elif not t.is_contiguous():
            t = t.contiguous()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _write_atomic(final: Path, tensors: StateDict, metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, then rename it: readers see all of it or none."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        save_file(_file_tensors(tensors), str(tmp), metadata=metadata)
        os.replace(tmp, final)  # atomic (no fsync: snapshots need not survive a power cut)
    finally:
        tmp.unlink(missing_ok=True)


def save_snapshot(folder: str | os.PathLike, version: int, state_dict: StateDict, keep: int | None = 2,
                  metadata: dict[str, str] | None = None) -> Path:
    """Write `version` atomically to `folder/v<version>.safetensors`; keep the newest `keep` files.

    Publishing v makes v the newest: files of higher versions (left by a run that crashed
    after publishing them and resumed from an older checkpoint) are removed.
    """
    _check_keep(keep)
    folder = Path(folder)
    final = snapshot_path(folder, version)
    _write_atomic(final, state_dict, {"version": str(version), **(metadata or {})})
    versions = snapshot_versions(folder)
    older = [v for v in versions if v <= version]
    doomed = [v for v in versions if v > version] + (older[:-keep] if keep else [])
    for v in doomed:
        snapshot_path(folder, v).unlink(missing_ok=True)
    return final


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}


def save_lora_snapshot(folder: str | os.PathLike, version: int, weights: LoRAWeights, base_name: str, keep: int | None = 2) -> Path:
    """Write only the adapter factors of `version`; `base_name` (in `folder`) holds the frozen base."""
    tensors, scales = {}, {}
    for name, (A, B, scale) in weights.factors.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], scales[name] = A, B, scale
    metadata = {"lora_base": base_name, "lora_scales": json.dumps(scales), "dtype": str(weights.dtype).removeprefix("torch.")}
    return save_snapshot(folder, version, tensors, keep, metadata)


def load_snapshot(folder: str | os.PathLike, version: int) -> dict[str, torch.Tensor]:
    """Read `version` back as full CPU tensors (a LoRA snapshot: merged with its base); SnapshotMissingError if it is not (or no longer) there."""
    try:
        tensors, metadata = _read(snapshot_path(folder, version))
    except FileNotFoundError:
        raise _missing(version, snapshot_versions(folder), None) from None
    if "lora_base" not in metadata:
        return tensors
    base_file = Path(folder) / metadata["lora_base"]
    if not base_file.is_file():
        raise SnapshotMissingError(f"snapshot version {version} is a LoRA adapter on {base_file}, which is missing; restart the run")
    base, _ = _read(base_file)
    factors = {name: (tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], scale) for name, scale in json.loads(metadata["lora_scales"]).items()}
    return merge_low_rank(base, factors, getattr(torch, metadata["dtype"]))


class FileSnapshotStore:
    """`SnapshotStore`'s API over a folder of safetensors files, shared by processes.

    LoRA weights: the publishing store writes the frozen base once (a fresh `base-<id>` file
    per publishing process, older ones removed), then per version only the factors.
    """

    def __init__(self, folder: str | os.PathLike, keep: int = 2) -> None:
        _check_keep(keep)
        self.folder = Path(folder)
        self.keep = keep
        self._base_name: str | None = None  # the LoRA base this store (the trainer's copy) wrote

    def publish(self, version: int, state_dict: StateDict | LoRAWeights) -> Path:
        if not isinstance(state_dict, LoRAWeights):
            return save_snapshot(self.folder, version, state_dict, keep=self.keep)
        if self._base_name is None:
            name = f"base-{uuid.uuid4().hex}.safetensors"
            _write_atomic(self.folder / name, state_dict.base, {"kind": "lora base"})
            for old in self.folder.glob("base-*.safetensors"):
                if old.name != name:
                    old.unlink(missing_ok=True)
            self._base_name = name
        return save_lora_snapshot(self.folder, version, state_dict, self._base_name, keep=self.keep)

    @property
    def versions(self) -> list[int]:
        return snapshot_versions(self.folder)

    @property
    def latest_version(self) -> int | None:
        return latest_snapshot_version(self.folder)

    def latest(self) -> tuple[int, dict[str, torch.Tensor]]:
        # A newer publish may prune the version just listed (keep small); retry with the newer one.
        for _ in range(3):
            version = self.latest_version
            if version is None:
                raise SnapshotMissingError(f"no snapshot in {self.folder}; the trainer publishes version 0 first")
            try:
                return version, load_snapshot(self.folder, version)
            except SnapshotMissingError:
                continue
        raise SnapshotMissingError(f"snapshots in {self.folder} changed faster than they could be read")

    def __contains__(self, version: object) -> bool:
        return isinstance(version, int) and snapshot_path(self.folder, version).exists()
