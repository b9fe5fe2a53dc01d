"""What one process needs to train or evaluate, built from the config: model, tokenizer, task, engine."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from policyflow.agent.context import context_policy
from policyflow.agent.episode import EpisodeRunner
from policyflow.checkpoint import is_checkpoint, verify_checkpoint
from policyflow.config import Config, ConfigError
from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.engine.generator import Generator
from policyflow.evaluate import EvalResult, Evaluation, accuracy, evaluate, full_evaluation, trivial_set
from policyflow.lora import is_adapter_folder, load_merged
from policyflow.model import ModelLoadError, load_tokenizer, build_char_tokenizer, build_tiny, check_model_folder, load_pretrained
from policyflow.tasks import configured_task
from policyflow.tasks.base import Problem, Task
from policyflow.tasks.jsonl import RowFormat
from policyflow.tasks.length import PromptFit
from policyflow.tokens import render_prompt


def pick_device(cfg: Config) -> torch.device:
    """run.device as a torch device; a ConfigError when it asks for a GPU torch cannot see."""
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"run.device=cuda but torch sees no CUDA GPU (torch {torch.__version__}, {build}); use run.device=auto or run.device=cpu")
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def load_policy(cfg: Config, model_path: Path | str | None = None, *, master_weights: bool = False):
    """The policy model (from `model_path`, else model.path, else the tiny model) and its tokenizer, on the run's device.

    Parameters are in model.dtype, or in float32 with `master_weights` (the trainer's copy:
    fp32 master weights and optimizer state, compute in model.dtype under autocast). A LoRA
    checkpoint folder (peft's adapter files) loads as its base with the adapter merged in.
    """
    path = model_path or cfg.model.path
    dtype, device = (torch.float32 if master_weights else getattr(torch, cfg.model.dtype)), pick_device(cfg)
    if path and is_checkpoint(Path(path)):
        verify_checkpoint(Path(path))
    if path:
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr: errors and notes stay one line each
        model, tokenizer = load_merged(path, dtype=dtype) if is_adapter_folder(path) else load_pretrained(path, dtype=dtype)
    else:
        model, tokenizer = build_tiny(seed=cfg.run.seed, **cfg.model.tiny.model_dump())
        model = model.to(dtype)
    return model.to(device), tokenizer


def build_task(cfg: Config, tokenizer=None, context: int | None = None) -> Task:
    """The task named by the config (a registry entry or a user's class: `tasks.registry`), its
    prompts fitted to the model's context (task.on_long_prompt).

    `tokenizer` and `context` (the model's max positions) default to those of model.path or the tiny model.
    """
    task = configured_task(cfg)
    if tokenizer is None:
        tokenizer, context = _tokenizer_and_context(cfg)
    if context:
        task.limit_prompts(prompt_fit(cfg, tokenizer, context, tools=task.prompt_tools()))
    return task


def prompt_fit(cfg: Config, tokenizer, context: int, tools: list[dict] | None = None) -> PromptFit:
    """How the task's prompts are measured against `context` and cut (tasks/length.py): counted as
    RL renders them, with the task's `tools` (`Task.prompt_tools()`; `tokens.task_prompt_ids`)."""
    if context <= cfg.sampling.max_new_tokens:
        raise ConfigError(f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens; lower it")

    def count(text: str) -> int:
        return len(render_prompt(tokenizer, text, cfg.model.chat_template, tools=tools))

    def cut(text: str, n: int) -> str:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[offsets[n][0]:] if n < len(offsets) else ""

    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    return PromptFit(count, cut, context, cfg.sampling.max_new_tokens, max(1, longest), cfg.task.on_long_prompt, cfg.agent.max_total_tokens)


def model_context(model_config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(getattr(model_config, name, None), int):
            return getattr(model_config, name)
    return None


def _tokenizer_and_context(cfg: Config, model_path: Path | str | None = None):
    """The tokenizer and context length of `model_path`, else model.path (config only, no weights), else of the tiny model."""
    path = str(model_path or cfg.model.path or "")
    if not path:
        return build_char_tokenizer(), cfg.model.tiny.max_positions
    folder = check_model_folder(path, weights=False)  # only the tokenizer and config are read here
    try:
        tokenizer = load_tokenizer(folder)  # as `load_pretrained` loads it (the tiny char tokenizer keeps its spaces)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        return tokenizer, model_context(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer or config in {path!r}: {err}") from err


def sampling_params(cfg: Config, task: Task) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop=tuple(s.stop) + task.stop)


def episode_runner(cfg: Config, engine: Generator, tokenizer, params: SamplingParams) -> EpisodeRunner:
    """The episode runner the config describes (limits and context policy `agent.*`) over a generator (the local engine or an endpoint)."""
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
        return evaluate(
            self.runner, self.task, self.eval_problems, temperature=self.cfg.eval.temperature,
            seed=self.cfg.run.seed, samples_per_prompt=self.cfg.eval.samples_per_prompt,
        )

    def full_evaluation(self) -> Evaluation:
        """The full report's evaluation (`evaluate.full_evaluation`) of this process's model."""
        return configured_evaluation(self.cfg, self.runner, self.task, self.eval_problems)

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
    task = build_task(cfg, tokenizer, model_context(model.config))
    problems = list(task.eval_problems())[: cfg.eval.num_prompts]
    return Session(cfg, model, tokenizer, task, AsyncEngine(model, tokenizer), problems, pick_device(cfg))


def configured_evaluation(cfg: Config, runner: EpisodeRunner, task: Task, problems: list[Problem]) -> Evaluation:
    """`evaluate.full_evaluation` with the config's settings (eval.*, the run seed) and trivial set
    (eval.trivial_path, read in the jsonl task's row format, else the task's own)."""
    jsonl = cfg.task.name == "jsonl"
    row_format = RowFormat(cfg.task.prompt_column, cfg.task.answer_column, cfg.task.reward if jsonl else "exact")
    trivial, source = trivial_set(task, cfg.eval.trivial_path, row_format)
    e = cfg.eval
    return full_evaluation(
        runner, task, problems, temperature=e.temperature, seed=cfg.run.seed, samples_per_prompt=e.samples_per_prompt,
        pass_k=e.pass_k, budgets=e.budgets, trivial=trivial, trivial_source=source,
    )


def open_endpoint(cfg: Config, base_url: str, endpoint_model: str | None = None, model_path: Path | str | None = None) -> tuple[EpisodeRunner, Task, list[Problem], object]:
    """(runner, task, held-out problems, tokenizer) for evaluating the model behind an
    OpenAI-compatible endpoint (`engine.remote.RemoteGenerator`, base URL with /v1): the same
    episodes as a local model's, prompts sent as token ids of the tokenizer of `model_path`, else
    model.path, else the tiny model's, so greedy results equal evaluating that folder here."""
    from policyflow.engine.remote import RemoteGenerator

    tokenizer, context = _tokenizer_and_context(cfg, model_path)
    task = build_task(cfg, tokenizer, context)
    problems = list(task.eval_problems())[: cfg.eval.num_prompts]
    if cfg.agent.code_temperature is not None:  # an OpenAI endpoint has no per-segment sampling (GRPO-ATS)
        logging.getLogger("policyflow").warning("note: --endpoint samples code like the rest of the text (agent.code_temperature applies on a local engine only)")
        cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"code_temperature": None})})
    runner = episode_runner(cfg, RemoteGenerator(base_url, endpoint_model), tokenizer, sampling_params(cfg, task))
    return runner, task, problems, tokenizer
