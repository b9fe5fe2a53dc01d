"""Config: presets load, overrides apply, and every mistake is one line naming field, value and choices."""

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
