"""Config: presets load, overrides apply, and every mistake is one line naming field, value and choices."""

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from policyflow.cli import main
from policyflow.config import Config, ConfigError, describe_fields, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_presets_validate(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_overrides_parse_as_yaml_and_nest() -> None:
    cfg = load_config(None, ["train.lr=1e-4", 'sampling.stop=[";", "\\n"]', "model.tiny.num_layers=2", "run.progress=false"])
    assert cfg.train.lr == 1e-4
    assert cfg.sampling.stop == (";", "\n")
    assert cfg.model.tiny.num_layers == 2 and cfg.run.progress is False


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trian.lr=1", "unknown config key trian (did you mean train?); allowed keys here: run, model, task"),
        ("train.lrr=1", "unknown config key train.lrr (did you mean train.lr?)"),
        ("loss.name=grpp", "loss.name='grpp' is not allowed (did you mean 'grpo'?); allowed: grpo, dapo, dr_grpo, gspo, gspo_token, gmpo, decoupled_ppo"),
        ("train.lr=-1", "train.lr=-1 is invalid: input should be greater than 0"),
        ("train.steps=abc", "train.steps='abc' is invalid"),
        ("loss.behav_weight_cap=3", "loss.behav_weight_cap=3.0 does not apply to loss.name='grpo'; it is used by: decoupled_ppo"),
        ("task.min_digits=4", "task.min_digits=4 exceeds task.max_digits=3"),
        ("task.name=jsonl", "task.path is required when task.name=jsonl"),
        ("task.name=jsnol", "task.name='jsnol' is not allowed (did you mean 'jsonl'?); allowed: arithmetic, countdown, jsonl, search_qa, multiply, agent_program, or a Task class of yours as package.module:Class"),
        ("task.name=my tasks:Task", "task.name='my tasks:Task' is not allowed; allowed: arithmetic"),
        ("trainlr", "override 'trainlr' must look like section.key=value"),
    ],
)
def test_errors_name_field_value_and_choices(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)


def test_every_field_has_a_description() -> None:
    lines = describe_fields()
    assert any(line.startswith("train.lr (0.00025): ") for line in lines)
    assert all(not line.endswith(": None") for line in lines)


def test_cli_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "train.lrr=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "policyflow: config error: unknown config key train.lrr (did you mean train.lr?); allowed keys here: " + ", ".join(
        Config.model_fields["train"].annotation.model_fields
    )


def test_stale_data_with_an_on_policy_loss_warns_in_one_line(caplog) -> None:
    with caplog.at_level("WARNING", logger="policyflow"):
        load_config(None, ["pipeline.mode=async", "loss.name=grpo"])
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "loss.name=grpo" in message and "pipeline.mode=async (η 2)" in message
    assert "stale" in message and "loss.name=decoupled_ppo" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="policyflow"):
        load_config(None, ["pipeline.mode=async"])  # decoupled_ppo by default: nothing to say
        load_config(None, ["pipeline.mode=one_step_off", "loss.name=decoupled_ppo"])
        load_config(None, ["loss.name=grpo"])  # sync: fresh data
    assert caplog.records == []


def test_stale_data_warning_is_one_stderr_line_outside_pytest() -> None:
    code = "from policyflow.config import load_config; load_config(None, ['pipeline.mode=one_step_off', 'loss.name=gspo'])"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("warning: pipeline.mode=one_step_off (η 1) with loss.name=gspo")
@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=.inf", "train.lr=inf is invalid: input should be a finite number"),
        ("sampling.temperature=.inf", "sampling.temperature=inf is invalid: input should be a finite number"),
        ("train.grad_clip=.nan", "train.grad_clip=nan is invalid: input should be a finite number"),
        ("loss.clip_high=.inf", "loss.clip_high=inf is invalid: input should be a finite number"),
        ("train.lr=5", "train.lr=5 is invalid: input should be less than or equal to 1"),
        ("sampling.temperature=50", "sampling.temperature=50 is invalid: input should be less than or equal to 10"),
        ("train.group_size=1000000", "train.group_size=1000000 is invalid: input should be less than or equal to 65536"),
        ("train.betas=[0.9, 1.0]", "train.betas=1.0 is invalid: input should be less than 1"),
        ("model.tiny.num_heads=3", "model.tiny.num_heads=3 does not divide model.tiny.hidden_size=128; use one of [1, 2, 4, 8, 16, 32, 64]"),
        ("model.tiny.num_kv_heads=3", "model.tiny.num_kv_heads=3 does not divide model.tiny.num_heads=4; use one of [1, 2, 4]"),
        ("model.tiny.num_heads=128", "model.tiny.hidden_size=128 / num_heads=128 gives head size 1, which rotary embeddings cannot use"),
        ("sampling.max_new_tokens=256", "sampling.max_new_tokens=256 leaves no room for a prompt in the tiny model's model.tiny.max_positions=256"),
    ],
)
def test_non_finite_absurd_and_unworkable_values_are_refused(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_every_float_field_refuses_inf_and_nan() -> None:
    """The rule is general (Section's allow_inf_nan=False), not a list of patched fields."""
    from policyflow.config import Section

    names = [line.split(" ")[0] for line in describe_fields()]
    floats = [n for n in names if _annotation(n) is float or float in typing.get_args(_annotation(n))]
    assert {"train.lr", "sampling.top_p", "task.reward_timeout_s", "eval.temperature"} <= set(floats)
    for name in floats:
        with pytest.raises(ConfigError, match="finite number"):
            load_config(None, [f"{name}=.nan"])
    assert Section.model_config["allow_inf_nan"] is False


def _annotation(dotted: str):
    model = Config
    *sections, leaf = dotted.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf].annotation


def test_hermes_tool_calls_with_a_warm_start_are_allowed() -> None:
    """The Hermes format has demonstrations of its own (`SearchQATask.sft_turns`) rendered as RL
    renders them (tests/test_tool_env.py), so SFT with it is no longer refused."""
    assert load_config(None, ["task.name=search_qa", "task.search.tool_format=hermes"]).task.search.tool_format == "hermes"


def test_task_names_come_from_the_registry_or_a_user_class() -> None:
    """Every registered task is a valid task.name (no second list to keep in step); so is any
    package.module:Class, which is only imported when the task is built."""
    from policyflow.tasks import TASKS

    assert list(TASKS) == ["arithmetic", "countdown", "jsonl", "search_qa", "multiply", "agent_program"]
    for name in TASKS:
        assert load_config(None, [f"task.name={name}", "task.path=x.jsonl"]).task.name == name
    cfg = load_config(None, ["task.name=nowhere.to_be.found:Task", "task.options={depth: 3, tools: [a, b]}"])
    assert cfg.task.name == "nowhere.to_be.found:Task" and cfg.task.options == {"depth": 3, "tools": ["a", "b"]}
