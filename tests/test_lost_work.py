"""Issue 17, classes 1, 2, 4 and 7: nothing a user made is overwritten, runs can be moved, the
engines run the policy the trainer trains, and stopping or scripting a run does what it says."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from policyflow import coordinator
from policyflow.checkpoint import CheckpointError, load_state, verify_checkpoint
from policyflow.cli import main
from policyflow.lora import attach_lora
from policyflow.model import ModelLoadError, build_tiny, load_pretrained
from policyflow.workers import PolicyMismatch, TrainerWorker
from policyflow.policy import PolicySpec
from tests.test_run_safety import _ctrl_c_cli, _steps

QUIET = {"log": lambda *_: None}
LORA = ("model.lora.rank=4",)
ROOT = Path(__file__).resolve().parents[1]


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def lora_run(small_config):
    """A finished LoRA run with an SFT warm-start (so its base is the run's own base/), two checkpoints."""
    cfg = small_config(*LORA, "run.name=lora", "eval.every=0", "checkpoint.every=1", "train.steps=2")
    summary = coordinator.train(cfg, **QUIET)
    return cfg, Path(summary["final_checkpoint"])


# ---- 1. nothing a user made is overwritten -------------------------------------------------


def test_export_refuses_non_empty_folders_checkpoints_and_itself(lora_run, tmp_path: Path, capsys) -> None:
    cfg, checkpoint = lora_run
    before = _snapshot(checkpoint)
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    refused = {
        str(users): "the folder is not empty",
        str(checkpoint): "is a checkpoint",
        str(checkpoint / "merged"): "is a checkpoint",
        str(cfg.run_dir / "base"): "is a checkpoint (or a run's base or reference)",
    }
    for out, why in refused.items():
        assert main(["export", "--merge", str(checkpoint), out]) == 1
        assert why in _one_line(capsys)
    # --overwrite never deletes a folder of other files, and never writes into a checkpoint.
    assert main(["export", "--merge", "--overwrite", str(checkpoint), str(users)]) == 1
    assert "not a model folder" in _one_line(capsys)
    assert main(["export", "--merge", "--overwrite", str(checkpoint), str(checkpoint)]) == 1
    assert "is a checkpoint" in _one_line(capsys)
    assert (users / "notes.txt").read_text() == "keep me" and list(users.iterdir()) == [users / "notes.txt"]
    assert _snapshot(checkpoint) == before
    verify_checkpoint(checkpoint)
    # A new folder is written whole (with a manifest, nothing left beside it); --overwrite replaces a model folder.
    out = tmp_path / "merged"
    assert main(["export", "--merge", str(checkpoint), str(out)]) == 0
    verify_checkpoint(out)
    assert main(["export", "--merge", str(checkpoint), str(out)]) == 1
    assert "--overwrite" in _one_line(capsys)
    assert main(["export", "--merge", "--overwrite", str(checkpoint), str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]
    load_pretrained(out)


def test_sft_twice_into_one_run_folder_is_refused_unless_overwrite(small_config, capsys) -> None:
    cfg = small_config("run.name=s")
    first = coordinator.run_sft(cfg, log=lambda *_: None)
    kept = _snapshot(first)
    with pytest.raises(CheckpointError, match="run.overwrite=true"):
        coordinator.run_sft(small_config("run.name=s", "run.seed=1"), log=lambda *_: None)
    assert _snapshot(first) == kept
    again = coordinator.run_sft(small_config("run.name=s", "run.seed=1", "run.overwrite=true"), log=lambda *_: None)
    assert again == first and _snapshot(first) != kept
    assert not (cfg.run_dir / "run.lock").exists()


# ---- 2. runs can be moved; a resume never destroys what it cannot read ------------------------


def test_a_copied_lora_run_resumes_on_its_own_base(lora_run, small_config, tmp_path: Path) -> None:
    cfg, checkpoint = lora_run
    assert json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"] == "../../base"
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(cfg.run_dir, moved)
    shutil.rmtree(cfg.run_dir)  # the original is gone: nothing may still point at it
    assert main(["train", "--resume", str(moved), "train.steps=3"]) == 0
    assert [line["step"] for line in _lines(moved) if "step" in line][-1] == 3
    assert (moved / "checkpoints" / "step-3").is_dir() and not cfg.run_dir.exists()
    saved = (moved / "config.yaml").read_text()
    assert str(moved.parent) in saved and str(cfg.run.output_dir) not in saved


def test_a_missing_base_is_named_and_no_checkpoint_is_moved_or_deleted(lora_run, capsys) -> None:
    cfg, checkpoint = lora_run
    shutil.move(cfg.run_dir / "base", cfg.run_dir.parent / "base-moved")
    before = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    assert main(["train", "--resume", str(cfg.run_dir), "train.steps=3"]) == 1
    line = _one_line(capsys)
    assert "names its base model '../../base'" in line and "base_model_name_or_path" in line
    assert "overwrite" not in line
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == before == ["step-1", "step-2"]
    # Pointing the checkpoint at the base's new place (as the message says) is an edit, not damage.
    config_file = checkpoint / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(cfg.run_dir.parent / "base-moved")
    config_file.write_text(json.dumps(config))
    verify_checkpoint(checkpoint)
    assert main(["export", "--merge", str(checkpoint), str(cfg.run_dir.parent / "merged")]) == 0
    # Any other change to the file is damage.
    config["r"] = 99
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="differs from the manifest in more than base_model_name_or_path"):
        verify_checkpoint(checkpoint)


def test_a_checkpoint_this_version_cannot_read_is_named_and_left_alone(small_config) -> None:
    cfg = small_config("run.name=v", "eval.every=0", "train.steps=1")
    checkpoint = Path(coordinator.train(cfg, **QUIET)["final_checkpoint"])
    blob = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    blob["loop"]["field_of_a_future_version"] = 1
    torch.save(blob, checkpoint / "trainer_state.pt")
    from policyflow.checkpoint import write_manifest

    write_manifest(checkpoint)  # intact, just unreadable here
    with pytest.raises(CheckpointError, match="intact but this version of policyflow cannot read"):
        load_state(checkpoint)
    with pytest.raises(CheckpointError):
        coordinator.train(small_config("run.name=v", "eval.every=0", "train.steps=2"), resume=cfg.run_dir, **QUIET)
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["step-1"]


# ---- 4. the engines run the policy the trainer trains -----------------------------------------


def test_lora_on_a_tied_output_head_is_refused_where_it_is_attached(small_config) -> None:
    model, _ = build_tiny(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = small_config("model.lora.rank=4", "model.lora.target_modules=[q_proj, lm_head]")
    with pytest.raises(ValueError, match=r"adapts lm_head, whose weight is tied to model.embed_tokens.weight"):
        attach_lora(model, cfg.model.lora, "base")
    assert not hasattr(model, "peft_config") and type(model.lm_head) is torch.nn.Linear  # nothing was wrapped
    # An untied head merges exactly, so it stays allowed.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    attach_lora(model, cfg.model.lora, "base")


@pytest.mark.parametrize("runtime,lora", [("inline", False), ("inline", True), ("process", True)])
def test_engines_are_probed_against_the_trainer(small_config, runtime: str, lora: bool) -> None:
    cfg = small_config(*(LORA if lora else ()), f"run.name=p{runtime}{lora}", "eval.every=0", f"pipeline.runtime={runtime}")
    coordinator.train(cfg, **QUIET)
    gaps = [line["async/probe_logprob_gap"] for line in _lines(cfg.run_dir) if "async/probe_logprob_gap" in line]
    assert len(gaps) == 1 and 0 <= gaps[0] < 1e-3  # once, after the first trained version reached an engine


@pytest.mark.parametrize("worker,version", [("WrongWeightsFromStart", 0), ("WrongWeightsAfterUpdate", 1)])
@pytest.mark.parametrize("lora", [False, True])
def test_an_engine_running_other_weights_stops_the_run(small_config, capsys, worker: str, version: int, lora: bool) -> None:
    import tests.workers_for_tests as fakes

    cfg = small_config(*(LORA if lora else ()), f"run.name=w{worker}{lora}", "eval.every=0", "train.steps=3")
    with pytest.raises(PolicyMismatch, match=rf"differ from the trainer's by up to .* at version {version} \(tolerance 0.001 in float32\)"):
        asyncio.run(coordinator.run_rl(cfg, worker_cls=getattr(fakes, worker), **QUIET))
    assert [line["step"] for line in _lines(cfg.run_dir) if "step" in line] == [0]  # stopped before any step was recorded
    assert not (cfg.run_dir / "checkpoints").exists()


def test_a_model_folder_without_its_tokenizer_config_is_refused(tmp_path: Path, small_config, capsys) -> None:
    model, tokenizer = build_tiny(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=1)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"model folder '.*/model' is incomplete: tokenizer_config.json is missing"):
        load_pretrained(folder)
    cfg = small_config()
    assert main(["eval", "--model", str(folder), f"task.path={cfg.task.path}", "task.name=jsonl", "model.tiny.hidden_size=32"]) == 1
    assert "tokenizer_config.json is missing" in _one_line(capsys)


# ---- 7. stopping, and defaults that do what they say ------------------------------------------


def test_sigterm_checkpoints_the_step_and_says_how_to_resume(tmp_path: Path, jsonl_file: Path) -> None:
    from tests.conftest import SMALL

    run = tmp_path / "runs" / "t"
    args = [*SMALL, f"run.output_dir={tmp_path / 'runs'}", "task.name=jsonl", f"task.path={jsonl_file}",
            "task.reward=tests.rewards_for_tests:dense", "run.name=t", "train.steps=500", "eval.every=0"]
    returncode, err = _ctrl_c_cli(args, lambda: (run / "metrics.jsonl").is_file() and max(_steps(run), default=0) >= 2, signal.SIGTERM)
    assert returncode == 143, err
    steps = _steps(run)
    last = steps[-1]
    assert steps == list(range(last + 1)) and last >= 1
    assert "SIGTERM: stopping after the current step" in err
    assert err.strip().splitlines()[-1] == f"policyflow: interrupted at step {last}; resume with `policyflow train --resume {run}`"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{last}"]
    assert not (run / "run.lock").exists()


def test_eval_prints_one_json_line_and_nothing_else(small_config, monkeypatch, capfd) -> None:
    cfg = small_config()
    real = coordinator.run_eval

    def noisy(*args, **kwargs):
        print("a library's chatter")
        os.write(1, b"C-level chatter\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(coordinator, "run_eval", noisy)
    overrides = [f"{key}" for key in ("task.name=jsonl", f"task.path={cfg.task.path}", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
                                      "model.tiny.intermediate_size=64", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "eval.num_prompts=2",
                                      f"run.output_dir={cfg.run.output_dir}")]
    assert main(["eval", *overrides]) == 0
    out, err = capfd.readouterr()
    assert out.count("\n") == 1 and set(json.loads(out)) >= {"accuracy_greedy", "accuracy_sampled"}
    assert "a library's chatter" in err and "C-level chatter" in err


def test_lora_trains_at_its_own_learning_rate(small_config) -> None:
    full = TrainerWorker(PolicySpec.of(small_config("train.lr=1e-4")), store=None)
    assert full.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    cfg = small_config(*LORA, "train.lr=1e-4", "sft.max_steps=0")
    lora = TrainerWorker(PolicySpec.of(cfg), store=None)
    lora.begin_rl()
    assert lora.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * cfg.model.lora.lr_multiplier)
    assert cfg.model.lora.lr_multiplier == 4.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_probe_covers_other_architectures(small_config, tmp_path: Path, arch: str) -> None:
    """GPT-2 runs on the engine's generic decoder, Llama (untied head, LoRA) on the fast one: both are probed."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from policyflow.model import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    ids = {"vocab_size": len(tokenizer), "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False, **ids))
    model.save_pretrained(tmp_path / arch)
    tokenizer.save_pretrained(tmp_path / arch)
    cfg = small_config(f"model.path={tmp_path / arch}", "sft.max_steps=0", "eval.every=0", f"run.name={arch}", *(LORA if arch == "llama" else ()))
    coordinator.train(cfg, **QUIET)
    gaps = [line["async/probe_logprob_gap"] for line in _lines(cfg.run_dir) if "async/probe_logprob_gap" in line]
    assert len(gaps) == 1 and gaps[0] < 1e-3


def test_no_command_writes_a_run_or_sft_model_inside_a_checkpoint(lora_run, small_config) -> None:
    from policyflow.config import ConfigError

    cfg, checkpoint = lora_run
    before = _snapshot(checkpoint)
    inside = (f"run.output_dir={checkpoint.parent}", f"run.name={checkpoint.name}")
    with pytest.raises(ConfigError, match="a checkpoint .* that a run must never write into"):
        coordinator.train(small_config(*inside, "run.overwrite=true"), **QUIET)
    with pytest.raises(CheckpointError, match="nothing is ever written inside one"):
        coordinator.run_sft(small_config(*inside, "run.overwrite=true"), log=lambda *_: None)
    assert _snapshot(checkpoint) == before


def test_writing_a_model_folder_never_removes_a_users_sibling_folders(tmp_path: Path) -> None:
    from policyflow.checkpoint import write_folder

    out = tmp_path / "out"
    for name in ("out.tmp", "out.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "precious").write_text("mine")
    (out).mkdir()
    (out / "config.json").write_text("{}")
    write_folder(out, lambda tmp: (tmp / "config.json").write_text('{"new": 1}'))
    assert json.loads((out / "config.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old", "out.tmp"]  # nothing else left, nothing removed
    assert (tmp_path / "out.old" / "precious").read_text() == (tmp_path / "out.tmp" / "precious").read_text() == "mine"


def test_export_never_overwrites_the_base_it_merges_into(small_config, tmp_path: Path, capsys) -> None:
    model, tokenizer = build_tiny(seed=5, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    base = tmp_path / "local"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = small_config(*LORA, f"model.path={base}", "sft.max_steps=0", "eval.every=0", "train.steps=1", "run.name=b")
    checkpoint = Path(coordinator.train(cfg, **QUIET)["final_checkpoint"])
    before = _snapshot(base)
    capsys.readouterr()
    assert main(["export", "--merge", "--overwrite", str(checkpoint), str(base)]) == 1
    assert "overlaps" in _one_line(capsys) and _snapshot(base) == before


def test_an_old_manifest_does_not_call_an_edited_base_pointer_damage(lora_run) -> None:
    """Checkpoints written before POINTER_FIELDS hold a plain sha256 of adapter_config.json."""
    _, checkpoint = lora_run
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    config_file = checkpoint / "adapter_config.json"
    manifest["files"]["adapter_config.json"] = {"bytes": config_file.stat().st_size, "sha256": __import__("hashlib").sha256(config_file.read_bytes()).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "/somewhere/else/base"
    config_file.write_text(json.dumps(config))
    verify_checkpoint(checkpoint)  # an edited pointer: not damage
    config_file.write_text("{not json")
    with pytest.raises(CheckpointError, match="is not readable JSON"):
        verify_checkpoint(checkpoint)
