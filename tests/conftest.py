"""Shared fixtures: a very small model config and a jsonl task with a dense reward, so pipeline
tests run in seconds and every group has reward variance (a random model scores 0 on arithmetic)."""

import json
import time
from pathlib import Path

import pytest

from policyflow.config import Config, load_config

SMALL = [
    "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.intermediate_size=64",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1",
    "run.progress=false", "run.threads=1",
    "sft.max_steps=2", "sft.batch_size=4", "sft.eval_every=2", "sft.eval_prompts=4",
    "train.steps=2", "train.prompts_per_step=3", "train.group_size=4",
    "eval.num_prompts=4", "eval.every=1", "task.num_eval=8", "sampling.max_new_tokens=6",
]


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    path = tmp_path / "sums.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(6) for b in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def small_config(tmp_path: Path, jsonl_file: Path):
    """`small_config(*overrides)` -> Config for a seconds-long run writing under tmp_path."""

    def make(*overrides: str) -> Config:
        dense = ["task.name=jsonl", f"task.path={jsonl_file}", "task.reward=tests.rewards_for_tests:dense"]
        return load_config(None, [*SMALL, f"run.output_dir={tmp_path / 'runs'}", *dense, *overrides])

    return make


def eventually(condition, guard_s: float = 30.0) -> bool:
    """Whether `condition()` holds within `guard_s` (polled; a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + guard_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
