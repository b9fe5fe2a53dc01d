"""The one typed configuration: frozen pydantic models, unknown keys forbidden, a description per field.

Defaults live here and only here. Presets in `configs/*.yaml` override them, and command-line
overrides `section.key=value` override presets. Any error becomes a one-line `ConfigError`
naming the field, the value, and what is allowed. Values mean what they say: true/false is not
a number and a number is not true/false, and an integer field takes only whole numbers
(`Section`, `yamlfile.exact_value`: `agent.max_turns=true` is refused, not read as 1). YAML is read by
`yamlfile.YamlLoader`, which refuses a key given twice and YAML 1.1's octal and base-60 numbers.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, ValidationInfo, model_serializer, model_validator

from policyflow.config_sections import (  # noqa: F401  (re-exported: `from policyflow.config import AgentConfig`)
    ConfigError,
    Section,
    RunConfig,
    TinyModelConfig,
    LoRAConfig,
    ModelConfig,
    SearchQAConfig,
    CodeConfig,
    TaskConfig,
    SamplingConfig,
    SFTConfig,
    TrainConfig,
    LossConfig,
    AdvantageConfig,
    PipelineConfig,
    EvalConfig,
    CheckpointConfig,
    AgentConfig,
    SelfPlayConfig,
    LOG,
    TRACKERS,
    MODE_DEFAULTS,
)
from policyflow.yamlfile import DuplicateKeyError, load_yaml, shown

if TYPE_CHECKING:
    from policyflow.policy import PolicySpec

# A run with roles (issue 20): each role overrides the policy sections; the run-level ones are shared.
POLICY_SECTIONS = ("model", "task", "sampling", "sft", "train", "loss", "advantage", "eval", "agent")
RUN_SECTIONS = ("run", "pipeline", "checkpoint", "selfplay")
# The roles each self-play method runs (selfplay.method), in the order it trains them.
SELFPLAY_ROLES = {"none": (), "rzero": ("challenger", "solver"), "rlt": ("teacher", "student")}
# Not role names: the one-policy role, and what a run folder holds beside the role folders.
RESERVED_ROLES = ("policy", "checkpoints", "reference", "base", "snapshots", "sft", "eval", "cache", "tensorboard", "wandb")


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity, seed, device, threads, logging.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Problems and rewards.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Rollout sampling.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised warm-start.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="RL optimisation.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Policy objective.")
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig, description="Advantage estimator.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out evaluation.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="Synchronous, one-step-off or asynchronous rollouts and training.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="Multi-turn episodes: limits and context policy.")
    selfplay: SelfPlayConfig = Field(default_factory=SelfPlayConfig, description="Two roles that make their own data: R-Zero (rzero) or RLT (rlt).")
    roles: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "Several policies in one run (self-play: a challenger and a solver, a teacher and a student), one per role: "
        "roles: {challenger: {...}, solver: {...}}. A role's mapping overrides the top-level policy sections "
        f"({', '.join(POLICY_SECTIONS)}) key by key for that role, and takes what it leaves out from them; "
        f"{', '.join(RUN_SECTIONS)} are the run's, set at the top level only. Each role is validated as a whole config "
        "and writes under <run>/<role>/. From the command line: roles.solver.train.lr=1e-5. A role name is an identifier, "
        "not policy. Empty = one policy, the run folder as always. Read by the self-play drivers (train refuses roles for now)."))

    _role_configs: dict[str, Config] = PrivateAttr(default_factory=dict)  # role -> its whole config (`role_config`)

    @model_validator(mode="before")
    @classmethod
    def _stale_data_objective(cls, raw: Any) -> Any:
        """With stale data (η ≥ 1) the default objective is decoupled PPO (AReaL 2505.24298)."""
        if isinstance(raw, dict) and (raw.get("roles", {}) is None or isinstance(raw.get("roles"), dict)):  # `roles:` / `solver:` left empty in YAML
            raw = {**raw, "roles": {k: {} if v is None else v for k, v in (raw.get("roles") or {}).items()}}
        if not isinstance(raw, dict) or not isinstance(raw.get("pipeline", {}), dict) or not isinstance(raw.get("loss", {}), dict):
            return raw  # field validation reports the problem
        pipeline = raw.get("pipeline", {})
        eta = pipeline.get("max_staleness")
        if eta is None:
            eta = MODE_DEFAULTS.get(pipeline.get("mode", "sync"), (0,))[0]
        if isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta > 0 and raw.get("loss", {}).get("name") is None:
            raw = {**raw, "loss": {**raw.get("loss", {}), "name": "decoupled_ppo"}}
        return raw

    @model_validator(mode="after")
    def _warn_stale_data_with_on_policy_loss(self, info: ValidationInfo) -> Config:
        """η ≥ 1 with a loss other than decoupled_ppo is allowed, with one warning line (a role's: only where its loss is its own)."""
        p, role = self.pipeline, (info.context or {}).get("role")
        if role is not None and self.loss.name == info.context["shared_loss"]:
            return self  # said once for the top-level sections
        if p.eta >= 1 and self.loss.name != "decoupled_ppo":
            LOG.warning(in_role(role,
                f"warning: pipeline.mode={p.mode} (η {p.eta}) with loss.name={self.loss.name}: tokens up to {p.eta_hard} "
                f"version{'s' if p.eta_hard != 1 else ''} old are trained with the sampling policy as π_old, so the trust region is centred on stale "
                "weights, not the current ones; loss.name=decoupled_ppo corrects for this"
            ))
        return self

    @model_validator(mode="after")
    def _fits_tiny_context(self) -> Config:
        positions = self.model.tiny.max_positions
        if self.model.path is None and self.sampling.max_new_tokens >= positions:
            raise ValueError(f"sampling.max_new_tokens={self.sampling.max_new_tokens} leaves no room for a prompt in the tiny model's model.tiny.max_positions={positions}; lower it or raise max_positions")
        return self

    @model_validator(mode="after")
    def _roles_are_whole_configs(self, info: ValidationInfo) -> Config:
        """Each role's sections (the top-level ones with its overrides) pass every check a whole config does;
        errors name roles.<role>.<section>.<field>. A role's mapping is kept as the values it sets, as validated."""
        if (info.context or {}).get("role") is not None or not self.roles:
            return self
        shared = self.model_dump(exclude={"roles"})
        kept = {}
        for role, override in self.roles.items():
            _check_role(role, override)
            try:
                whole = Config.model_validate(_overlay(Config, shared, override), context={"role": role, "shared_loss": self.loss.name})
            except ValidationError as err:
                raise ValueError(in_role(role, _describe(err.errors()[0]))) from None
            self._role_configs[role] = whole
            kept[role] = _pick(Config, whole.model_dump(), override)
        self.__dict__["roles"] = kept  # frozen: set once, here, as validated (so config.yaml holds 1e-05, not '1e-5')
        return self

    @model_validator(mode="after")
    def _roles_of_the_method(self, info: ValidationInfo) -> Config:
        """selfplay.method names the roles its run has: rzero challenger and solver; rlt teacher and student
        (roles without a method load, and `policyflow train` refuses them: `coordinator.train`)."""
        if (info.context or {}).get("role") is not None:
            return self
        method, roles = self.selfplay.method, set(self.roles)
        wanted = SELFPLAY_ROLES[method]
        if method != "none" and roles != set(wanted):
            raise ValueError(f"selfplay.method={method} runs the roles {' and '.join(wanted)}, each under roles (roles: {{{': {}, '.join(wanted)}: {{}}}} at least); got {', '.join(self.roles) or 'none'}")
        return self

    @model_serializer(mode="wrap")
    def _one_policy_has_no_roles(self, handler: Any) -> dict[str, Any]:
        """A one-policy config dumps as it always did (config.yaml, trackers, `policyflow config`): no `roles: {}`
        and no selfplay section while selfplay.method is none."""
        data = handler(self)
        if not self.roles and isinstance(data, dict):
            data.pop("roles", None)
            if self.selfplay.method == "none":
                data.pop("selfplay", None)
        return data

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def role_config(self, role: str) -> Config:
        """The whole config `role` trains with: the top-level sections with the role's overrides, and no roles."""
        if role not in self._role_configs:
            raise ConfigError(f"there is no role {role!r} in roles ({', '.join(self.roles) or 'none: a one-policy run'})")
        return self._role_configs[role]

    def policy_specs(self, run_dir: Path | str | None = None) -> list[PolicySpec]:
        """One `PolicySpec` per policy the run trains: "policy" (the run folder) without roles, else one per role
        (each under `<run_dir>/<role>/`), in the order the roles are written."""
        from policyflow.policy import PolicySpec  # policy.py imports this module

        return [PolicySpec.of(self, role, run_dir) for role in self.roles] if self.roles else [PolicySpec.of(self, run_dir=run_dir)]


def _check_role(role: str, override: dict[str, Any]) -> None:
    """A role name is an identifier other than the reserved ones; a role sets policy sections only."""
    if not (role.isidentifier() and role.isascii()):
        raise ValueError(f"roles.{role}: a role name is an identifier (letters, digits and _, not starting with a digit), e.g. solver; it names the role's folder <run>/<role>/")
    if role in RESERVED_ROLES:
        why = "the role of a one-policy run (no roles)" if role == "policy" else "a name the run folder uses for its own files"
        raise ValueError(f"roles.{role}: {role!r} is {why}; name the role otherwise (e.g. challenger, solver); reserved: {', '.join(RESERVED_ROLES)}")
    for key in override:
        if key in RUN_SECTIONS:
            raise ValueError(f"roles.{role}.{key}: {key} is the run's, shared by every role; set it at the top level ({key}.*), not under roles; a role sets only {', '.join(POLICY_SECTIONS)}")
        if key not in POLICY_SECTIONS:
            hint = difflib.get_close_matches(str(key), POLICY_SECTIONS, n=1)
            did_you_mean = f" (did you mean roles.{role}.{hint[0]}?)" if hint else ""
            raise ValueError(f"unknown config key roles.{role}.{key}{did_you_mean}; allowed keys here: {', '.join(POLICY_SECTIONS)}")


def _overlay(model: type[BaseModel], base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` laid over it key by key, down through the sections (a leaf, a dict-valued one such as task.options included, is replaced whole)."""
    merged = dict(base)
    for key, value in override.items():
        sub = _section_type(model, key)
        merged[key] = _overlay(sub, base[key], value) if sub and isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _pick(model: type[BaseModel], values: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The keys `override` sets, with their validated values from `values`."""
    picked = {}
    for key, value in override.items():
        sub = _section_type(model, key)
        picked[key] = _pick(sub, values[key], value) if sub and isinstance(value, dict) else values[key]
    return picked


def _section_type(model: type[BaseModel], key: Any) -> type[BaseModel] | None:
    annotation = getattr(model.model_fields.get(key), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


_POLICY_FIELD = re.compile(rf"(?<![\w.])(?=(?:{'|'.join(POLICY_SECTIONS)})(?:\.\w|=))")


def in_role(role: str | None, message: str) -> str:
    """A message about the policy sections, with each field named as the role's: train.lr → roles.solver.train.lr."""
    return message if role is None else _POLICY_FIELD.sub(f"roles.{role}.", message)


# ---------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML preset at `path`, then `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a dict; every way it cannot be read is a ConfigError naming the file."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"config file {str(file)!r} is a folder; give a YAML file (e.g. configs/demo.yaml)")
    if not file.is_file():
        presets = ", ".join(sorted(p.name for p in Path("configs").glob("*.yaml"))) or "none found in ./configs"
        raise ConfigError(f"config file {str(file)!r} not found (presets: {presets})")
    try:
        raw = file.read_bytes()
        data = load_yaml(raw.decode("utf-8")) or {}
    except OSError as err:
        raise ConfigError(f"config file {str(file)!r} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"config file {str(file)!r} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"config file {str(file)!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {_yaml_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(file)!r} is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line, with its line number."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else err.problem
    return str(err).splitlines()[0]


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in the nested dict `raw`; the value is parsed as YAML (so 3, 0.1, true, [a, b] work)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
    try:
        value = load_yaml(text) if text.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = text
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if child is None:  # absent, or left empty in YAML (`solver:`)
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def validate_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err.errors()[0])) from None


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
    field = ".".join(loc) or "config"
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        allowed = _field_names(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], allowed, n=1)
        did_you_mean = f" (did you mean {'.'.join(loc[:-1] + hint)}?)" if hint else ""
        return f"unknown config key {field}{did_you_mean}; allowed keys here: {', '.join(allowed)}"
    if kind == "literal_error":
        allowed = _literal_values(loc)
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{field}={shown(value)} is not allowed{did_you_mean}; allowed: {', '.join(allowed)}"
    if kind == "value_error":  # our own validators: their message already names the fields
        return str(error.get("ctx", {}).get("error", error["msg"]))
    if kind == "exact_type":  # Section._values_mean_what_they_say
        return f"{field}={error['ctx']['shown']} is not allowed: {error['msg']}"
    text = shown(value)
    text = text if len(text) <= 80 else text[:60] + "..."
    if kind == "string_type" and isinstance(value, (int, float)):
        read = "true/false (YAML 1.1 also reads yes, no, on, off so)" if isinstance(value, bool) else "a number"
        return f"{field}={text} is invalid: it takes text, and YAML read the value as {read}; quote it to mean text (in a file: {loc[-1]}: \"...\")"
    if kind == "tuple_type":
        return f"{field}={text} is invalid: it takes a list (e.g. {field}=[{text}])"
    return f"{field}={text} is invalid: {error['msg'].lower()}"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        info = model.model_fields.get(part)
        annotation = getattr(info, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _field_names(loc: list[str]) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _literal_values(loc: list[str]) -> list[str]:
    model = _model_at(loc[:-1])
    if model is None:
        return []
    annotation = model.model_fields[loc[-1]].annotation
    return [str(a) for a in getattr(annotation, "__args__", ())]


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per leaf field: `section.key (default): description` — used by `policyflow config`."""
    lines = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += describe_fields(annotation, f"{prefix}{name}.")
        else:
            default = info.get_default(call_default_factory=True)
            lines.append(f"{prefix}{name} ({default!r}): {info.description}")
    return lines
