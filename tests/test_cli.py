"""Every CLI command runs for two steps (cleanrl-style plumbing test), and errors stay one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from policyflow.cli import main
from tests.conftest import SMALL


def _args(tmp_path: Path, jsonl_file: Path, *extra: str) -> list[str]:
    return [*SMALL, f"run.output_dir={tmp_path}", "task.name=jsonl", f"task.path={jsonl_file}",
            "task.reward=tests.rewards_for_tests:dense", *extra]


def test_train_then_resume_then_eval(tmp_path: Path, jsonl_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *_args(tmp_path, jsonl_file, "run.name=cli")]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy before RL" in out and "held-out accuracy after RL" in out and "summary:" in out
    run = tmp_path / "cli"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2
    assert main(["train", "--resume", str(run), "train.steps=4"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    capsys.readouterr()
    assert main(["eval", "--model", summary["final_checkpoint"], *_args(tmp_path, jsonl_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == summary["eval_after"]  # the same weights, seed and prompts: the same evaluation


def test_sft_saves_a_loadable_model(tmp_path: Path, jsonl_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sft", *_args(tmp_path, jsonl_file, "run.name=sft", "task.name=arithmetic")]) == 0
    assert "SFT: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "sft" / "sft" / "config.json").is_file()


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("policyflow: ModelLoadError: model path") and "\n" not in err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "there is no config.yaml, so the run's settings are unknown" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": 5}\n')
    assert main(["eval", "task.name=jsonl", f"task.path={bad}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:2: prompt column" in err and "\n" not in err


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "policyflow", "config", "--fields"], capture_output=True, text=True, check=True)
    assert "loss.name ('grpo'): " in done.stdout
