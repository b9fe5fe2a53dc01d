"""Values mean what they say (issue 17, class 3) and data rows are checked, not trusted (class 6).

Config values are not coerced across kinds (no bool -> number, no number -> bool, no fractional
float -> int); a YAML key given twice is refused with its lines; every file that cannot be read
is named. Every malformed jsonl row is named as `file:line` and skipped under on_bad_row=skip.
Sizes that cannot work are refused at once, naming the real field; long preparations log notes.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import typing
from pathlib import Path

import pytest

from policyflow.config import Config, ConfigError, describe_fields, load_config, read_yaml
from policyflow.session import build_task
from policyflow.tasks import CountdownTask, JsonlTask, SearchQATask, TaskError
from policyflow.tasks.reward_fn import load_reward_fn
from policyflow.policy import PolicySpec


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- config values


def test_a_bool_is_not_a_count() -> None:
    assert _refused("agent.max_turns=true") == "agent.max_turns=true is not allowed: it takes a whole number (e.g. 8, the default), not true/false"


def _leaf_fields() -> dict[str, typing.Any]:
    """Every leaf field `section.key` with its annotation."""
    fields = {}
    for line in describe_fields():
        name = line.split(" ")[0]
        model = Config
        *sections, leaf = name.split(".")
        for part in sections:
            model = model.model_fields[part].annotation
        fields[name] = model.model_fields[leaf].annotation
    return fields


def _kinds(annotation: typing.Any) -> set[type]:
    return {a for a in (typing.get_args(annotation) or (annotation,)) if a in (bool, int, float)}


def test_every_number_field_refuses_bools_and_every_bool_field_refuses_numbers() -> None:
    """The rule is general (Section's before-validator), not a list of patched fields."""
    fields = _leaf_fields()
    numbers = [n for n, a in fields.items() if _kinds(a) in ({int}, {float})]
    flags = [n for n, a in fields.items() if _kinds(a) == {bool}]
    assert {"agent.max_turns", "train.lr", "train.time_budget_s", "pipeline.max_staleness", "task.search.num_entities"} <= set(numbers)
    assert {"run.progress", "train.dynamic_sampling", "model.chat_template"} <= set(flags)
    for name in numbers:
        for value in ("true", "false"):
            assert _refused(f"{name}={value}").startswith(f"{name}={value} is not allowed: it takes a"), name
    for name in flags:
        for value in ("1", "0", "'true'"):
            assert _refused(f"{name}={value}").startswith(f"{name}={value} is not allowed: it takes true or false"), name


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=2.5", "train.steps=2.5 is not allowed: it takes a whole number (e.g. 60, the default)"),
        ("train.steps=25e-1", "train.steps='25e-1' is not allowed: it takes a whole number"),
        ("train.steps=.nan", "train.steps=nan is not allowed: it takes a whole number"),
        ("run.seed=1.0e+30", "run.seed=1e+30 is not allowed: it is too large to be exact as a floating-point number"),
        ("train.betas=[true, 0.9]", "train.betas=true is not allowed: it takes a number"),
        ("train.time_budget_s=true", "train.time_budget_s=true is not allowed: it takes a number (or null for none), not true/false"),
        ("run.name=2024", "run.name=2024 is invalid: it takes text, and YAML read the value as a number; quote it"),
        ("run.name=no", "run.name=false is invalid: it takes text, and YAML read the value as true/false"),
        ("sampling.stop=abc", "sampling.stop='abc' is invalid: it takes a list"),
        ("run.device=true", "run.device=true is not allowed; allowed: auto, cpu, cuda"),
        ("task.prompt_column=answer", "task.prompt_column and task.answer_column are both 'answer'"),
    ],
)
def test_values_are_not_coerced_across_kinds(override: str, expected: str) -> None:
    assert _refused(override).startswith(expected)


def test_what_users_rely_on_still_converts() -> None:
    cfg = load_config(None, [
        "train.lr=1e-4", "sft.lr=1", "train.steps=3.0", "sft.max_steps=1e3", "run.seed='7'",
        "train.betas=[0.9, 0.95]", 'sampling.stop=["\\n", ";"]', "run.progress=false", "train.time_budget_s=null",
        "checkpoint.every=010",
    ])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float)
    assert cfg.train.steps == 3 and isinstance(cfg.train.steps, int)
    assert cfg.sft.max_steps == 1000 and isinstance(cfg.sft.max_steps, int)  # YAML 1.1 reads 1e3 as text; it is exact
    assert cfg.run.seed == 7
    assert cfg.train.betas == (0.9, 0.95) and cfg.sampling.stop == ("\n", ";")
    assert cfg.run.progress is False and cfg.train.time_budget_s is None
    assert cfg.checkpoint.every == 10  # an override YAML 1.1 would read as octal is taken as the text it is


def test_an_integral_float_staleness_picks_the_stale_data_objective() -> None:
    assert load_config(None, ["pipeline.mode=async", "pipeline.max_staleness=2.0"]).loss.name == "decoupled_ppo"


def test_a_huge_integer_override_is_a_config_error() -> None:
    assert _refused("train.steps=" + "9" * 5000).startswith("train.steps='99999")


# ----------------------------------------------------------------------------- config files


def test_a_section_given_twice_is_refused_with_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1.0e-4\nrun:\n  seed: 1\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"config file {str(path)!r}: key 'train' is given twice, on lines 1 and 5 (YAML would silently keep only the last); keep one"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  lr: 1.0e-4\n  steps: 3\n  lr: 2.0e-4\n", "key 'lr' is given twice, on lines 2 and 4"),
        ("run: {seed: 1, seed: 2}\n", "key 'seed' is given twice, on lines 1 and 1"),
        ("model:\n  tiny:\n    num_layers: 2\n    num_layers: 3\n", "key 'num_layers' is given twice, on lines 3 and 4"),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^config file '{path}': {expected}"):
        read_yaml(path)


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("run: &base {seed: 1, name: a}\nsft:\n  max_steps: 2\n")
    assert load_config(path).run.seed == 1
    path.write_text("base: &b {seed: 1, name: a}\nrun:\n  <<: *b\n  seed: 2\n")
    assert read_yaml(path)["run"] == {"seed": 2, "name": "a"}


def test_unreadable_config_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"run:\n  name: caf\xe9\n")
    with pytest.raises(ConfigError) as err:
        load_config(latin1)
    assert str(err.value) == f"config file {str(latin1)!r} is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"
    with pytest.raises(ConfigError, match=f"config file '{tmp_path}' is a folder"):
        load_config(tmp_path)
    huge = tmp_path / "huge.yaml"
    huge.write_text("train:\n  steps: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"config file '{huge}' is not valid YAML: an integer of 5000 digits .* \(line 2, column 10\)"):
        load_config(huge)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"config file '{bad}' is not valid YAML: .*\(line 2, column 1\)"):
        load_config(bad)
    locked = tmp_path / "locked.yaml"
    locked.write_text("run:\n  seed: 1\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ConfigError, match=f"config file '{locked}' cannot be read: Permission denied"):
        load_config(locked)


def test_a_bom_is_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfrun:\n  seed: 3\n")
    assert load_config(path).run.seed == 3


# ----------------------------------------------------------------------------- jsonl rows


GOOD = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(4)]

# Each bad row (the file's line 5, after four good rows), the message naming it, and the reward it is read under.
BAD_ROWS = [
    ('{"prompt": "big", "answer": ' + "9" * 5000 + "}", "a number of 5000 characters is more than Python reads as an integer", "exact"),
    ('{"prompt": "big", "answer": ' + "9" * 5000 + "}", "a number of 5000 characters is more than Python reads as an integer", "numeric"),
    ('{"prompt": "x\\ud800", "answer": "1"}', "column 'prompt' holds a lone surrogate '\\ud800'", "exact"),
    ('{"prompt": "x", "answer": "\\udfff"}', "column 'answer' holds a lone surrogate '\\udfff'", "exact"),
    ('{"prompt": "x", "answer": NaN}', "NaN is not JSON", "exact"),
    ('{"prompt": "x", "answer": -Infinity}', "-Infinity is not JSON", "numeric"),
    ('{"prompt": "x", "answer": 1e400}', "the number 1e400 is too large for a float", "exact"),
    ('{"prompt": "x", "answer": "1", "answer": "2"}', "key 'answer' is given twice", "exact"),
    ('{"prompt": "x", "answer": null}', "answer column 'answer' must be a string or number, got null", "exact"),
    ('{"prompt": "x", "answer": {"a": 1}}', "answer column 'answer' must be a string or number, got an object", "exact"),
    ('{"prompt": "x", "answer": "  "}', "answer column 'answer' is empty", "exact"),
    ('{"prompt": "x", "answer": "' + "9" * 400 + '"}', "answer '" + "9" * 59 + "... is not a number (or one too large for a float)", "numeric"),
    ('{"prompt": ["x"], "answer": "1"}', "prompt column 'prompt' must be a non-empty string", "exact"),
    ('{"prompt": "", "answer": "1"}', "prompt column 'prompt' must be a non-empty string", "exact"),
]


@pytest.mark.parametrize("row, why, reward", BAD_ROWS, ids=[f"{i}-{r}" for i, (_, _, r) in enumerate(BAD_ROWS)])
def test_every_bad_row_is_named_and_skip_skips_it(tmp_path: Path, row: str, why: str, reward: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([*GOOD, row, GOOD[0]]) + "\n")
    with pytest.raises(TaskError) as err:
        JsonlTask(path, reward=reward)
    assert str(err.value).startswith(f"{path}:5: {why}"), str(err.value)
    with caplog.at_level(logging.WARNING, logger="policyflow.tasks.jsonl"):
        task = JsonlTask(path, reward=reward, on_bad_row="skip")
    assert task.bad_rows == [5]
    assert f"rows.jsonl:5: skipping malformed row: {why}" in caplog.text
    assert "skipped 1 malformed rows, at lines [5]" in caplog.text


def test_a_lone_surrogate_never_reaches_the_tokenizer(tmp_path: Path) -> None:
    """The issue's example: the row is skipped, and the task builds and fits its prompts with the model's tokenizer."""
    path = tmp_path / "sur.jsonl"
    path.write_text("\n".join([*GOOD, '{"prompt": "x\\ud800", "answer": "1"}']) + "\n")
    cfg = load_config(None, ["task.name=jsonl", f"task.path={path}", "task.on_bad_row=skip"])
    task = build_task(PolicySpec.of(cfg))
    assert task.bad_rows == [5] and {p.prompt for p in task.eval_problems()} | {task.train_problem(i).prompt for i in range(8)} == {f"q{i}" for i in range(4)}
    with pytest.raises(TaskError, match=r"sur\.jsonl:5: column 'prompt' holds a lone surrogate"):
        build_task(PolicySpec.of(load_config(None, ["task.name=jsonl", f"task.path={path}"])))


def test_a_valid_surrogate_pair_bom_blank_lines_and_crlf_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "ok.jsonl"
    rows = [json.dumps({"prompt": "smile \U0001F600", "answer": "1"}), "", "   ", json.dumps({"prompt": "b", "answer": 2.5}), json.dumps({"prompt": "c", "answer": "3"})]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    task = JsonlTask(path, eval_fraction=0.3)
    problems = {p.prompt: p.answer for p in [*task.eval_problems(), *(task.train_problem(i) for i in range(task.num_train))]}
    assert problems == {"smile \U0001F600": "1", "b": "2.5", "c": "3"} and task.bad_rows == []


def test_an_unreadable_jsonl_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(GOOD) + "\n")
    real_open = Path.open

    def denied(self: Path, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(TaskError, match=f"jsonl task: cannot read the training file '{path}': Permission denied"):
        JsonlTask(path)


@pytest.mark.parametrize(
    "source, expected",
    [
        ('raise RuntimeError("boom")\n', r"importing module 'pf_bad_reward' failed at .*pf_bad_reward\.py:1: RuntimeError\('boom'\)"),
        ("def f(p, c, **k)\n    return 1\n", r"importing module 'pf_bad_reward' failed at .*pf_bad_reward\.py:1: expected ':'"),
        ("import pf_not_installed_anywhere\n", r"module 'pf_bad_reward' imports 'pf_not_installed_anywhere' \(.*pf_bad_reward\.py:1\), which is not installed"),
    ],
)
def test_a_reward_module_that_fails_to_import_is_named_with_its_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, expected: str) -> None:
    (tmp_path / "pf_bad_reward.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pf_bad_reward", raising=False)
    with pytest.raises(TaskError, match=expected):
        load_reward_fn("pf_bad_reward:f")


def test_a_non_utf8_reward_module_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pf_latin1_reward.py").write_bytes(b'X = "caf\xe9"\ndef f(p, c, **k):\n    return [0.0] * len(p)\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pf_latin1_reward", raising=False)
    with pytest.raises(TaskError, match=r"pf_latin1_reward\.py:1: \(unicode error\) 'utf-8' codec can't decode byte 0xe9"):
        load_reward_fn("pf_latin1_reward:f")


# ----------------------------------------------------------------------------- absurd sizes


def test_absurd_search_corpus_is_refused_at_once_naming_the_real_field(tmp_path: Path) -> None:
    from policyflow.tasks.search_qa import MAX_ENTITIES, NAME_SPACE  # the cap is derived from the names the task can draw

    assert MAX_ENTITIES == NAME_SPACE // 4
    cfg = load_config(None, ["task.name=search_qa", "task.search.num_entities=1000000", f"task.search.corpus_dir={tmp_path}"])
    with pytest.raises(TaskError) as err:
        build_task(PolicySpec.of(cfg))
    assert str(err.value).startswith(f"task.search.num_entities=1000000 is more places than search_qa can name: at most {MAX_ENTITIES}")
    assert "task.num_entities" not in str(err.value).replace("task.search.num_entities", "")
    task = SearchQATask(num_entities=MAX_ENTITIES, num_eval_entities=40, num_eval=20, corpus_dir=tmp_path)  # the cap itself works
    assert len(task.entities) == MAX_ENTITIES and task.sft_problem(0).columns["places"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["task.search.num_eval_entities=200"], "task.search.num_eval_entities=200 leaves no place for training questions in task.search.num_entities=200"),
        (["task.search.search_latency_s=10"], "task.search.search_latency_s=10.0 is not below task.search.tool_timeout_s=10.0: every search would time out"),
    ],
)
def test_unworkable_search_settings_are_config_errors(overrides: list[str], expected: str) -> None:
    assert _refused("task.name=search_qa", *overrides).startswith(expected)


def test_too_few_held_out_questions_name_the_fields(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"^task.num_eval=50 is more than the 6 distinct held-out questions task.search.num_eval_entities=2 places give"):
        SearchQATask(num_entities=20, num_eval_entities=2, num_eval=50, corpus_dir=tmp_path)
    with pytest.raises(TaskError, match=r"^task.num_eval=5 is more than the 4 distinct held-out questions"):
        SearchQATask(num_entities=20, num_eval_entities=2, num_eval=5, two_hop_fraction=0.0, corpus_dir=tmp_path)
    assert len(SearchQATask(num_entities=20, num_eval_entities=2, num_eval=6, corpus_dir=tmp_path).eval_problems()) == 6


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(max_number=10**9), "task.max_number=1000000000 gives numbers an answer cannot write (countdown reads numbers of at most 9 digits)"),
        (dict(num_numbers=40), "task.num_numbers=40 numbers need an expression of at least 79 characters, more than the 64 an answer may have"),
        (dict(max_number=2, max_target=2, num_eval=20), "task.num_eval=20 is more than the at most 8 distinct countdown problems"),
    ],
)
def test_unworkable_countdown_sizes_are_refused_naming_the_field(kwargs: dict, expected: str) -> None:
    with pytest.raises(TaskError) as err:
        CountdownTask(**kwargs)
    assert str(err.value).startswith(expected), str(err.value)


def test_long_preparations_log_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import policyflow.tasks.base as base

    monkeypatch.setattr(base, "PROGRESS_EVERY_S", 0.0)  # every step of a preparation counts as long
    with caplog.at_level(logging.WARNING, logger="policyflow.tasks"):
        CountdownTask(num_eval=3)
        path = tmp_path / "data.jsonl"
        path.write_text("\n".join(GOOD) + "\n")
        JsonlTask(path)
    assert "note: drawing 3 distinct held-out countdown problems (task.num_eval): 2 of 3 done so far" in caplog.text
    assert f"note: reading the training rows of {path} (lines): 4 done so far" in caplog.text


@pytest.mark.parametrize(
    "value, expected",
    [("010", "010 is octal in YAML 1.1 (8); write it without the leading zero (line 2, column 10)"), ("1:30", "1:30 is a base-60 number in YAML 1.1")],
)
def test_yaml11_number_forms_that_change_the_number_are_refused(tmp_path: Path, value: str, expected: str) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(f"train:\n  steps: {value}\n")
    with pytest.raises(ConfigError, match=f"^config file '{path}' is not valid YAML: {re.escape(expected)}"):
        load_config(path)
    path.write_text("train:\n  steps: 07\n  lr: 0x1\n")  # the same number either way: kept
    assert load_config(path).train.steps == 7
