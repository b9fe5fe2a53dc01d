"""A run with roles (issue 20 §1): `roles: {challenger: {...}, solver: {...}}` over the shared
top-level sections, each role validated as a whole config, reached from the command line, one
`PolicySpec` per role, resumed role by role; a one-policy config is exactly what it was."""

import pickle
from pathlib import Path

import pytest
import yaml

from policyflow.cli import main
from policyflow.config import POLICY_SECTIONS, Config, ConfigError, describe_fields, load_config, validate_config
from policyflow.policy import PolicySpec
from policyflow.rundir import changed_settings, open_run_folder, resumable

SELFPLAY = """
run: {name: selfplay}
train: {lr: 1.0e-4, steps: 5}
task: {name: arithmetic, options: {shared: 1}}
roles:
  challenger:
    task: {name: countdown, options: {own: 2}}
    sampling: {temperature: 1.2}
  solver:
    train: {lr: 1.0e-5}
    model: {tiny: {num_layers: 2}}
"""


def _selfplay(tmp_path: Path, *overrides: str) -> Config:
    path = tmp_path / "selfplay.yaml"
    path.write_text(SELFPLAY)
    return load_config(path, [f"run.output_dir={tmp_path / 'runs'}", *overrides])


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_each_role_overrides_the_shared_sections_key_by_key(tmp_path: Path) -> None:
    cfg = _selfplay(tmp_path)
    challenger, solver = cfg.role_config("challenger"), cfg.role_config("solver")
    assert (challenger.task.name, challenger.sampling.temperature, challenger.train.lr) == ("countdown", 1.2, 1e-4)
    assert (solver.task.name, solver.train.lr, solver.train.steps, solver.sampling.temperature) == ("arithmetic", 1e-5, 5, 1.0)
    assert (solver.model.tiny.num_layers, solver.model.tiny.hidden_size) == (2, 128)  # down through nested sections
    assert challenger.task.options == {"own": 2}  # a dict-valued setting is replaced whole, not merged
    assert solver.roles == {} and solver.run == cfg.run and solver.pipeline == cfg.pipeline  # the run's sections are shared
    with pytest.raises(ConfigError, match="there is no role 'teacher' in roles"):
        cfg.role_config("teacher")


def test_policy_specs_one_per_role_each_in_its_own_folder(tmp_path: Path) -> None:
    cfg = _selfplay(tmp_path)
    specs = cfg.policy_specs()
    assert [(s.role, s.folder) for s in specs] == [("challenger", cfg.run_dir / "challenger"), ("solver", cfg.run_dir / "solver")]
    challenger, solver = specs
    assert (challenger.task.name, solver.train.lr, solver.model.tiny.num_layers) == ("countdown", 1e-5, 2)
    assert solver.seed == cfg.run.seed and solver.cache_dir == Path(cfg.run.output_dir) / "cache"
    assert pickle.loads(pickle.dumps(solver)) == solver
    moved = tmp_path / "moved"
    assert [s.folder for s in cfg.policy_specs(moved)] == [moved / "challenger", moved / "solver"]
    assert PolicySpec.of(cfg, "solver") == solver
    # a one-policy config: the one spec "policy", whose folder is the run folder
    one = load_config(None, [f"run.output_dir={tmp_path / 'runs'}"])
    assert [(s.role, s.folder) for s in one.policy_specs()] == [("policy", one.run_dir)]


def test_a_one_policy_config_is_what_it_was() -> None:
    cfg = load_config(None, ["train.lr=1e-5"])
    assert cfg.roles == {} and "roles" not in cfg.model_dump() and "roles" not in cfg.model_dump(mode="json")
    assert list(cfg.model_dump(mode="json")) == ["run", "model", "task", "sampling", "sft", "train", "loss", "advantage", "eval", "checkpoint", "pipeline", "agent"]


def test_command_line_overrides_reach_one_role(tmp_path: Path) -> None:
    cfg = _selfplay(tmp_path, "roles.solver.train.lr=3e-6", "roles.challenger.sft.max_steps=0", "train.steps=7")
    assert cfg.role_config("solver").train.lr == 3e-6 and cfg.role_config("challenger").train.lr == 1e-4
    assert cfg.role_config("challenger").sft.max_steps == 0 and cfg.role_config("solver").sft.max_steps == 600
    assert cfg.role_config("challenger").train.steps == 7 == cfg.role_config("solver").train.steps  # shared, so both
    # a role written empty in YAML (`solver:`) takes overrides as any section does
    path = tmp_path / "empty.yaml"
    path.write_text("roles:\n  solver:\n  challenger:\n")
    cfg = load_config(path, ["roles.solver.train.lr=1e-5"])
    assert cfg.roles == {"solver": {"train": {"lr": 1e-5}}, "challenger": {}}
    # the values a role sets are kept as validated: config.yaml holds 1e-05, not the text '1e-5'
    assert load_config(None, ["roles.solver.train.steps=1e3"]).roles == {"solver": {"train": {"steps": 1000}}}


def test_config_yaml_of_a_role_run_reads_back_as_the_same_config(tmp_path: Path) -> None:
    cfg = _selfplay(tmp_path, "roles.solver.train.lr=1e-5")
    again = validate_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)))
    assert again == cfg and again.role_config("solver") == cfg.role_config("solver")
    assert changed_settings(cfg, again) == {}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["roles.solver.pipeline.mode=async"], "roles.solver.pipeline: pipeline is the run's, shared by every role; set it at the top level"),
        (["roles.solver.run.seed=3"], "roles.solver.run: run is the run's"),
        (["roles.solver.checkpoint.every=3"], "roles.solver.checkpoint: checkpoint is the run's"),
        (["roles.solver.trian.lr=1"], "unknown config key roles.solver.trian (did you mean roles.solver.train?); allowed keys here: " + ", ".join(POLICY_SECTIONS)),
        (["roles.solver.roles.a.train.lr=1"], "unknown config key roles.solver.roles"),
        (["roles.solver.train.lrr=1"], "unknown config key roles.solver.train.lrr (did you mean roles.solver.train.lr?); allowed keys here: steps, "),
        (["roles.policy.train.lr=1"], "roles.policy: 'policy' is the role of a one-policy run (no roles); name the role otherwise"),
        (["roles.checkpoints.train.lr=1"], "roles.checkpoints: 'checkpoints' is a name the run folder uses for its own files"),
        (["roles.2nd.train.lr=1"], "roles.2nd: a role name is an identifier"),
        (["roles.solver.agent.max_turns=true"], "roles.solver.agent.max_turns=true is not allowed: it takes a whole number (e.g. 8, the default), not true/false"),
        (["roles.solver.train.steps=2.5"], "roles.solver.train.steps=2.5 is not allowed: it takes a whole number"),
        (["roles.solver.train.lr=5"], "roles.solver.train.lr=5 is invalid: input should be less than or equal to 1"),
        (["roles.solver.loss.name=gspoo"], "roles.solver.loss.name='gspoo' is not allowed (did you mean 'gspo'?)"),
        (["roles.solver.model.tiny.num_heads=3"], "roles.solver.model.tiny.num_heads=3 does not divide roles.solver.model.tiny.hidden_size=128"),
        (["roles.solver.sampling.max_new_tokens=256"], "roles.solver.sampling.max_new_tokens=256 leaves no room for a prompt in the tiny model's roles.solver.model.tiny.max_positions=256"),
        (["roles.solver.task.name=jsonl"], "roles.solver.task.path is required when roles.solver.task.name=jsonl"),
        (["roles.solver.train=3"], "roles.solver.train=3 is invalid"),
        (["roles.solver=3"], "roles.solver=3 is invalid: input should be a valid dictionary"),
        (["roles=[solver]"], "roles=['solver'] is invalid: input should be a valid dictionary"),
        # the shared sections are checked as themselves first
        (["sampling.max_new_tokens=256", "roles.solver.train.lr=1e-5"], "sampling.max_new_tokens=256 leaves no room"),
    ],
)
def test_a_role_is_checked_as_a_whole_config_and_errors_name_the_role(overrides: list[str], expected: str) -> None:
    assert _refused(*overrides).startswith(expected)


def test_a_role_that_fixes_the_shared_sections_is_allowed() -> None:
    """Each role is checked as merged: a shared setting the role overrides need not be valid with the other's."""
    cfg = load_config(None, ["model.tiny.max_positions=512", "sampling.max_new_tokens=300", "roles.small.model.tiny.max_positions=16", "roles.small.sampling.max_new_tokens=8"])
    assert cfg.role_config("small").model.tiny.max_positions == 16


def test_a_roles_stale_data_warning_names_the_role_and_is_said_once(caplog) -> None:
    with caplog.at_level("WARNING", logger="policyflow"):
        load_config(None, ["pipeline.mode=async", "roles.solver.loss.name=grpo", "roles.challenger.train.lr=1e-5"])
    (record,) = caplog.records  # the challenger's loss is the shared decoupled_ppo: nothing to say for it
    assert "with roles.solver.loss.name=grpo" in record.getMessage() and "\n" not in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="policyflow"):
        load_config(None, ["pipeline.mode=async", "loss.name=grpo", "roles.solver.train.lr=1e-5", "roles.challenger.train.lr=1e-5"])
    assert len(caplog.records) == 1 and "roles." not in caplog.records[0].getMessage()  # the shared loss: said once


def test_config_fields_documents_roles_in_one_entry(capsys) -> None:
    lines = [line for line in describe_fields() if line.startswith("roles")]
    assert len(lines) == 1 and lines[0].startswith("roles ({}): ")
    assert "overrides the top-level policy sections" in lines[0] and "roles.solver.train.lr=1e-5" in lines[0]
    assert main(["config", "--fields"]) == 0
    assert sum(line.startswith("roles ") for line in capsys.readouterr().out.splitlines()) == 1


def test_train_refuses_roles_in_one_line_before_writing_anything(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    assert main(["train", f"run.output_dir={runs}", "roles.solver.train.lr=1e-5", "roles.challenger.task.name=countdown"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("policyflow: config error: roles (solver, challenger) are trained by a self-play method: set selfplay.method=rzero "
                   "(roles challenger and solver) or rlt (teacher and student), or remove roles")
    assert not runs.exists()
    assert main(["train", f"run.output_dir={runs}", "selfplay.method=rzero", "roles.solver.train.lr=1e-5"]) == 2
    assert "selfplay.method=rzero runs the roles challenger and solver" in capsys.readouterr().err and not runs.exists()
    for command in (["sft"], ["eval"]):
        assert main([*command, f"run.output_dir={runs}", "roles.solver.train.lr=1e-5"]) == 2
        assert "which only `policyflow train` runs (selfplay.method); sft and eval serve one policy" in capsys.readouterr().err and not runs.exists()


def test_resume_rules_apply_role_by_role(tmp_path: Path) -> None:
    saved = _selfplay(tmp_path)
    assert changed_settings(saved, _selfplay(tmp_path, "roles.solver.train.steps=9")) == {"roles.solver.train.steps": [5, 9]}
    assert resumable("roles.solver.train.steps") and resumable("roles.solver.eval.every") and not resumable("roles.solver.train.lr")
    # a shared section changes every role that does not override it; one that every role overrides changes nothing
    assert changed_settings(saved, _selfplay(tmp_path, "sampling.temperature=0.9")) == {"roles.solver.sampling.temperature": [1.0, 0.9]}
    assert changed_settings(saved, _selfplay(tmp_path, "task.num_eval=50")) == {"roles.challenger.task.num_eval": [200, 50], "roles.solver.task.num_eval": [200, 50]}
    assert changed_settings(saved, _selfplay(tmp_path, "roles.challenger.sampling.temperature=1.2")) == {}
    assert list(changed_settings(saved, _selfplay(tmp_path, "roles.teacher.train.lr=1e-5")))[0] == "roles"
    assert list(changed_settings(saved, load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=selfplay"])))[0] == "roles"

    saved.run_dir.mkdir(parents=True)
    (saved.run_dir / "config.yaml").write_text(yaml.safe_dump(saved.model_dump(mode="json"), sort_keys=False))
    with pytest.raises(ConfigError) as err:
        open_run_folder(_selfplay(tmp_path, "roles.solver.train.lr=2e-5"), resume=saved.run_dir)
    assert str(err.value).startswith("--resume cannot change roles.solver.train.lr (1e-05 in the run's config.yaml, 2e-05 now)")
    with pytest.raises(ConfigError) as err:
        open_run_folder(_selfplay(tmp_path, "roles.teacher.train.lr=2e-5"), resume=saved.run_dir)
    assert str(err.value).startswith("--resume cannot change roles (['challenger', 'solver'] in the run's config.yaml, ['challenger', 'solver', 'teacher'] now)")
    with pytest.raises(ConfigError, match="no checkpoint of role challenger under"):  # the settings pass; only the checkpoints are missing
        open_run_folder(_selfplay(tmp_path, "roles.solver.train.steps=9", "train.time_budget_s=60"), resume=saved.run_dir)
