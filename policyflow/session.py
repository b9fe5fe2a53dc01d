"""What one process needs to train or evaluate one policy, built from its `PolicySpec`: model, tokenizer, task, engine."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from policyflow.agent.context import context_policy
from policyflow.agent.episode import EpisodeRunner
from policyflow.checkpoint import is_checkpoint, verify_checkpoint
from policyflow.config import ConfigError
from policyflow.engine import AsyncEngine, SamplingParams
from policyflow.engine.generator import Generator
from policyflow.evaluate import EvalResult, Evaluation, accuracy, evaluate, full_evaluation, trivial_set
from policyflow.lora import is_adapter_folder, load_merged
from policyflow.model import ModelLoadError, load_tokenizer, build_char_tokenizer, build_tiny, check_model_folder, load_pretrained
from policyflow.policy import PolicySpec
from policyflow.tasks import configured_task
from policyflow.selfplay.jobs import job_task
from policyflow.tasks.base import Problem, Task
from policyflow.tasks.jsonl import RowFormat
from policyflow.tasks.length import PromptFit
from policyflow.tokens import render_prompt


def pick_device(spec: PolicySpec) -> torch.device:
    """run.device as a torch device; a ConfigError when it asks for a GPU torch cannot see."""
    if spec.device == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"run.device=cuda but torch sees no CUDA GPU (torch {torch.__version__}, {build}); use run.device=auto or run.device=cpu")
    use_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def load_policy(spec: PolicySpec, model_path: Path | str | None = None, *, master_weights: bool = False):
    """The policy model (from `model_path`, else model.path, else the tiny model) and its tokenizer, on the run's device.

    Parameters are in model.dtype, or in float32 with `master_weights` (the trainer's copy:
    fp32 master weights and optimizer state, compute in model.dtype under autocast). A LoRA
    checkpoint folder (peft's adapter files) loads as its base with the adapter merged in.
    """
    path = model_path or spec.model.path
    dtype, device = (torch.float32 if master_weights else getattr(torch, spec.model.dtype)), pick_device(spec)
    if path and is_checkpoint(Path(path)):
        verify_checkpoint(Path(path))
    if path:
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on stderr: errors and notes stay one line each
        model, tokenizer = load_merged(path, dtype=dtype) if is_adapter_folder(path) else load_pretrained(path, dtype=dtype)
    else:
        model, tokenizer = build_tiny(seed=spec.seed, **spec.model.tiny.model_dump())
        model = model.to(dtype)
    return model.to(device), tokenizer


def build_task(spec: PolicySpec, tokenizer=None, context: int | None = None) -> Task:
    """The policy's task (task.*: a registry entry or a user's class: `tasks.registry`), its
    prompts fitted to the model's context (task.on_long_prompt).

    `tokenizer` and `context` (the model's max positions) default to those of model.path or the tiny model.
    """
    task = job_task(configured_task(spec), spec)  # the task as the policy's job uses it (R-Zero's challenger writes its problems)
    if tokenizer is None:
        tokenizer, context = _tokenizer_and_context(spec)
    if context:
        task.limit_prompts(prompt_fit(spec, tokenizer, context, tools=task.prompt_tools()))
    return task


def prompt_fit(spec: PolicySpec, tokenizer, context: int, tools: list[dict] | None = None) -> PromptFit:
    """How the task's prompts are measured against `context` and cut (tasks/length.py): counted as
    RL renders them, with the task's `tools` (`Task.prompt_tools()`; `tokens.task_prompt_ids`)."""
    if context <= spec.sampling.max_new_tokens:
        raise ConfigError(f"sampling.max_new_tokens={spec.sampling.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens; lower it")

    def count(text: str) -> int:
        return len(render_prompt(tokenizer, text, spec.model.chat_template, tools=tools))

    def cut(text: str, n: int) -> str:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return text[offsets[n][0]:] if n < len(offsets) else ""

    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    return PromptFit(count, cut, context, spec.sampling.max_new_tokens, max(1, longest), spec.task.on_long_prompt, spec.agent.max_total_tokens)


def model_context(model_config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(getattr(model_config, name, None), int):
            return getattr(model_config, name)
    return None


def _tokenizer_and_context(spec: PolicySpec, model_path: Path | str | None = None):
    """The tokenizer and context length of `model_path`, else model.path (config only, no weights), else of the tiny model."""
    path = str(model_path or spec.model.path or "")
    if not path:
        return build_char_tokenizer(), spec.model.tiny.max_positions
    folder = check_model_folder(path, weights=False)  # only the tokenizer and config are read here
    try:
        tokenizer = load_tokenizer(folder)  # as `load_pretrained` loads it (the tiny char tokenizer keeps its spaces)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        return tokenizer, model_context(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the tokenizer or config in {path!r}: {err}") from err


def sampling_params(spec: PolicySpec, task: Task) -> SamplingParams:
    s = spec.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_new_tokens=s.max_new_tokens, stop=tuple(s.stop) + task.stop)


def episode_runner(spec: PolicySpec, engine: Generator, tokenizer, params: SamplingParams) -> EpisodeRunner:
    """The policy's episode runner (limits and context policy `agent.*`) over a generator (the local engine or an endpoint)."""
    return EpisodeRunner(engine, tokenizer, params, spec.agent, chat_template=spec.model.chat_template, context=context_policy(spec.agent.context))


@dataclass
class Session:
    """Everything one process needs to train or evaluate one policy: built once from its spec."""

    spec: PolicySpec
    model: torch.nn.Module
    tokenizer: object
    task: Task
    engine: AsyncEngine
    eval_problems: list[Problem]
    device: torch.device

    @property
    def params(self) -> SamplingParams:
        return sampling_params(self.spec, self.task)

    @property
    def runner(self) -> EpisodeRunner:
        """Episodes on this process's engine (evaluation: the same path as rollouts)."""
        return episode_runner(self.spec, self.engine, self.tokenizer, self.params)

    def evaluate(self) -> EvalResult:
        return evaluate(
            self.runner, self.task, self.eval_problems, temperature=self.spec.eval.temperature,
            seed=self.spec.seed, samples_per_prompt=self.spec.eval.samples_per_prompt,
        )

    def full_evaluation(self) -> Evaluation:
        """The full report's evaluation (`evaluate.full_evaluation`) of this process's model."""
        return configured_evaluation(self.spec, self.runner, self.task, self.eval_problems)

    def greedy_accuracy(self) -> float:
        """Greedy accuracy on the first `sft.eval_prompts` held-out problems (the SFT stopping rule)."""
        return accuracy(self.runner.with_params(temperature=0.0), self.task, self.eval_problems[: self.spec.sft.eval_prompts])[0]


def open_session(spec: PolicySpec, model_path: Path | str | None = None, *, master_weights: bool = False) -> Session:
    """Load (or build) the policy's model and task; `model_path` overrides model.path.

    `master_weights`: float32 parameters whatever model.dtype is (for training; see `load_policy`).
    """
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    model, tokenizer = load_policy(spec, model_path, master_weights=master_weights)
    task = build_task(spec, tokenizer, model_context(model.config))
    problems = list(task.eval_problems())[: spec.eval.num_prompts]
    return Session(spec, model, tokenizer, task, AsyncEngine(model, tokenizer), problems, pick_device(spec))


def configured_evaluation(spec: PolicySpec, runner: EpisodeRunner, task: Task, problems: list[Problem]) -> Evaluation:
    """`evaluate.full_evaluation` with the config's settings (eval.*, the run seed) and trivial set
    (eval.trivial_path, read in the jsonl task's row format, else the task's own)."""
    jsonl = spec.task.name == "jsonl"
    row_format = RowFormat(spec.task.prompt_column, spec.task.answer_column, spec.task.reward if jsonl else "exact")
    trivial, source = trivial_set(task, spec.eval.trivial_path, row_format)
    e = spec.eval
    return full_evaluation(
        runner, task, problems, temperature=e.temperature, seed=spec.seed, samples_per_prompt=e.samples_per_prompt,
        pass_k=e.pass_k, budgets=e.budgets, trivial=trivial, trivial_source=source,
    )


def open_endpoint(spec: PolicySpec, base_url: str, endpoint_model: str | None = None, model_path: Path | str | None = None) -> tuple[EpisodeRunner, Task, list[Problem], object]:
    """(runner, task, held-out problems, tokenizer) for evaluating the model behind an
    OpenAI-compatible endpoint (`engine.remote.RemoteGenerator`, base URL with /v1): the same
    episodes as a local model's, prompts sent as token ids of the tokenizer of `model_path`, else
    model.path, else the folder the endpoint names its model by when that folder exists here
    (`policyflow serve` names it so), so greedy results equal evaluating that folder here. With
    none of these a ConfigError: another tokenizer's ids would be the wrong prompt.
    The caller closes the runner's generator (`RemoteGenerator.close`)."""
    from policyflow.engine.remote import RemoteGenerator

    generator = RemoteGenerator(base_url, endpoint_model)
    path = model_path or spec.model.path
    if not path:
        if not Path(generator.model).is_dir():
            generator.close()
            raise ConfigError(f"--endpoint needs the served model's tokenizer: pass --model DIR (or model.path=DIR); {base_url} serves {generator.model!r}, which is no model folder here")
        path = generator.model
    tokenizer, context = _tokenizer_and_context(spec, path)
    task = build_task(spec, tokenizer, context)
    problems = list(task.eval_problems())[: spec.eval.num_prompts]
    if spec.agent.code_temperature is not None:  # an OpenAI endpoint has no per-segment sampling (GRPO-ATS)
        logging.getLogger("policyflow").warning("note: --endpoint samples code like the rest of the text (agent.code_temperature applies on a local engine only)")
        spec = replace(spec, agent=spec.agent.model_copy(update={"code_temperature": None}))
    runner = episode_runner(spec, generator, tokenizer, sampling_params(spec, task))
    return runner, task, problems, tokenizer
