"""What one process needs to train or evaluate, built from the config: model, tokenizer, task, engine."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from policyflow.config import Config
from policyflow.agent.context import context_policy
from policyflow.agent.episode import EpisodeRunner
from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.evaluate import EvalResult, accuracy, evaluate
from policyflow.lora import is_adapter_folder, load_merged
from policyflow.model import build_tiny, load_pretrained
from policyflow.tasks import make_task
from policyflow.tasks.base import Problem, Task


def pick_device(cfg: Config) -> torch.device:
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def load_policy(cfg: Config, model_path: Path | str | None = None, *, master_weights: bool = False):
    """The policy model (from `model_path`, else model.path, else the tiny model) and its tokenizer, on the run's device.

    Parameters are in model.dtype, or in float32 with `master_weights` (the trainer's copy:
    fp32 master weights and optimizer state, compute in model.dtype under autocast). A LoRA
    checkpoint folder (peft's adapter files) loads as its base with the adapter merged in.
    """
    path = model_path or cfg.model.path
    dtype = torch.float32 if master_weights else getattr(torch, cfg.model.dtype)
    if path and is_adapter_folder(path):
        model, tokenizer = load_merged(path, dtype=dtype)
    elif path:
        model, tokenizer = load_pretrained(path, dtype=dtype)
    else:
        model, tokenizer = build_tiny(seed=cfg.run.seed, **cfg.model.tiny.model_dump())
        model = model.to(dtype)
    return model.to(pick_device(cfg)), tokenizer


def build_task(cfg: Config) -> Task:
    t = cfg.task
    if t.name == "arithmetic":
        kwargs = dict(seed=t.seed, min_digits=t.min_digits, max_digits=t.max_digits, num_eval=t.num_eval)
    elif t.name == "countdown":
        kwargs = dict(seed=t.seed, num_eval=t.num_eval, num_numbers=t.num_numbers, max_number=t.max_number, max_target=t.max_target)
    elif t.name == "search_qa":
        search = t.search.model_dump()
        search["corpus_dir"] = search["corpus_dir"] or str(Path(cfg.run.output_dir) / "cache" / "search_qa")
        kwargs = dict(seed=t.seed, num_eval=t.num_eval, max_obs_chars=cfg.agent.max_obs_tokens, **search)
    else:
        kwargs = dict(
            path=t.path, prompt_column=t.prompt_column, answer_column=t.answer_column, reward=t.reward,
            eval_path=t.eval_path, eval_fraction=t.eval_fraction, seed=t.seed, on_bad_row=t.on_bad_row,
            reward_timeout_s=t.reward_timeout_s,
        )
    return make_task(t.name, **kwargs)


def sampling_params(cfg: Config, task: Task) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop=tuple(s.stop) + task.stop)


def episode_runner(cfg: Config, engine: AsyncEngine, tokenizer, params: SamplingParams) -> EpisodeRunner:
    """The episode runner the config describes (limits and context policy `agent.*`)."""
    return EpisodeRunner(engine, tokenizer, params, cfg.agent, chat_template=cfg.model.chat_template, context=context_policy(cfg.agent.context))


@dataclass
class Session:
    """Everything one process needs to train or evaluate: built once from the config."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    task: Task
    engine: AsyncEngine
    eval_problems: list[Problem]
    device: torch.device

    @property
    def params(self) -> SamplingParams:
        return sampling_params(self.cfg, self.task)

    @property
    def runner(self) -> EpisodeRunner:
        """Episodes on this process's engine (evaluation: the same path as rollouts)."""
        return episode_runner(self.cfg, self.engine, self.tokenizer, self.params)

    def evaluate(self) -> EvalResult:
        return evaluate(self.runner, self.task, self.eval_problems, temperature=self.cfg.eval.temperature, seed=self.cfg.run.seed)

    def greedy_accuracy(self) -> float:
        """Greedy accuracy on the first `sft.eval_prompts` held-out problems (the SFT stopping rule)."""
        return accuracy(self.runner.with_params(temperature=0.0), self.task, self.eval_problems[: self.cfg.sft.eval_prompts])[0]


def open_session(cfg: Config, model_path: Path | str | None = None, *, master_weights: bool = False) -> Session:
    """Load (or build) the model and task named by the config; `model_path` overrides model.path.

    `master_weights`: float32 parameters whatever model.dtype is (for training; see `load_policy`).
    """
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    model, tokenizer = load_policy(cfg, model_path, master_weights=master_weights)
    task = build_task(cfg)
    problems = list(task.eval_problems())[: cfg.eval.num_prompts]
    return Session(cfg, model, tokenizer, task, AsyncEngine(model, tokenizer), problems, pick_device(cfg))
