"""Snapshot stores (memory and safetensors files) and the engine update policy."""

from __future__ import annotations

import os

import pytest
import torch

from policyflow import weights
from policyflow.weights import (
    FileSnapshotStore,
    SnapshotMissingError,
    SnapshotStore,
    latest_snapshot_version,
    load_snapshot,
    save_snapshot,
    should_update,
    snapshot_path,
    snapshot_versions,
)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def sd(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 2), value), "step": torch.tensor(int(value))}


# ---- in memory ---------------------------------------------------------------------------------


def test_store_keeps_the_last_k_and_names_dropped_versions():
    store = SnapshotStore(keep=2)
    for v in range(5):
        store.publish(v, sd(float(v)))
    assert store.versions == [3, 4] and len(store) == 2 and 3 in store and 2 not in store
    version, state = store.latest()
    assert version == 4 and torch.equal(state["w"], torch.full((2, 2), 4.0))


def test_store_copies_to_cpu_so_optimizer_steps_do_not_leak_in():
    model = tiny_model()
    store = SnapshotStore(keep=3)
    store.publish(0, model.state_dict())
    _, v0 = store.latest()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    store.publish(1, model.state_dict())
    _, v1 = store.latest()
    for name, t in before.items():
        assert torch.equal(v0[name], t)
        assert v0[name].device.type == "cpu" and not v0[name].requires_grad
        assert v0[name].untyped_storage().data_ptr() != model.state_dict()[name].untyped_storage().data_ptr()
    assert not torch.equal(v1["0.weight"], before["0.weight"])
    v1.pop("0.weight")  # mutating the returned dict does not touch the store
    assert "0.weight" in store.latest()[1]


def test_store_rejects_bad_use():
    store = SnapshotStore(keep=1)
    with pytest.raises(SnapshotMissingError, match="no snapshot"):
        store.latest()
    store.publish(3, sd(3.0))
    with pytest.raises(ValueError, match="must increase"):
        store.publish(3, sd(0.0))
    with pytest.raises(ValueError, match="keep"):
        SnapshotStore(keep=0)


@pytest.mark.parametrize(
    "engine, latest, max_lag, expected",
    [(0, 0, 0, False), (0, 1, 0, True), (4, 5, 0, True),  # eager
     (0, 1, 1, False), (0, 2, 1, True), (3, 5, 2, False), (2, 5, 2, True)],  # lazy (ECHO)
)
def test_should_update(engine, latest, max_lag, expected):
    assert should_update(engine, latest, max_lag) is expected


def test_should_update_rejects_nonsense():
    with pytest.raises(ValueError, match="max_lag"):
        should_update(0, 1, -1)
    with pytest.raises(ValueError, match="newer than"):
        should_update(2, 1, 0)


# ---- files -------------------------------------------------------------------------------------


def test_file_round_trip_keeps_dtypes_tied_and_strided_tensors(tmp_path):
    emb = torch.randn(5, 3)
    state = {
        "embed": emb,
        "lm_head": emb,  # tied weights share storage
        "t": torch.randn(3, 4).t(),  # not contiguous
        "bf16": torch.randn(4).to(torch.bfloat16),
        "count": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    path = save_snapshot(tmp_path, 7, state)
    assert path == snapshot_path(tmp_path, 7) and path.name == "v0000000007.safetensors"
    loaded = load_snapshot(tmp_path, 7)
    assert set(loaded) == set(state)
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    assert latest_snapshot_version(tmp_path) == 7


def test_files_keep_the_last_k_and_ignore_temporaries(tmp_path):
    assert latest_snapshot_version(tmp_path / "none") is None
    for v in range(5):
        save_snapshot(tmp_path, v, sd(float(v)), keep=3)
    (tmp_path / ".v0000000009.safetensors.123.abc.tmp").write_bytes(b"half a file")
    assert snapshot_versions(tmp_path) == [2, 3, 4]
    assert latest_snapshot_version(tmp_path) == 4
    with pytest.raises(SnapshotMissingError, match=r"version 1 is not available.*\[2, 3, 4\]"):
        load_snapshot(tmp_path, 1)
    assert torch.equal(load_snapshot(tmp_path, 3)["w"], torch.full((2, 2), 3.0))


def test_a_failed_write_leaves_no_file_and_the_latest_unchanged(tmp_path, monkeypatch):
    save_snapshot(tmp_path, 0, sd(0.0))

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(weights.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_snapshot(tmp_path, 1, sd(1.0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0000000000.safetensors"]  # temp removed
    assert latest_snapshot_version(tmp_path) == 0


def test_publishing_an_older_version_removes_newer_files_from_a_crashed_run(tmp_path):
    for v in range(4):
        save_snapshot(tmp_path, v, sd(float(v)), keep=None)
    save_snapshot(tmp_path, 2, sd(20.0), keep=None)  # resumed from the step-2 checkpoint
    assert snapshot_versions(tmp_path) == [0, 1, 2]
    assert torch.equal(load_snapshot(tmp_path, 2)["w"], torch.full((2, 2), 20.0))


def test_file_store_has_the_memory_store_api(tmp_path):
    store = FileSnapshotStore(tmp_path / "snaps", keep=2)
    with pytest.raises(SnapshotMissingError, match="no snapshot"):
        store.latest()
    model = tiny_model()
    for v in range(3):
        store.publish(v, model.state_dict())
        with torch.no_grad():
            model[0].weight.add_(1.0)
    assert store.versions == [1, 2] and store.latest_version == 2 and 2 in store and 0 not in store
    version, state = store.latest()
    assert version == 2 and torch.equal(state["0.weight"], model[0].weight.detach() - 1.0)
    model.load_state_dict(load_snapshot(tmp_path / "snaps", 1))
    with pytest.raises(SnapshotMissingError, match=r"version 0 is not available; the store holds versions \[1, 2\]"):
        load_snapshot(tmp_path / "snaps", 0)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "snaps"))
