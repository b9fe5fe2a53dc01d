"""TRL's reward functions run unchanged as `task.reward` (issue 19 §6): with `model.chat_template=true`
a jsonl task passes prompts and completions in TRL's conversational form, by keyword, with the
row's columns (`solution`) as keyword lists; a None reward (TRL's "cannot score") scores 0.0.
TRL and math_verify (which `accuracy_reward` needs) are in the test extra: `trl[math-verify]`."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from pathlib import Path

import pytest

from policyflow import coordinator
from policyflow.agent.episode import EpisodeRunner
from policyflow.config import AgentConfig
from policyflow.engine import SamplingParams
from policyflow.model import build_char_tokenizer, build_tiny
from policyflow.tasks.jsonl import JsonlTask
from policyflow.types import Sample

CHAT = (
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
ROWS = [
    {"prompt": "What is 1/3 as a fraction?", "solution": r"$\frac{1}{3}$"},
    {"prompt": "Half of 1?", "solution": r"$\frac{1}{2}$"},
    {"prompt": "Name a colour.", "solution": "any colour you like"},  # math_verify cannot parse it: accuracy_reward returns None
    {"prompt": "What is 2+2?", "solution": "$4$"},
]
SEEN: list[dict] = []  # what `probe` was called with


def probe(prompts, completions, **kwargs):
    """Records its arguments; rewards 1.0 each."""
    SEEN.append({"prompts": prompts, "completions": completions, **kwargs})
    return [1.0] * len(completions)


def _task(tmp_path: Path, reward: str, chat_template: bool = True) -> JsonlTask:
    held_out, train = tmp_path / "held_out.jsonl", tmp_path / "train.jsonl"
    held_out.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    train.write_text(json.dumps({"prompt": "What is 3+3?", "solution": "$6$"}) + "\n")
    return JsonlTask(train, answer_column="solution", reward=reward, eval_path=held_out, chat_template=chat_template)


def test_trl_accuracy_reward_scores_known_completions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    task = _task(tmp_path, "trl.rewards:accuracy_reward")
    problems = list(task.eval_problems())
    completions = [r"So the answer is \boxed{\frac{1}{3}}", r"It is \boxed{\frac{1}{3}}", "red", r"\boxed{4}"]
    with caplog.at_level(logging.WARNING, logger="policyflow.tasks.reward_fn"):
        score = task.score(problems, completions)
    assert score.rewards == [1.0, 0.0, 0.0, 1.0] and score.errors == 0
    assert "returned None for 1 of 4 samples" in caplog.text  # the unparseable gold: 0.0, logged, not an error


def test_trl_think_format_reward_scores_known_completions(tmp_path: Path) -> None:
    task = _task(tmp_path, "trl.rewards:think_format_reward")
    problems = list(task.eval_problems())
    completions = ["<think>\nthirds\n</think>\n1/3", "1/2", "<think>a<think>b</think>", "<think>sum</think>4"]
    score = task.score(problems, completions)
    assert score.rewards == [1.0, 0.0, 0.0, 1.0] and score.errors == 0


@pytest.mark.parametrize("chat_template", [True, False])
def test_reward_functions_get_trls_arguments(tmp_path: Path, chat_template: bool) -> None:
    """Chat models: TRL's conversational form; plain models: strings. Columns arrive as keyword lists."""
    task = _task(tmp_path, "tests.test_trl_rewards:probe", chat_template=chat_template)
    problems = list(task.eval_problems())[:2]
    seen_calls = importlib.import_module("tests.test_trl_rewards").SEEN  # the module the task imported `probe` from
    seen_calls.clear()
    assert task.score(problems, ["a", "b"]).rewards == [1.0, 1.0]
    [seen] = seen_calls
    if chat_template:
        assert seen["prompts"] == [[{"role": "user", "content": p.prompt}] for p in problems]
        assert seen["completions"] == [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]
    else:
        assert seen["prompts"] == [p.prompt for p in problems] and seen["completions"] == ["a", "b"]
    assert seen["solution"] == [r"$\frac{1}{3}$", r"$\frac{1}{2}$"]


class ScriptedGenerator:
    """Answers each call with the next scripted completion (char tokens, ending with EOS)."""

    version = 0
    max_positions = None

    def __init__(self, tokenizer, completions: list[str]):
        self.tokenizer, self.completions = tokenizer, list(completions)

    async def generate(self, prompt_ids, params=None, **_):
        text = self.completions.pop(0)
        ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + (self.tokenizer.eos_token_id,)
        return Sample(tuple(prompt_ids), ids, (-0.5,) * len(ids), (0,) * len(ids), "stop", text)


def test_an_episode_group_is_scored_by_accuracy_reward(tmp_path: Path) -> None:
    """The real scoring path: a chat-template episode runner and the task's group builder."""
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = CHAT
    task = _task(tmp_path, "trl.rewards:accuracy_reward")
    problem = task.eval_problems()[0]
    completions = [r"\boxed{\frac{1}{3}}", r"\boxed{\frac{2}{6}}", r"\boxed{3}"]
    runner = EpisodeRunner(ScriptedGenerator(tokenizer, completions), tokenizer, SamplingParams(max_new_tokens=40), AgentConfig(), chat_template=True)
    group, errors = asyncio.run(runner.run_group(task.group_builder(problem), 3, task_id="t"))
    assert [t.reward for t in group.trajectories] == [1.0, 1.0, 0.0] and errors == 0
    assert tokenizer.decode(group.trajectories[0].segments[0].token_ids) == f"[user]{problem.prompt}<eos>\n[assistant]"


def test_an_rl_step_with_a_trl_reward_and_a_chat_model(tmp_path: Path, small_config) -> None:
    """`train` on a chat-template model folder with `task.reward=trl.rewards:think_format_reward`: no reward errors."""
    model, tokenizer = build_tiny(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    tokenizer.chat_template = CHAT
    folder = tmp_path / "chat_model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a}+{a}=", "solution": f"${2 * a}$"}) for a in range(12)) + "\n")
    cfg = small_config(
        f"model.path={folder}", "model.chat_template=true", f"task.path={data}", "task.answer_column=solution",
        "task.reward=trl.rewards:think_format_reward", "sft.max_steps=0", "eval.every=0", "train.steps=1",
    )
    coordinator.train(cfg, log=lambda *_: None)
    lines = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "rollout/reward_errors" in line]
    assert steps and all(line["rollout/reward_errors"] == 0 for line in steps)
