"""A mistake gets one clear line and no run is ever lost: run folders, locks, devices, resume rules, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from policyflow import coordinator
from policyflow.cli import main
from policyflow.config import ConfigError
from policyflow.rundir import RunLock, RunLockedError, open_run_folder
from tests.conftest import SMALL, eventually

QUIET = {"log": lambda *_: None}


def _cli_args(tmp_path: Path, jsonl_file: Path, *extra: str) -> list[str]:
    return [*SMALL, f"run.output_dir={tmp_path / 'runs'}", "task.name=jsonl", f"task.path={jsonl_file}",
            "task.reward=tests.rewards_for_tests:dense", "sft.max_steps=0", *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("policyflow: ") and "\n" not in err, err
    return err


# ---- a fresh run in an existing folder ----------------------------------------------------


def test_fresh_run_in_an_existing_run_folder_is_refused_and_keeps_the_old_run(small_config, capsys) -> None:
    cfg = small_config("run.name=same", "train.steps=1", "sft.max_steps=0")
    coordinator.train(cfg, **QUIET)
    old_metrics = (cfg.run_dir / "metrics.jsonl").read_text()
    old_checkpoints = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl, summary.json, checkpoints\); continue it with `policyflow train --resume .*same`, choose another run.name, or set run.overwrite=true"):
        coordinator.train(small_config("run.name=same", "train.steps=2", "sft.max_steps=0"), **QUIET)
    assert (cfg.run_dir / "metrics.jsonl").read_text() == old_metrics
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == old_checkpoints
    assert not (cfg.run_dir / "run.lock").exists()  # the refusal released the lock


def test_overwrite_deletes_the_old_run_first(small_config) -> None:
    coordinator.train(small_config("run.name=same", "train.steps=3", "checkpoint.every=1", "sft.max_steps=0"), **QUIET)
    cfg = small_config("run.name=same", "train.steps=1", "run.overwrite=true", "sft.max_steps=0")
    notes: list[str] = []
    summary = coordinator.train(cfg, log=notes.append)
    assert any(n.startswith("run.overwrite=true: deleted the previous run's metrics.jsonl") for n in notes)
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["step-1"]  # no step-2/step-3 left from the old run
    assert summary["final_checkpoint"].endswith("step-1") and Path(summary["final_checkpoint"]).is_dir()
    assert [m["step"] for m in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "rollout/reward_mean" in m] == [1]


def test_a_failed_start_does_not_count_as_a_run(small_config) -> None:
    """A run that failed before its first metrics line left only config.yaml: the same command may run again."""
    cfg = small_config("run.name=again", "train.steps=1", "sft.max_steps=0")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "config.yaml").write_text("old: true\n")
    assert coordinator.train(cfg, **QUIET)["steps"] == 1


# ---- two runs in one folder --------------------------------------------------------------


def test_a_second_run_on_a_locked_folder_is_refused(small_config, tmp_path: Path) -> None:
    cfg = small_config("run.name=busy", "train.steps=1", "sft.max_steps=0")
    cfg.run_dir.mkdir(parents=True)
    holder = subprocess.Popen(  # another process holds the lock, as a running `policyflow train` would
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from policyflow.rundir import RunLock; "
         "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)", str(cfg.run_dir)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"run folder .*busy is in use by another run \(pid {holder.pid} on "):
            coordinator.train(cfg, **QUIET)
        assert not (cfg.run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is taken over, with a note naming it.
    notes: list[str] = []
    assert coordinator.train(cfg, log=notes.append)["steps"] == 1
    assert any(n.startswith("took over") and f"pid {holder.pid} on" in n for n in notes), notes
    assert not (cfg.run_dir / "run.lock").exists()


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert RunLock(tmp_path).acquire() is None


def test_closing_the_run_folder_removes_snapshots_and_the_lock(small_config) -> None:
    cfg = small_config("run.name=snap")
    folder = open_run_folder(cfg)
    (folder.path / "snapshots").mkdir()
    (folder.path / "snapshots" / "v0000000001.safetensors").write_bytes(b"x")
    folder.close()
    assert sorted(p.name for p in folder.path.iterdir()) == []


# ---- start-up checks ---------------------------------------------------------------------


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path: Path, jsonl_file: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", *_cli_args(tmp_path, jsonl_file, f"run.output_dir={afile}")]) == 2
    assert _one_line_error(capsys) == f"policyflow: config error: run.output_dir: {str(afile)!r} is a file, so the run folder {str(afile / 'demo')!r} cannot be made there; point run.output_dir at a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_config_error(tmp_path: Path, jsonl_file: Path, capsys) -> None:
    for command in ("train", "eval", "sft"):
        assert main([command, *_cli_args(tmp_path, jsonl_file, "run.device=cuda")]) == 2
        assert _one_line_error(capsys).startswith("policyflow: config error: run.device=cuda but torch sees no CUDA GPU")
    assert not (tmp_path / "runs").exists()


# ---- checkpoints -------------------------------------------------------------------------


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_are_verified_and_a_corrupt_latest_falls_back(small_config) -> None:
    cfg = small_config("run.name=ck", "train.steps=2", "checkpoint.every=1", "sft.max_steps=0", "eval.every=0")
    coordinator.train(cfg, **QUIET)
    step2 = cfg.run_dir / "checkpoints" / "step-2"
    assert set(json.loads((step2 / "manifest.json").read_text())["files"]) >= {"model.safetensors", "trainer_state.pt", "config.json"}
    _flip_a_byte(step2 / "model.safetensors")
    lines: list[str] = []
    summary = coordinator.train(small_config("run.name=ck", "train.steps=3", "checkpoint.every=1", "sft.max_steps=0", "eval.every=0"), resume=cfg.run_dir, log=lines.append)
    assert f"checkpoint {step2} is corrupt: model.safetensors does not match its sha256 in the manifest; moved it to step-2.corrupt, trying the one before" in lines
    assert any(line.startswith(f"resumed from {step2.with_name('step-1')} at step 1") for line in lines), lines
    assert summary["steps"] == 3 and (cfg.run_dir / "checkpoints" / "step-2.corrupt").is_dir()


def test_eval_of_a_corrupt_checkpoint_is_one_line(small_config, tmp_path: Path, jsonl_file: Path, capsys) -> None:
    cfg = small_config("run.name=ev", "train.steps=1", "sft.max_steps=0")
    final = Path(coordinator.train(cfg, **QUIET)["final_checkpoint"])
    (final / "model.safetensors").write_bytes((final / "model.safetensors").read_bytes()[:100])
    assert main(["eval", "--model", str(final), *_cli_args(tmp_path, jsonl_file)]) != 0
    err = _one_line_error(capsys)
    assert f"checkpoint {final} is corrupt: model.safetensors has 100 bytes, the manifest says" in err


def test_a_failed_checkpoint_write_leaves_nothing_and_keeps_the_previous(small_config, monkeypatch) -> None:
    from policyflow import checkpoint

    cfg = small_config("run.name=full", "train.steps=2", "checkpoint.every=1", "sft.max_steps=0", "eval.every=0")
    real_save = checkpoint.save_pretrained
    calls = []

    def disk_full_on_second(model, tokenizer, folder):
        calls.append(folder)
        if len(calls) == 2:
            real_save(model, tokenizer, folder)  # half the files written, then the disk is full
            raise OSError(28, "No space left on device", str(Path(folder) / "trainer_state.pt"))
        return real_save(model, tokenizer, folder)

    monkeypatch.setattr(checkpoint, "save_pretrained", disk_full_on_second)
    with pytest.raises(checkpoint.CheckpointError) as err:
        coordinator.train(cfg, **QUIET)
    step1 = cfg.run_dir / "checkpoints" / "step-1"
    assert str(err.value) == (f"could not write checkpoint {step1.with_name('step-2')}: No space left on device "
                              f"({Path(calls[1]) / 'trainer_state.pt'}); nothing was left behind, and the previous checkpoint {step1} is intact")
    assert Path(calls[1]).parent == step1.parent and Path(calls[1]).name.startswith(".step-2.tmp-")
    assert sorted(p.name for p in step1.parent.iterdir()) == ["step-1"]
    checkpoint.verify_checkpoint(step1)
    assert not (cfg.run_dir / "run.lock").exists() and not (cfg.run_dir / "snapshots").exists()


# ---- every other failure -----------------------------------------------------------------


@pytest.mark.parametrize("error, line", [
    (FloatingPointError("non-finite loss at step 3"), "policyflow: FloatingPointError: non-finite loss at step 3 (run with --debug for the traceback)"),
    (OSError(5, "Input/output error"), "policyflow: OSError: [Errno 5] Input/output error (run with --debug for the traceback)"),
    ("WorkerDied", "policyflow: WorkerDied: component 'rollout-0' died (run with --debug for the traceback)"),
    (RuntimeError("first line\n  Traceback (most recent call last):\n    more"), "policyflow: RuntimeError: first line (run with --debug for the traceback)"),
])
def test_other_failures_are_one_line_with_status_1(monkeypatch, capsys, error, line) -> None:
    from policyflow.runtime import WorkerDied

    error = WorkerDied("component 'rollout-0' died") if error == "WorkerDied" else error

    def fail(*_, **__):
        raise error

    monkeypatch.setattr(coordinator, "train", fail)
    assert main(["train", "train.steps=1"]) == 1
    assert _one_line_error(capsys) == line
    with pytest.raises(type(error)):
        main(["train", "--debug", "train.steps=1"])


# ---- resume rules ------------------------------------------------------------------------


def _steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m]


def test_resume_refuses_a_folder_without_config_yaml(small_config, tmp_path: Path, capsys) -> None:
    cfg = small_config("run.name=nocfg", "train.steps=1", "sft.max_steps=0")
    coordinator.train(cfg, **QUIET)
    (cfg.run_dir / "config.yaml").unlink()
    assert main(["train", "--resume", str(cfg.run_dir), "train.steps=2"]) == 2
    assert _one_line_error(capsys) == (f"policyflow: config error: --resume {str(cfg.run_dir)!r}: there is no config.yaml, so the run's settings "
                                       "are unknown; give the run folder itself (<output_dir>/<name>, holding config.yaml and checkpoints/)")
    assert _steps(cfg.run_dir) == [0, 1]  # nothing ran with the defaults


@pytest.mark.parametrize("override, key", [
    ("task.seed=7", "task.seed"), ("model.tiny.hidden_size=64", "model.tiny.hidden_size"), ("train.group_size=2", "train.group_size"),
    ("sampling.max_new_tokens=4", "sampling.max_new_tokens"), ("loss.name=dapo", "loss.name"), ("train.lr=0.01", "train.lr"),
])
def test_resume_refuses_overrides_that_change_the_experiment(small_config, tmp_path: Path, jsonl_file: Path, capsys, override: str, key: str) -> None:
    assert main(["train", *_cli_args(tmp_path, jsonl_file, "run.name=r", "train.steps=1")]) == 0
    run = tmp_path / "runs" / "r"
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.steps=2", override]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"policyflow: config error: --resume cannot change {key} (") and "a resume may change only train.steps, train.time_budget_s" in err
    assert _steps(run) == [0, 1]


def test_harmless_resume_overrides_are_allowed_and_recorded(tmp_path: Path, jsonl_file: Path, capsys) -> None:
    assert main(["train", *_cli_args(tmp_path, jsonl_file, "run.name=r", "train.steps=1")]) == 0
    run = tmp_path / "runs" / "r"
    assert main(["train", "--resume", str(run), "train.steps=3", "run.log_every=2", "eval.every=0", "checkpoint.keep_last=3"]) == 0
    overrides = {"checkpoint.keep_last": [2, 3], "eval.every": [1, 0], "run.log_every": [1, 2], "train.steps": [1, 3]}
    events = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "resumed_at_step" in m]
    assert events == [{"resumed_at_step": 1, "checkpoint": str(run / "checkpoints" / "step-1"), "overrides": overrides}]
    assert json.loads((run / "summary.json").read_text())["resume_overrides"] == overrides
    assert _steps(run) == [0, 1, 2, 3]  # log_every=2 skips step... 3 is the last (with the final evaluation)


# ---- metrics across a resume ---------------------------------------------------------------


def test_metrics_never_repeat_a_step_and_counters_continue(small_config) -> None:
    cfg = small_config("run.name=m", "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=5", "sft.max_steps=0", "eval.every=0")
    coordinator.train(cfg, **QUIET)
    first = {m["step"]: m for m in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m}
    assert sorted(first) == [0, 1, 2, 3] and len(_steps(cfg.run_dir)) == 4  # the final evaluation shares step 3's line
    assert first[3]["eval/num_prompts"] == 4 and "loss/total" in first[3]
    # A run that died after logging step 3 but before checkpointing it:
    import shutil
    shutil.rmtree(cfg.run_dir / "checkpoints" / "step-3")
    lines: list[str] = []
    coordinator.train(cfg, resume=cfg.run_dir, log=lines.append)
    assert "metrics.jsonl: dropped 1 line(s) written after step 2 (they are run again)" in lines
    again = {m["step"]: m for m in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "step" in m}
    assert _steps(cfg.run_dir) == [0, 1, 2, 3]
    for key in ("rollout/generated_tokens", "async/trained_groups", "async/issued_groups", "async/accepted_groups"):
        assert again[3][key] == first[3][key], key  # continued from the checkpoint's totals, not from 0
    # The swap after step 2 happened after its checkpoint; the resumed engines start at version 2 without one.
    assert again[3]["async/weight_updates"] == first[2]["async/weight_updates"] == 1
    assert again[3]["async/trained_groups"] == 3 * cfg.train.prompts_per_step
    assert again[3]["rollout/generated_tokens"] > again[2]["rollout/generated_tokens"] > 0


# ---- Ctrl-C --------------------------------------------------------------------------------


def _ctrl_c_cli(args: list[str], ready, signum: int = signal.SIGINT) -> tuple[int, str]:
    """Run `policyflow train *args` in a subprocess, send `signum` once `ready()` (polled, 120 s at
    most), and return its exit status and stderr."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "policyflow", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert eventually(lambda: ready() or proc.poll() is not None, guard_s=120) and proc.poll() is None, proc.communicate()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, err


def test_ctrl_c_records_the_last_step_and_resumes(tmp_path: Path, jsonl_file: Path, runtime: str = "inline") -> None:
    """(With runtime="process" this passes too, in about a minute; the snapshot clean-up is checked below.)"""
    run = tmp_path / "runs" / "c"
    args = _cli_args(tmp_path, jsonl_file, "run.name=c", "train.steps=500", "eval.every=0", f"pipeline.runtime={runtime}")
    returncode, err = _ctrl_c_cli(args, lambda: (run / "metrics.jsonl").is_file() and max(_steps(run), default=0) >= 2)
    assert returncode == 130, err
    steps = _steps(run)
    last = steps[-1]
    assert steps == list(range(last + 1))  # every completed step logged once, the interrupted one fully or not at all
    assert err.strip().splitlines()[-1] == f"policyflow: interrupted at step {last}; resume with `policyflow train --resume {run}`"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{last}"]
    assert not (run / "snapshots").exists() and not (run / "run.lock").exists()
    assert main(["train", "--resume", str(run), f"train.steps={last + 1}"]) == 0
    assert _steps(run) == list(range(last + 2))


def test_a_plain_keyboard_interrupt_is_one_line_with_status_130(monkeypatch, capsys) -> None:
    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator, "train", interrupted)
    assert main(["train", "train.steps=1"]) == 130
    assert _one_line_error(capsys) == "policyflow: interrupted at once; checkpoints already written are intact"


def test_ctrl_c_during_the_sft_warm_start_stops_at_once(tmp_path: Path, jsonl_file: Path) -> None:
    run = tmp_path / "runs" / "s"
    args = [*_cli_args(tmp_path, jsonl_file, "run.name=s"), "sft.max_steps=100000", "sft.eval_every=100000"]
    returncode, err = _ctrl_c_cli(args, lambda: (run / "metrics.jsonl").is_file())  # SFT's first line (its step-0 evaluation)
    assert returncode == 130
    assert err.strip().splitlines()[-1] == f"policyflow: interrupted before any checkpoint of {run} was written; start again with run.overwrite=true"
    assert not (run / "run.lock").exists()
