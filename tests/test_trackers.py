"""Issue 19 §4: one metrics writer for every tracker (jsonl, TensorBoard, wandb), and samples.jsonl
holding whole episodes as training saw them (token ids, loss masks, log-probs, versions, advantages)."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from policyflow import coordinator
from policyflow.advantages import has_signal
from policyflow.cli import main
from policyflow.config import ConfigError, load_config
from policyflow.rollout import build_batch, episode_record, rollout_groups, segment_loss_masks
from policyflow.tokens import collate
from policyflow.trackers import WANDB_MISSING, open_trackers
from policyflow.types import Call, Segment, TokenPolicy, Trajectory
from policyflow.weights import SnapshotStore
from policyflow.workers import TrainerWorker
from policyflow.policy import PolicySpec


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard event files in `folder` (read back with TensorBoard's
    own reader), each step once: a step written twice (a resume without a purge) fails here."""
    events = EventAccumulator(str(folder))
    events.Reload()
    found = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag, points in found.items():
        assert len({step for step, _ in points}) == len(points), (tag, points)
    return {tag: dict(points) for tag, points in found.items()}


def _numbers(line: dict, step_key: str) -> dict[str, float]:
    return {k: v for k, v in line.items() if k != step_key and isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- TensorBoard ---------------------------------------------------------------------------------


def test_tensorboard_holds_every_metric_of_a_run_under_the_jsonl_names(small_config) -> None:
    """A short run with SFT: every number of every metrics.jsonl line is a TensorBoard scalar of the
    same name, RL lines at `step` (tensorboard/rl), SFT lines at `sft_step` (tensorboard/sft)."""
    cfg = small_config("run.trackers=[jsonl,tensorboard]", "sft.max_steps=10", "sft.eval_every=5", "sft.target_accuracy=1.0")
    coordinator.train(cfg, log=lambda *_: None)
    lines = _lines(cfg.run_dir / "metrics.jsonl")
    rl, sft = [m for m in lines if "step" in m], [m for m in lines if "sft_step" in m]
    assert [m["step"] for m in rl] == [0, 1, 2]
    assert [m["sft_step"] for m in sft if "sft/accuracy_greedy" in m] == [0, 5, 10] and [m["sft_step"] for m in sft if "sft/loss" in m] == [10]
    for folder, rows, key in ((cfg.run_dir / "tensorboard" / "rl", rl, "step"), (cfg.run_dir / "tensorboard" / "sft", sft, "sft_step")):
        written = _scalars(folder)
        expected: dict[str, dict[int, float]] = {}
        for m in rows:
            for name, value in _numbers(m, key).items():
                expected.setdefault(name, {})[m[key]] = value
        assert written.keys() == expected.keys()
        for name, by_step in expected.items():
            assert written[name].keys() == by_step.keys(), name
            for step, value in by_step.items():  # event files hold float32
                assert written[name][step] == pytest.approx(value, rel=1e-6, abs=1e-30, nan_ok=True), (name, step)
    assert "sft/loss" in _scalars(cfg.run_dir / "tensorboard" / "sft") and "loss/total" in _scalars(cfg.run_dir / "tensorboard" / "rl")


def test_a_resumed_tracker_purges_the_tensorboard_steps_after_its_checkpoint(tmp_path: Path) -> None:
    """A run stopped at step 4 with its checkpoint at step 2 resumes with first step 3: TensorBoard
    shows steps 0-2 of the first process and 3-4 of the second, once each; SFT scalars stay."""
    first = open_trackers(tmp_path, ("jsonl", "tensorboard"), first_step=0, run_name="r", config={})
    first.write_all([{"sft_step": 0, "sft/accuracy_greedy": 0.25}, {"sft_step": 10, "sft/loss": 2.0}])
    first.write_all([{"step": s, "wall_seconds": float(s), "rollout/reward_mean": 0.1 * s} for s in range(5)])
    first.close()
    resumed = open_trackers(tmp_path, ("jsonl", "tensorboard"), first_step=3, run_name="r", config={})
    resumed.write({"resumed_at_step": 2, "checkpoint": "checkpoints/step-2", "overrides": {}})  # jsonl only
    resumed.write_all([{"step": s, "wall_seconds": float(s), "rollout/reward_mean": 1.0 + s} for s in (3, 4)])
    resumed.close()
    rl = _scalars(tmp_path / "tensorboard" / "rl")
    assert rl["rollout/reward_mean"] == pytest.approx({0: 0.0, 1: 0.1, 2: 0.2, 3: 4.0, 4: 5.0})
    assert rl.keys() == {"rollout/reward_mean", "wall_seconds"}
    assert _scalars(tmp_path / "tensorboard" / "sft") == {"sft/accuracy_greedy": {0: 0.25}, "sft/loss": {10: 2.0}}


# -- configuration and wandb ----------------------------------------------------------------------


def test_an_unknown_tracker_is_a_config_error_naming_the_field_and_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"run\.trackers=\['jsonl', 'tensorbord'\] is not allowed: 'tensorbord' is not a tracker; allowed: jsonl, tensorboard, wandb"):
        load_config(None, ["run.trackers=[jsonl,tensorbord]"])
    assert load_config(None, []).run.trackers == ("jsonl",)


def test_wandb_not_installed_is_one_clear_line_before_anything_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, as without the extra
    assert main(["train", f"run.output_dir={tmp_path}", "run.trackers=[jsonl,wandb]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"policyflow: config error: {WANDB_MISSING}" and "pip install 'policyflow[wandb]'" in err
    assert not (tmp_path / "demo").exists()  # refused before the run folder is made


class _FakeWandbRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.calls.append(("define_metric", name, step_metric))

    def log(self, data: dict) -> None:
        self.calls.append(("log", data))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_wandb_gets_every_line_against_its_own_step_and_a_resume_continues_its_run(tmp_path: Path, monkeypatch) -> None:
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or _FakeWandbRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    writer = open_trackers(tmp_path, ("jsonl", "wandb"), first_step=0, run_name="r", config={"run": {"name": "r"}})
    writer.write_all([{"sft_step": 10, "sft/loss": 2.0}, {"step": 1, "wall_seconds": 3.0, "loss/total": 0.5, "flag": True}])
    writer.write({"resumed_at_step": 1, "checkpoint": "c", "overrides": {}})  # no step: jsonl only
    writer.close()
    (_, init), *rest = calls
    assert init["dir"] == str(tmp_path) and init["name"] == "r" and init["resume"] == "allow" and init["config"] == {"run": {"name": "r"}}
    assert "mode" not in init  # WANDB_MODE is read by wandb itself
    assert ("define_metric", "sft/*", "sft_step") in rest
    assert {c[1] for c in rest if c[0] == "define_metric" and c[2] == "step"} == {"wall_seconds", "loss/total"}
    assert [c[1] for c in rest if c[0] == "log"] == [{"sft_step": 10, "sft/loss": 2.0}, {"step": 1, "wall_seconds": 3.0, "loss/total": 0.5}]
    assert rest[-1] == ("finish",) and len(_lines(tmp_path / "metrics.jsonl")) == 3
    calls.clear()
    open_trackers(tmp_path, ("wandb",), first_step=2, run_name="r", config={}).close()
    assert calls[0][1]["id"] == init["id"]  # a resume continues the same wandb run


def test_wandb_offline_writes_its_files_in_the_run_folder(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = open_trackers(tmp_path, ("wandb",), first_step=0, run_name="r", config={})
    writer.write({"step": 1, "loss/total": 0.5})
    writer.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# -- samples.jsonl ---------------------------------------------------------------------------------


def test_samples_records_hold_the_episodes_as_the_batch_trained_them(small_config) -> None:
    """`TrainerWorker.step_records` after a step: per episode its segments' token ids, log-probs and
    versions, loss masks that concatenate to its row of the batch, and the batch's advantage
    (None for the episodes of a zero-variance group, which were not trained)."""
    cfg = small_config()
    trainer = TrainerWorker(PolicySpec.of(cfg), SnapshotStore(keep=3))
    s = trainer.session
    problems = [s.task.train_problem(i) for i in range(cfg.train.prompts_per_step)]
    groups, _ = rollout_groups(s.runner, s.task, problems, cfg.train.group_size, torch.Generator().manual_seed(0))
    for t in groups[1].trajectories:  # a group with nothing to learn: left out of the batch
        t.reward = 0.5
    batch, _ = build_batch(groups, cfg.train, cfg.advantage, s.tokenizer.pad_token_id)
    trainer.train_step(groups)
    records = trainer.step_records(7, max_groups=2)
    assert [r["episode_id"] for r in records] == [t.id for g in groups[:2] for t in g.trajectories]
    trained = [t.id for g in groups if has_signal(g.rewards) for t in g.trajectories]  # the batch's rows, in order
    by_id = {t.id: (t, g) for g in groups for t in g.trajectories}
    for r in json.loads(json.dumps(records)):  # as written to the file
        t, g = by_id[r["episode_id"]]
        assert (r["kind"], r["step"], r["version"], r["task_id"], r["prompt"], r["answer"]) == ("train", 7, 0, t.task_id, g.prompt, g.answer)  # the version the batch trained (its tokens' own: staleness 0)
        assert (r["reward"], r["reward_parts"], r["status"], r["finish_reason"]) == (t.reward, t.reward_parts, t.status, t.finish_reason)
        assert [seg["token_ids"] for seg in r["segments"]] == [list(seg.token_ids) for seg in t.segments]
        assert [seg["logprobs"] for seg in r["segments"]] == [list(seg.logprobs) if seg.logprobs else None for seg in t.segments]
        assert [seg["versions"] for seg in r["segments"]] == [list(seg.versions) if seg.versions else None for seg in t.segments]
        assert all(seg["token_texts"] == [s.tokenizer.decode([i]) for i in seg["token_ids"]] for seg in r["segments"])
        assert "".join(r["segments"][0]["token_texts"]) == s.tokenizer.decode(r["segments"][0]["token_ids"])
        ids = [i for seg in r["segments"] for i in seg["token_ids"]]
        mask = [m for seg in r["segments"] for m in seg["loss_mask"]]
        if t.id not in trained:
            assert r["advantage"] is None and g is groups[1]
            continue
        row = trained.index(t.id)
        n = int(batch.attention_mask_BT[row].sum())
        assert ids == batch.input_ids_BT[row, :n].tolist() and mask == batch.loss_mask_BT[row, :n].long().tolist()
        assert r["advantage"] == float(batch.advantages_B[row])  # exactly the float32 the loss used


def _segment(kind: str, ids: list[int], temperatures: list[float] | None = None, version: int = 3) -> Segment:
    if kind != "gen":
        return Segment(kind, tuple(ids), text=kind)
    policies = tuple(TokenPolicy(t, 1.0, 0) for t in temperatures) if temperatures else None
    return Segment("gen", tuple(ids), tuple(-0.5 for _ in ids), tuple(version for _ in ids), policies=policies, text="gen")


def test_segment_loss_masks_are_the_training_rows_masks_with_greedy_tokens_and_pruned_contexts() -> None:
    """A pruned second call (MEM1) starts a second row, in which the first gen segment is context:
    each segment's mask is where it is trained, and greedy (temperature 0) code tokens are 0."""
    segments = [
        _segment("prompt", [5, 6, 7]), _segment("gen", [8, 9, 10, 11], [1.0, 0.0, 0.0, 1.0]),
        _segment("obs", [12, 13]), _segment("gen", [14, 15, 1], [1.0, 1.0, 1.0], version=4),
    ]
    t = Trajectory("e/0", "e", segments, [Call((0,), 1), Call((0, 2), 3)])  # the second call drops segment 1
    masks = segment_loss_masks(t)
    assert masks == [[0, 0, 0], [1, 0, 0, 1], [0, 0], [1, 1, 1]]
    batch = collate([t], torch.tensor([0.5]), pad_id=0)
    rows = [(0, 1), (0, 2, 3)]
    for b, indices in enumerate(rows):
        n = int(batch.attention_mask_BT[b].sum())
        assert batch.loss_mask_BT[b, :n].long().tolist() == [m for i in indices for m in masks[i]]
    record = episode_record(t, kind="eval", version=5)
    assert record["kind"] == "eval" and record["advantage"] is None and record["version"] == 5
    assert [seg["loss_mask"] for seg in record["segments"]] == masks and record["segments"][3]["versions"] == [4, 4, 4]
    assert record["segments"][0]["token_texts"] is None  # no tokenizer given


def test_a_run_writes_whole_groups_to_samples_jsonl(small_config) -> None:
    """run.samples_every=2 of 2 steps: step 2 only, every episode of its first groups (at most 4)."""
    cfg = small_config("run.samples_every=2", "sft.max_steps=0", "eval.every=0")
    coordinator.train(cfg, log=lambda *_: None)
    records = _lines(cfg.run_dir / "samples.jsonl")
    B, G = cfg.train.prompts_per_step, cfg.train.group_size
    assert {r["step"] for r in records} == {2} and len(records) == min(B, coordinator.SAMPLE_GROUPS) * G
    assert {r["version"] for r in records} == {1} and len({r["episode_id"] for r in records}) == len(records)  # step 2 trains version 1
    for r in records:
        gen = [seg for seg in r["segments"] if seg["kind"] == "gen"]
        assert gen and all(len(seg["token_ids"]) == len(seg["token_texts"]) == len(seg["loss_mask"]) == len(seg["logprobs"]) == len(seg["versions"]) for seg in gen)
        assert all(v in (0, 1) for seg in gen for v in seg["versions"])  # sampled by version 0 or 1, trained at version 1: staleness 0 or 1
