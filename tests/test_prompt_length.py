"""Prompts longer than the model's context are refused, left-truncated or dropped when the task loads."""

import json
from pathlib import Path

import pytest

from policyflow.cli import main
from policyflow.session import build_task, open_session
from policyflow.tasks import TaskError
from policyflow.tasks.base import Problem
from policyflow.tasks.length import PromptFit, PromptTooLongError
from policyflow.tokens import render_prompt
from policyflow.policy import PolicySpec

# Tiny model: 1 token per character, context 256; with max_new_tokens 6 a prompt may take 250 tokens.
LIMIT = 250


def _rows(tmp_path: Path, long_prompt: str) -> Path:
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(5) for b in range(5)]
    rows.insert(2, {"prompt": long_prompt, "answer": "7"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(small_config, path: Path, *extra: str):
    return small_config(f"task.path={path}", "task.eval_fraction=0.2", *extra)


def test_a_long_prompt_is_refused_with_its_row_count_and_limit(small_config, tmp_path: Path) -> None:
    path = _rows(tmp_path, "x" * 290 + "3+4=")
    with pytest.raises(PromptTooLongError) as err:
        build_task(PolicySpec.of(_cfg(small_config, path)))
    assert str(err.value) == (
        "rows.jsonl:3: the prompt is 294 tokens, but the model's context of 256 tokens minus sampling.max_new_tokens=6 "
        "leaves 250; shorten it, or set task.on_long_prompt=truncate (keep its last tokens) or skip (drop such rows)"
    )


def test_truncate_keeps_the_last_tokens_and_skip_drops_the_row(small_config, tmp_path: Path) -> None:
    prompt = "".join(str(i % 10) for i in range(290)) + "3+4="
    path = _rows(tmp_path, prompt)
    task = build_task(PolicySpec.of(_cfg(small_config, path, "task.on_long_prompt=truncate")))
    rows = {p.id: p for p in [*task.eval_problems(), *(task.train_problem(i) for i in range(task.num_train))]}
    assert rows["rows.jsonl:3"].prompt == prompt[-LIMIT:] and len(rows) == 26
    task = build_task(PolicySpec.of(_cfg(small_config, path, "task.on_long_prompt=skip")))
    ids = {p.id for p in [*task.eval_problems(), *(task.train_problem(i) for i in range(task.num_train))]}
    assert "rows.jsonl:3" not in ids and len(ids) == 25


def test_a_10_mb_row_is_never_tokenized_and_never_reaches_the_engine(small_config, tmp_path: Path) -> None:
    huge = "7" * 10_000_000 + "+1="
    path = _rows(tmp_path, huge)
    with pytest.raises(PromptTooLongError, match=r"^rows.jsonl:3: the prompt is 10,000,003 characters, so at least 2,000,000 tokens, but"):
        build_task(PolicySpec.of(_cfg(small_config, path)))
    session = open_session(PolicySpec.of(_cfg(small_config, path, "task.on_long_prompt=truncate")))
    task = session.task
    problems = [*task.eval_problems(), *(task.train_problem(i) for i in range(task.num_train))]
    lengths = {p.id: len(render_prompt(session.tokenizer, task.render_prompt(p), False)) for p in problems}
    assert lengths["rows.jsonl:3"] == LIMIT and max(lengths.values()) == LIMIT
    assert next(p for p in problems if p.id == "rows.jsonl:3").prompt.endswith("7+1=")


def test_the_character_bound_is_checked_before_tokenizing() -> None:
    counted: list[int] = []

    def count(text: str) -> int:
        counted.append(len(text))
        return len(text)

    fit = PromptFit(count, lambda text, n: text[n:], context=100, max_new_tokens=10, max_token_chars=4, on_long="error")
    with pytest.raises(PromptTooLongError, match="361 characters, so at least 90 tokens"):
        fit.fit(Problem("p", "x" * 361, "1"), lambda p: p.prompt)
    assert counted == []  # refused on characters alone
    truncate = PromptFit(count, lambda text, n: text[n:], context=100, max_new_tokens=10, max_token_chars=4, on_long="truncate")
    assert truncate.fit(Problem("p", "ab" * 5000, "1"), lambda p: "Q: " + p.prompt).prompt == ("ab" * 5000)[-87:]
    assert max(counted) == 3 + 90 * 4  # only the characters that could matter were tokenized


def test_generated_tasks_refuse_rather_than_truncate(small_config) -> None:
    cfg = small_config("task.name=countdown", "model.tiny.max_positions=40", "sampling.max_new_tokens=30", "task.on_long_prompt=truncate")
    with pytest.raises(TaskError, match=r"the prompt is \d+ tokens, but the model's context of 40 tokens minus sampling.max_new_tokens=30 leaves 10"):
        build_task(PolicySpec.of(cfg))


def test_cli_reports_a_long_prompt_in_one_line(tmp_path: Path, capsys) -> None:
    path = _rows(tmp_path, "y" * 5000)
    assert main(["eval", "task.name=jsonl", f"task.path={path}", "model.tiny.hidden_size=32", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("policyflow: PromptTooLongError: rows.jsonl:3: the prompt is 5,000 characters, so at least 1,000 tokens, but the model's "
                   "context of 256 tokens minus sampling.max_new_tokens=8 leaves 248; shorten it, or set task.on_long_prompt=truncate "
                   "(keep its last tokens) or skip (drop such rows)")


def test_agent_max_total_tokens_caps_the_prompt_too(small_config) -> None:
    """A call sees at most agent.max_total_tokens: a prompt must leave it one token to write (else every episode ran 0 turns)."""
    with pytest.raises(PromptTooLongError) as err:
        build_task(PolicySpec.of(small_config("agent.max_total_tokens=4")))
    assert "(and agent.max_total_tokens=4) leaves 3;" in str(err.value)
    assert build_task(PolicySpec.of(small_config("agent.max_total_tokens=64"))).eval_problems()
