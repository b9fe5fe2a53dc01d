"""One policy's settings: what its trainer, rollout workers, pool and batch builder serve (DESIGN.md §5).

A run trains one or more policies, each under a role name. A component serves one of them:
it takes a `PolicySpec`, never the whole `Config`, and writes only under the policy's own
folder. A one-policy run is the one-role case (role "policy"), whose folder is the run folder
itself, so its layout is `runs/<name>/checkpoints/step-N` as it always was; any other role
writes under `runs/<name>/<role>/` (self-play: a challenger and a solver, a teacher and a
student). What belongs to the run, not to a policy (the pipeline, the snapshot store,
checkpoint cadence, the metrics files and `summary.json`), stays with the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policyflow.config import Config, ConfigError
from policyflow.config_sections import (
    AdvantageConfig,
    AgentConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    SFTConfig,
    SamplingConfig,
    SelfPlayConfig,
    TaskConfig,
    TrainConfig,
)

ONE_ROLE = "policy"  # the role of a one-policy run, whose folder is the run folder


@dataclass(frozen=True)
class PolicySpec:
    """Everything one policy needs: its sections of the config, where it runs, and its folder.

    A plain frozen record of frozen config sections: it pickles, so it crosses the process
    runtime's boundary as the component's constructor argument."""

    role: str  # the policy's name in the run ("policy" for a one-policy run; "challenger", "solver", ...)
    folder: Path  # what it writes (checkpoints/, reference/, base/): runs/<name>/, or runs/<name>/<role>/
    model: ModelConfig
    task: TaskConfig  # its problems and rewards: a challenger writes problems, the solver answers them
    sampling: SamplingConfig
    sft: SFTConfig
    train: TrainConfig
    loss: LossConfig
    advantage: AdvantageConfig
    eval: EvalConfig
    agent: AgentConfig
    seed: int
    device: str  # run.device: auto, cpu or cuda (`session.pick_device`)
    threads: int  # run.threads (0: the process's share of the cores)
    progress: bool  # show progress bars
    cache_dir: Path  # caches shared by every run under run.output_dir (the search corpus index)
    selfplay: SelfPlayConfig  # the run's self-play settings, which a job reads (the challenger's votes, RLT's λ)
    job: str = "solve"  # what the policy does with its task (`selfplay.jobs.JOBS`): solve it, or write its problems, or explain its solutions

    @classmethod
    def of(cls, cfg: Config, role: str = ONE_ROLE, run_dir: Path | str | None = None) -> PolicySpec:
        """The spec of `role` in the run of `cfg`, whose folder is `run_dir` (default `cfg.run_dir`,
        the folder a resumed run is in now): the run folder itself for the one-role case, else
        its sub-folder `<role>/`. A config with `roles` gives each role its own sections
        (`Config.role_config`) and has no one-role policy: `of(cfg)` is refused in one line, so the
        one-policy commands (train, sft, eval) refuse a run with roles before they write anything."""
        run_dir = Path(run_dir) if run_dir is not None else cfg.run_dir
        if cfg.roles and role == ONE_ROLE:
            raise ConfigError(
                f"this config has roles ({', '.join(cfg.roles)}), which only `policyflow train` runs (selfplay.method); "
                "sft and eval serve one policy: remove roles (its settings go at the top level), or evaluate a role's checkpoint with --model"
            )
        sections = cfg.role_config(role) if cfg.roles else cfg  # run-level settings (seed, device, ...) are the same in both
        return cls(
            role=role, folder=run_dir if role == ONE_ROLE else run_dir / role,
            model=sections.model, task=sections.task, sampling=sections.sampling, sft=sections.sft, train=sections.train,
            loss=sections.loss, advantage=sections.advantage, eval=sections.eval, agent=sections.agent,
            seed=cfg.run.seed, device=cfg.run.device, threads=cfg.run.threads, progress=cfg.run.progress,
            cache_dir=Path(cfg.run.output_dir) / "cache", selfplay=cfg.selfplay,
        )
