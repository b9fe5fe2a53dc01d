"""The sections of the configuration (`config.Config` holds one of each): run, model, task,
sampling, sft, train, loss, advantage, pipeline, eval, checkpoint, agent. Every field has its
default and its description here; `config.py` loads, overrides and validates the whole.
"""

from __future__ import annotations

import difflib
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from policyflow.losses import POLICY_LOSSES, allowed_hyper
from policyflow.yamlfile import exact_value


LOG = logging.getLogger("policyflow")
TRACKERS = ("jsonl", "tensorboard", "wandb")  # run.trackers: where metrics go (policyflow/trackers.py)


class ConfigError(ValueError):
    """A configuration mistake, phrased for the user in one line."""


class Section(BaseModel):
    """A config section. Values mean what they say: pydantic's lax conversions that change a value's
    kind are refused (`yamlfile.exact_value`); allow_inf_nan=False: every float field refuses inf and nan."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _values_mean_what_they_say(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        return exact_value(field.annotation, value, field.default)


class RunConfig(Section):
    name: str = Field("demo", description="Run name; outputs go to <output_dir>/<name>/.")
    output_dir: str = Field("runs", description="Folder holding one sub-folder per run.")
    seed: int = Field(0, description="Seed for model init, data order, sampling and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto picks cuda when available.")
    threads: int = Field(0, ge=0, description="torch intra-op threads per process; 0 = the CPU cores this process may use divided by the number of worker processes.")
    log_every: int = Field(1, ge=1, description="Append a metrics line every N RL steps.")
    samples_every: int = Field(10, ge=1, description="Every N RL steps, append whole episodes to samples.jsonl (docs/trackers.md: token ids, loss masks, behaviour log-probs, versions, advantage, reward parts): every episode of the step's first 4 groups in issue order (whole groups, so advantages compare within a group; the cap keeps the file near 4·G episodes per written step).")
    progress: bool = Field(True, description="Show a live progress bar on stderr.")
    overwrite: bool = Field(False, description="Let a fresh run start in a folder that already holds a run, deleting that run's metrics, samples, checkpoints, snapshots and summary first (otherwise refused: resume it with --resume, or choose another run.name).")
    trackers: tuple[str, ...] = Field(("jsonl",), description="Where metrics go, each line to every one under the same names (docs/trackers.md): jsonl (<run>/metrics.jsonl), tensorboard (event files in <run>/tensorboard/), wandb (pip install 'policyflow[wandb]'; WANDB_MODE=offline needs no network). Without jsonl no metrics.jsonl or plot.png is written.")

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in TRACKERS]
        if unknown or not names or len(set(names)) < len(names):
            why = f"{unknown[0]!r} is not a tracker" if unknown else "it is empty" if not names else "a tracker is named twice"
            raise ValueError(f"run.trackers={list(names)} is not allowed: {why}; allowed: {', '.join(TRACKERS)} (a list of one or more)")
        return names


class TinyModelConfig(Section):
    hidden_size: int = Field(128, ge=8, le=16384, description="Hidden width of the tiny Qwen2-style model.")
    num_layers: int = Field(4, ge=1, le=256, description="Decoder layers.")
    intermediate_size: int = Field(512, ge=8, le=65536, description="MLP width.")
    num_heads: int = Field(4, ge=1, le=256, description="Attention heads; must divide hidden_size, with an even head size (hidden_size / num_heads) for rotary embeddings.")
    num_kv_heads: int = Field(2, ge=1, le=256, description="Key/value heads (grouped-query attention); must divide num_heads.")
    max_positions: int = Field(256, ge=16, le=1_048_576, description="Longest sequence (prompt + completion).")
    init_std: float = Field(0.02, gt=0, le=1.0, description="Standard deviation of the initial weights and embeddings (Hugging Face's initializer_range); the search demo uses 0.1 (docs/benchmarks.md 'Search demo').")

    @model_validator(mode="after")
    def _check(self) -> TinyModelConfig:
        h, n, kv = self.hidden_size, self.num_heads, self.num_kv_heads
        if h % n:
            divisors = [d for d in range(1, min(h, 256) + 1) if h % d == 0 and (h // d) % 2 == 0]
            raise ValueError(f"model.tiny.num_heads={n} does not divide model.tiny.hidden_size={h}; use one of {divisors}")
        if (h // n) % 2:
            raise ValueError(f"model.tiny.hidden_size={h} / num_heads={n} gives head size {h // n}, which rotary embeddings cannot use (it must be even); change num_heads or hidden_size")
        if n % kv:
            raise ValueError(f"model.tiny.num_kv_heads={kv} does not divide model.tiny.num_heads={n}; use one of {[d for d in range(1, n + 1) if n % d == 0]}")
        return self


class LoRAConfig(Section):
    """A LoRA adapter (built with peft) for RL: only the adapter is trained; engines get merged weights."""

    rank: int = Field(0, ge=0, description="LoRA rank r; 0 = off (full fine-tuning). With r > 0 RL trains only the adapter, on the weights RL starts from (after any SFT warm-start, which trains the full model).")
    alpha: float = Field(16.0, gt=0, description="LoRA scale: the weight update is (alpha / rank)·B·A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training; > 0 makes the trainer's log-probs differ from the engine's (on-policy ratio ≠ 1), so RL usually keeps 0.")
    target_modules: tuple[str, ...] = Field(("all-linear",), description="Linear layers to adapt (peft target_modules, e.g. [q_proj, v_proj]); all-linear = every linear layer but the output head.")
    lr_multiplier: float = Field(4.0, gt=0, le=1000, description="With rank > 0 RL trains the adapter at train.lr × lr_multiplier (LoRA wants a higher lr than full fine-tuning). 4 was best on the demo for 3 seeds, of 1, 4, 10 and 20 (docs/benchmarks.md 'LoRA'); 1 = train.lr as it is.")

    @model_validator(mode="after")
    def _check(self) -> LoRAConfig:
        if not self.target_modules or ("all-linear" in self.target_modules and len(self.target_modules) > 1):
            raise ValueError(f"model.lora.target_modules={list(self.target_modules)!r}: give [all-linear] alone or a non-empty list of module names (e.g. [q_proj, v_proj])")
        return self


class ModelConfig(Section):
    path: str | None = Field(None, description="Local Hugging Face model folder (with config.json); empty = build the tiny model.")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Sizes of the tiny model built when path is empty.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    chat_template: bool = Field(False, description="Render prompts with the tokenizer's chat template (instruct checkpoints).")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA adapter for RL (rank 0 = off).")


class SearchQAConfig(Section):
    """task.name=search_qa: made-up places answered with a local BM25 search tool (tasks/search_qa.py)."""

    num_entities: int = Field(200, ge=3, description="Places in the synthetic corpus (one passage each).")
    num_eval_entities: int = Field(40, ge=2, description="Places only held-out questions ask about (never in training questions).")
    two_hop_fraction: float = Field(0.5, ge=0, le=1, description="Share of questions needing two lookups (the sum of two populations); the rest need one.")
    max_value: int = Field(99, ge=10, description="Largest population.")
    corpus_dir: str | None = Field(None, description="Folder for the JSONL corpus and its BM25 index; empty = <run.output_dir>/cache/search_qa.")
    tool_format: Literal["tags", "hermes"] = Field("tags", description="tags: <search>…</search> / <answer>…</answer> (tiny models); hermes: <tool_call>{json}</tool_call> with the chat template's tools=.")
    top_k: int = Field(1, ge=1, description="Passages returned per search.")
    demo_search_fraction: float = Field(1.0, ge=0, le=1, description="Share of SFT demonstrations that search; the rest answer at once without searching (a guess; a warm-start that has not learnt to search every time, for RL to discover that searching pays).")
    search_penalty: float = Field(0.1, ge=0, le=1, description="MMSearch-R1 β: a correct answer reached with search earns 1 − β instead of 1.")
    format_weight: float = Field(0.1, ge=0, description="Reward added when every turn of an episode was one well-formed action.")
    search_latency_s: float = Field(0.0, ge=0, description="Injected latency per search (benchmarks of tool waits).")
    tool_timeout_s: float = Field(10.0, gt=0, description="A search running longer becomes an error observation.")
    tool_concurrency: int = Field(16, ge=1, description="Searches in flight at once per process.")
    code_tool: bool = Field(False, description="Add the sandboxed code tool (<code>…</code>; settings task.code.timeout_s, memory_mb, packages, isolation, concurrency): two-lookup demonstrations search A, search B, run print(A+B) and answer with the printed sum; search_penalty still counts searches only (issue 18 §4).")

    @model_validator(mode="after")
    def _check(self) -> SearchQAConfig:
        if self.num_eval_entities >= self.num_entities:
            raise ValueError(f"task.search.num_eval_entities={self.num_eval_entities} leaves no place for training questions in task.search.num_entities={self.num_entities}; keep it below num_entities")
        if self.search_latency_s >= self.tool_timeout_s:
            raise ValueError(f"task.search.search_latency_s={self.search_latency_s} is not below task.search.tool_timeout_s={self.tool_timeout_s}: every search would time out; lower the latency or raise the timeout")
        return self


class CodeConfig(Section):
    """The code tool (`<code>…</code>` / a `python` tool call, run in the sandbox; tools/python_tool.py), task.name=multiply, and reward=code_tests."""

    tool_format: Literal["tags", "hermes"] = Field("tags", description="tags: <code>…</code> / <answer>…</answer> (tiny models); hermes: a python tool call <tool_call>{json}</tool_call> with the chat template's tools=.")
    timeout_s: float = Field(5.0, gt=0, le=600, description="Wall-clock seconds of one sandboxed run (a code call, or one completion's hidden tests under reward=code_tests), sandbox start included; past it the run is killed and counts as an error.")
    memory_mb: int = Field(512, ge=32, description="Address space per sandboxed process, MiB.")
    packages: tuple[str, ...] = Field((), description="Importable packages mounted read-only into the sandbox (e.g. [numpy, sympy]); the standard library is always there.")
    isolation: Literal["namespaces", "none"] = Field("namespaces", description="namespaces: the isolated sandbox (README 'Sandbox'); none: a plain subprocess with the same limits and no isolation (warned once per process).")
    stateful: bool = Field(False, description="One interpreter per episode as the model sees it: each call replays the episode's earlier successful cells (output discarded) before the new one, so variables survive; earlier side effects (random draws, files) happen again.")
    concurrency: int = Field(16, ge=1, description="Code runs in flight at once per process.")
    demo_code_fraction: float = Field(1.0, ge=0, le=1, description="multiply: share of SFT demonstrations that run code; the rest answer at once (a guess), so RL has a choice to learn.")
    code_penalty: float = Field(0.0, ge=0, le=1, description="multiply: a correct answer reached with code earns 1 − code_penalty (MMSearch-R1's tool penalty).")
    format_weight: float = Field(0.1, ge=0, description="multiply: reward added when every turn of an episode was one well-formed action.")


class TaskConfig(Section):
    name: str = Field("arithmetic", description="Which task supplies prompts and rewards: a registered task (policyflow.tasks.TASKS; a wrong name lists them) or a Task class of yours as package.module:Class, importable (installed or on PYTHONPATH) and built as Class(**task.options) (docs/guide.md 'Tasks and your own data', examples/my_task.py).")
    seed: int = Field(0, description="Seed of the synthetic problem generator and of the jsonl held-out split.")
    num_eval: int = Field(200, ge=1, description="Held-out problems (synthetic tasks).")
    min_digits: int = Field(1, ge=1, le=9, description="arithmetic: fewest digits per operand.")
    max_digits: int = Field(3, ge=1, le=9, description="arithmetic: most digits per operand.")
    num_numbers: int = Field(3, ge=2, description="countdown: numbers given per problem.")
    max_number: int = Field(20, ge=1, description="countdown: largest given number.")
    max_target: int = Field(100, ge=1, description="countdown: largest target.")
    path: str | None = Field(None, description="jsonl: training file with prompt/answer columns.")
    eval_path: str | None = Field(None, description="jsonl: held-out file; empty = split eval_fraction off the training file.")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="jsonl: held-out fraction when eval_path is empty.")
    prompt_column: str = Field("prompt", description="jsonl: the prompt column.")
    answer_column: str = Field("answer", description="jsonl: the reference answer column.")
    reward: str = Field("exact", description="jsonl: 'exact', 'numeric', 'code_tests' (the completion's code run in the sandbox against the row's hidden tests, column 'tests': a list of assert statements or a test source; reward = fraction passed; sandbox settings in task.code), or an import path 'module:function' called as TRL calls one, fn(prompts=..., completions=..., **columns) -> list[float | None] (None scores 0.0); with model.chat_template=true in TRL's conversational form, so e.g. trl.rewards:accuracy_reward runs unchanged.")
    on_bad_row: Literal["skip", "error"] = Field("error", description="jsonl: what a malformed row does (reported with its line number either way).")
    reward_timeout_s: float = Field(10.0, gt=0, description="Seconds a reward function may take per batch before its samples are counted as errors.")
    search: SearchQAConfig = Field(default_factory=SearchQAConfig, description="search_qa: corpus, tool and reward settings.")
    code: CodeConfig = Field(default_factory=CodeConfig, description="The code tool and sandbox (multiply; jsonl with reward=code_tests: timeout_s, memory_mb, packages, isolation).")
    on_long_prompt: Literal["error", "truncate", "skip"] = Field("error", description="A prompt longer than the model's context minus sampling.max_new_tokens (checked when the task loads): error = refuse naming the row; truncate = keep its last tokens (left truncation); skip = drop the row (jsonl; generated tasks always refuse).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the task's constructor beyond its task.* settings: all of a user task's (task.name=package.module:Class is built as Class(**options)), or a registered task's others (e.g. {format_reward: 0.1} for countdown). YAML mapping, e.g. task.options={max_value: 50}.")

    @field_validator("name")
    @classmethod
    def _registered_or_user_class(cls, name: str) -> str:
        """A name in the task registry, or an import path package.module:Class (loaded with the task)."""
        from policyflow.tasks.registry import TASKS, USER_TASK  # imported here: the registry imports every task module

        if name in TASKS or USER_TASK.fullmatch(name):
            return name
        hint = difflib.get_close_matches(name, list(TASKS), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"task.name={name!r} is not allowed{did_you_mean}; allowed: {', '.join(TASKS)}, or a Task class of yours as package.module:Class (e.g. my_task:CalculatorTask with examples/ on PYTHONPATH)")

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.min_digits > self.max_digits:
            raise ValueError(f"task.min_digits={self.min_digits} exceeds task.max_digits={self.max_digits}")
        if self.name == "jsonl" and not self.path:
            raise ValueError("task.path is required when task.name=jsonl (a local .jsonl file with prompt/answer columns)")
        if self.prompt_column == self.answer_column:
            raise ValueError(f"task.prompt_column and task.answer_column are both {self.prompt_column!r}: the reference answer would be the prompt itself; name two different columns")
        return self


class SamplingConfig(Section):
    temperature: float = Field(1.0, ge=0, le=10, description="Sampling temperature for RL rollouts, > 0 (greedy tokens carry no policy gradient: see agent.code_temperature; greedy evaluation is eval's); at most 10: hotter is uniform noise.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass for RL rollouts (the trainer recomputes the same truncated, renormalised log-probs).")
    top_k: int = Field(0, ge=0, description="Sample only from the k most probable tokens, before top_p (0 = off); the trainer recomputes the same log-probs.")
    max_new_tokens: int = Field(8, ge=1, le=1_048_576, description="Longest completion; longer ones are truncated (finish reason 'length').")
    stop: tuple[str, ...] = Field((), description="Extra stop strings (the task may add its own).")

    @field_validator("temperature")
    @classmethod
    def _sampled(cls, value: float) -> float:
        if value == 0:
            raise ValueError("sampling.temperature=0: RL rollouts at temperature 0 are greedy, and greedy tokens carry no policy gradient (they are left out of the loss), so RL would learn nothing; use a temperature > 0 (greedy evaluation: eval.temperature is separate; greedy code only: agent.code_temperature=0)")
        return value


class SFTConfig(Section):
    max_steps: int = Field(600, ge=0, description="Most supervised warm-start steps.")
    batch_size: int = Field(64, ge=1, le=1_000_000, description="Problems per SFT step.")
    lr: float = Field(3e-3, gt=0, le=1, description="Peak AdamW learning rate for SFT.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warmup steps; then cosine decay to 10% of lr at max_steps.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay for SFT.")
    target_accuracy: float = Field(0.3, ge=0, le=1, description="Stop SFT once greedy held-out accuracy reaches this.")
    eval_every: int = Field(25, ge=1, description="Check held-out accuracy every N SFT steps.")
    eval_prompts: int = Field(100, ge=1, description="Held-out problems used for the SFT stopping check.")


class TrainConfig(Section):
    steps: int = Field(60, ge=0, le=1_000_000_000, description="RL steps (optimizer steps on fresh rollouts).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop RL once this many wall-clock seconds have passed (checked after each step); empty = no limit.")
    prompts_per_step: int = Field(32, ge=1, le=1_000_000, description="Prompts (groups) per RL step: B.")
    group_size: int = Field(8, ge=1, le=65536, description="Samples per prompt: G.")
    epochs: int = Field(1, ge=1, description="Optimisation passes over each batch (PPO's mu).")
    minibatches: int = Field(1, ge=1, description="Optimizer steps per epoch (the batch split evenly).")
    lr: float = Field(2.5e-4, gt=0, le=1, description="AdamW learning rate for RL (2.5e-4 suits the tiny model: 5e-4 and above lose accuracy, see docs/benchmarks.md 'Learning per step'; real checkpoints want ~1e-6).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field((0.9, 0.99), description="AdamW betas, each in [0, 1).")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    skip_zero_variance: bool = Field(True, description="Leave out groups whose rewards are all equal (within advantages.ZERO_VARIANCE_TOL: no learning signal); they are counted.")
    mask_truncated: bool = Field(False, description="DAPO: truncated episodes (a single-turn completion cut at max_new_tokens, or an episode stopped by agent.max_turns or agent.max_total_tokens; an agent's turn cut at max_new_tokens is judged by its env) are left out of the loss and of their group's baseline (mean, std).")
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling: replace groups that are all correct or all wrong (the task's `correct` verdict, not the shaped reward) by sampling more prompts until the batch is full.")
    max_resample_rounds: int = Field(3, ge=0, description="dynamic_sampling: at most this many times B rejected groups are replaced per batch (then rejected groups leave holes and the batch trains on fewer groups).")
    overlong_cache_len: int | None = Field(None, ge=0, description="DAPO soft overlong punishment: the last N tokens before max_new_tokens ramp the reward down to -1; empty = off.")
    kl_coef: float = Field(0.0, ge=0, description="Weight of the KL penalty to a frozen reference model (0 = no reference model).")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator.")


class LossConfig(Section):
    name: Literal["grpo", "dapo", "dr_grpo", "gspo", "gspo_token", "gmpo", "decoupled_ppo"] = Field(
        "grpo", description="Policy objective (see policyflow.losses.POLICY_LOSSES)."
    )
    clip_low: float | None = Field(None, ge=0, description="Lower clip range; empty = the loss's paper default.")
    clip_high: float | None = Field(None, ge=0, description="Upper clip range; empty = the loss's paper default.")
    behav_weight_cap: float | None = Field(None, gt=0, description="decoupled_ppo: drop tokens whose behaviour weight exceeds this.")

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        allowed = allowed_hyper(self.name)
        for key, value in self.model_dump(exclude={"name"}).items():
            if value is not None and key not in allowed:
                takers = [k for k in POLICY_LOSSES if key in allowed_hyper(k)]
                raise ValueError(f"loss.{key}={value!r} does not apply to loss.name={self.name!r}; it is used by: {', '.join(takers)}")
        return self

    def hyper(self) -> dict[str, float]:
        """The hyperparameters the chosen loss takes, defaults filled in."""
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


class AdvantageConfig(Section):
    name: Literal["grpo", "dr_grpo", "rloo", "gfpo"] = Field("grpo", description="Advantage estimator.")
    gfpo_k: int = Field(4, ge=1, description="gfpo: responses kept per group.")
    gfpo_metric: Literal["length", "token_efficiency"] = Field("length", description="gfpo: how kept responses are chosen.")


MODE_DEFAULTS: dict[str, tuple[int, str]] = {"sync": (0, "drain"), "one_step_off": (1, "drain"), "async": (2, "continue")}


class PipelineConfig(Section):
    """How rollouts and training overlap (DESIGN.md §4): one pipeline, three modes by configuration."""

    mode: Literal["sync", "one_step_off", "async"] = Field("sync", description="sync: sample a batch, then train on it (η 0, drain); one_step_off: sample batch v+1 while training on v (η 1, drain); async: generate continuously (η ≥ 1, continue).")
    runtime: Literal["inline", "process"] = Field("inline", description="inline: everything in this process on one asyncio loop; process: the trainer and each rollout worker in its own OS process, weights through safetensors files.")
    rollout_workers: int = Field(1, ge=1, description="Rollout workers (sampling engines).")
    max_staleness: int | None = Field(None, ge=0, description="η: a group may start only while accepted + running ≤ (η + v + 1)·B; empty = the mode's value (sync 0, one_step_off 1, async 2).")
    hard_staleness: int | None = Field(None, ge=0, description="η_hard: groups holding a token older than v − η_hard are dropped (counted as waste) when a batch is formed; empty = η + max_lag with drain swaps (so no trained token is older than η + max_lag, however many workers), η + max_lag + 1 otherwise.")
    swap: Literal["continue", "drain", "abort"] | None = Field(None, description="How engines take new weights: continue (in-flight sequences go on), drain (finish admitted groups first), abort (restart in-flight sequences from their partial output); empty = the mode's (drain for sync and one_step_off, continue for async).")
    max_lag: int = Field(0, ge=0, description="Engines load new weights only when they are more than this many versions behind (0 = after every step; ECHO's lazy updates otherwise).")
    engine_slots: int = Field(256, ge=1, description="Sequences a rollout engine decodes at once (continuous batching).")
    max_worker_restarts: int = Field(3, ge=0, description="Dead rollout workers replaced per run before the run fails.")

    @property
    def eta(self) -> int:
        return MODE_DEFAULTS[self.mode][0] if self.max_staleness is None else self.max_staleness

    @property
    def eta_hard(self) -> int:
        if self.hard_staleness is not None:
            return self.hard_staleness
        return self.eta + self.max_lag + (0 if self.swap_mode == "drain" else 1)

    @property
    def swap_mode(self) -> str:
        return self.swap or MODE_DEFAULTS[self.mode][1]

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        eta, mode = self.eta, self.mode
        if mode == "sync" and (eta != 0 or self.swap_mode != "drain" or self.max_lag != 0):
            raise ValueError(f"pipeline.mode=sync means η 0, drain and max_lag 0 (got max_staleness={eta}, swap={self.swap_mode}, max_lag={self.max_lag}); use pipeline.mode=one_step_off or async for overlap")
        if mode == "one_step_off" and (eta != 1 or self.swap_mode != "drain"):
            raise ValueError(f"pipeline.mode=one_step_off means η 1 and drain (got max_staleness={eta}, swap={self.swap_mode}); use pipeline.mode=async for other settings")
        if mode == "async" and eta < 1:
            raise ValueError("pipeline.mode=async needs pipeline.max_staleness ≥ 1; η 0 is pipeline.mode=sync")
        if self.eta_hard < eta:
            raise ValueError(f"pipeline.hard_staleness={self.eta_hard} is below max_staleness={eta}: groups admitted within the budget would be dropped; set it ≥ {eta}")
        if self.eta_hard < self.max_lag:
            raise ValueError(f"pipeline.hard_staleness={self.eta_hard} is below pipeline.max_lag={self.max_lag}: an engine that lags max_lag versions would only produce tokens the cutoff drops, and the run would stall; set it ≥ {self.max_lag}")
        return self


class EvalConfig(Section):
    num_prompts: int = Field(200, ge=1, description="Held-out problems evaluated before and after training.")
    temperature: float = Field(1.0, gt=0, le=10, description="Temperature of the sampled-accuracy evaluation.")
    every: int = Field(20, ge=0, description="Evaluate during RL every N steps (0 = only before and after).")
    samples_per_prompt: int = Field(1, ge=1, le=1024, description="Samples per held-out problem at eval.temperature: n. With n > 1, eval/pass@k (unbiased, Chen et al. 2107.03374) is reported for k = 2, 4, ... and n; eval/accuracy_sampled is the mean over all samples (pass@1).")
    report: bool = Field(False, description="policyflow train: after RL also write the full evaluation report of the final model (pass@k, avg@n, maj@k with standard errors, accuracy against eval.budgets, tokens per correct and wrong answer, the trivial set, episodes.jsonl) to runs/<name>/eval/<NNN>-<time>/, as policyflow eval always does; off keeps the timed demos as fast as they are.")
    pass_k: tuple[Annotated[int, Field(ge=1)], ...] = Field((), description="Full report: the k of pass@k and maj@k, each at most eval.samples_per_prompt; empty = 1, 2, 4, ... below n, and n.")
    budgets: tuple[Annotated[int, Field(ge=1)], ...] = Field((), description="Full report: token budgets (generated tokens per episode, all turns together) at which the held-out problems are evaluated again greedily (evaluate/budget.py: the method); empty = powers of two below the longest greedy episode, and that length.")
    trivial_path: str | None = Field(None, description="Full report: a .jsonl file of trivial problems, one {\"prompt\": \"1+1=\", \"answer\": \"2\"} per line (jsonl tasks: in task.prompt_column/answer_column), evaluated like the held-out set to measure over-thinking; empty = the task's own trivial set (jsonl tasks have none).")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if too_big := [k for k in self.pass_k if k > self.samples_per_prompt]:
            raise ValueError(f"eval.pass_k={list(self.pass_k)} asks for k={too_big[0]} but eval.samples_per_prompt={self.samples_per_prompt}; raise eval.samples_per_prompt to at least {max(too_big)} or drop it")
        return self


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Save a checkpoint every N RL steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept on disk.")


class AgentConfig(Section):
    """Episodes (DESIGN.md §6): how long one may run and what each engine call sees."""

    max_turns: int = Field(8, ge=1, description="Most engine calls (model turns) per episode; an episode still going after them ends 'truncated' with the reward it earned.")
    max_total_tokens: int | None = Field(None, ge=2, description="Most tokens one engine call may see and write (its context + its completion), so also the longest training row; a call's max_new_tokens is cut to fit, and an episode with no room left ends 'truncated'; empty = no cap beyond sampling.max_new_tokens per call.")
    max_obs_tokens: int = Field(256, ge=1, description="Content tokens kept of each observation (each tool result), counted with the model's tokenizer; the episode runner cuts every env's observations, and SFT demonstrations the same way. The wrapper around it (the task's observation_wrap, e.g. <info>...</info>, or the chat template's tool-role markers) is added whole on top and does not count.")
    context: Literal["full", "mem1"] = Field("full", description="What each call sees: full (the whole history) or mem1 (the prompt, the latest turn with its <state>, the latest observation).")
    code_temperature: float | None = Field(0.0, ge=0, le=10, description="GRPO-ATS (Thyme): the temperature of code, the text between code_open and code_close (top_p and top_k as sampling's); 0 = greedy, as in the paper: greedy tokens are left out of the loss (they carry no policy gradient) and stay as context; > 0: sampled and trained under that temperature; empty = off (code is sampled like the text).")
    code_open: str = Field("<code>", min_length=1, description="The text that opens a code segment (code_temperature applies from the next token); e.g. '\"name\": \"python\"' for a Hermes python tool call.")
    code_close: str = Field("</code>", min_length=1, description="The text that closes a code segment (its tokens are still code; sampling.temperature applies from the next token); e.g. </tool_call> for a Hermes tool call.")

    @model_validator(mode="after")
    def _check(self) -> AgentConfig:
        if self.code_open == self.code_close:
            raise ValueError(f"agent.code_open and agent.code_close are both {self.code_open!r}: one marker cannot say where code starts and where it ends; give two different markers (e.g. <code> and </code>)")
        return self


class SelfPlayConfig(Section):
    """Runs with two roles that make their own data (issue 20; `policyflow/selfplay/`): which method
    drives them, and its settings. The run's, like pipeline: set at the top level, never under roles."""

    method: Literal["none", "rzero", "rlt"] = Field("none", description="none: a one-policy run (no roles); rzero: R-Zero challenger/solver self-play (arXiv 2508.05004; roles challenger and solver); rlt: RLT teacher rewards (arXiv 2506.08388; roles teacher and student). A run with roles needs one of rzero or rlt.")
    iterations: int = Field(3, ge=1, le=1000, description="rzero: challenger phase + solver phase, alternated this many times.")
    challenger_steps: int = Field(5, ge=1, description="rzero: GRPO steps of the challenger per iteration (the paper's 5).")
    solver_steps: int = Field(15, ge=1, description="rzero: GRPO steps of the solver per iteration (the paper's 15).")
    questions: int = Field(8000, ge=1, description="rzero: problems the challenger writes per iteration for the solver's training set, before the band filter (the paper's 8000).")
    votes: int = Field(10, ge=2, description="rzero: m, the frozen solver's answers per problem; their majority is the pseudo-label and p̂ the share that agrees with it (the paper's 10).")
    band: float = Field(0.2, ge=0, le=0.5, description="rzero: δ, a problem joins the solver's set when |p̂ − ½| ≤ δ (0.2 keeps 3..7 agreeing answers of 10, the paper's band).")
    repetition_distance: float = Field(0.5, gt=0, le=1, description="rzero: problems of one challenger group closer than this in 1 − BLEU (sacrebleu sentence BLEU / 100) fall in one cluster for the repetition penalty.")
    repetition_weight: float = Field(1.0, ge=0, description="rzero: λ of the repetition penalty λ·|C|/n, |C| the size of the problem's cluster among the n problems of its group.")
    rlt_kl_coef: float = Field(3.0, ge=0, description="rlt: λ in r = r_SS − λ·r_KL (3: the authors' released recipe, SakanaAI/RLT cfgs/run_cfg/teacher_rlt.yaml).")
    rlt_alpha: float = Field(0.01, ge=0, description="rlt: α, the weight of the min (r_SS) and max (r_KL) terms beside the means (0.01: the same recipe).")
    rlt_student_temperature: float = Field(0.7, gt=0, description="rlt: the temperature of the frozen student's distribution in both reward terms (the authors' released recipe reads it at 0.7); the teacher's is its sampling.temperature.")
    rlt_distill_problems: int = Field(2000, ge=1, description="rlt: training problems the trained teacher explains once; fresh students are fine-tuned on them, with its explanations or with the bare solutions, for the comparison.")
    rlt_distill_steps: int = Field(400, ge=1, description="rlt: supervised steps of each fresh student in the comparison (the student's sft.batch_size, lr, warmup and weight decay; no early stop), the same for every arm.")
