"""Supervised warm-start: cross-entropy on the reference answer tokens only (for multi-turn
demonstrations, `Task.sft_turns`, on the model's turns and not on the tool results between them).

RL from a random-init model gets no reward signal, so the demo first teaches the answer format
and some skill by SFT, stopping as soon as greedy held-out accuracy reaches a target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from policyflow.agent.context import full_context
from policyflow.agent.env import ContextPolicy
from policyflow.config import SFTConfig
from policyflow.losses import sft_loss
from policyflow.rollout import encode_prompts
from policyflow.tasks.base import Task
from policyflow.tokens import episode_rows, render_observation, sft_batch
from policyflow.trainer import compute_precision, make_optimizer, sequence_logprobs
from policyflow.types import Call, Segment, Trajectory

# SFT draws training problems from its own index range so the RL stage starts on fresh ones.
SFT_PROBLEM_OFFSET = 10_000_000


@dataclass(frozen=True)
class SFTResult:
    steps: int
    final_loss: float
    accuracy_greedy: float
    seconds: float


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine down to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def demonstration_rows(
    tokenizer, prompt_ids: list[int], turns: list[tuple[str, str]], chat_template: bool, context: ContextPolicy = full_context,
    max_obs_tokens: int | None = None, observation_wrap: tuple[str, str] = ("", ""), stop: Sequence[str] = (),
) -> list[tuple[list[int], list[int]]]:
    """The training rows (token ids, loss mask) of a demonstration, as RL would train them.

    The turns become the segments the episode runner would have made (each turn tokenized on
    its own: gen turns as text, obs turns (unwrapped, as an env returns them) with
    `render_observation`, their content cut to `max_obs_tokens` (`agent.max_obs_tokens`) and
    wrapped in `observation_wrap` (the task's `Task.observation_wrap`, which its envs hand the
    runner) exactly as the runner does), each gen turn a `Call` whose context is
    `context(segments before it)`, and `tokens.episode_rows` cuts them into rows: one row
    under `full`, one per call under `mem1`.

    How a gen turn ends follows generation: a turn whose text ends with one of `stop` (the
    task's stop strings: `</search>` in the tag format) ended on it, so the observation after it
    comes as after a stopped turn (chat models: the template's end token first); any other turn
    ended with EOS (a Hermes tool call: its turn ends at the end-of-turn token), which is part
    of the turn and trained. EOS always closes the final turn.
    Only gen tokens are trained (mask 1), each exactly once.
    """
    segments = [Segment("prompt", tuple(prompt_ids))]
    calls: list[Call] = []
    ended = True  # whether the last gen turn ended with EOS (else on a stop string)
    for k, (kind, text) in enumerate(turns):
        if kind == "gen":
            ended = k == len(turns) - 1 or not any(text.endswith(s) for s in stop if s)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id] * ended
            calls.append(Call(context=tuple(context(segments)), produced=len(segments)))
            segments.append(Segment("gen", tuple(ids), (0.0,) * len(ids), (0,) * len(ids), turn=k, text=text))
        elif kind == "obs":
            ids, kept = render_observation(tokenizer, text, chat_template, max_obs_tokens, wrap=observation_wrap, turn_ended=ended)
            segments.append(Segment("obs", tuple(ids), turn=k, text=kept))
        else:
            raise ValueError(f"a demonstration turn is 'gen' or 'obs', got {kind!r}")
    demo = Trajectory(id="sft", task_id="sft", segments=segments, calls=calls)
    return [(ids, mask) for ids, mask, _, _ in episode_rows(demo)]


def warm_start(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    cfg: SFTConfig,
    *,
    chat_template: bool,
    greedy_accuracy: Callable[[], float],
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    on_eval: Callable[[int, float], None] = lambda step, accuracy: None,
    compute_dtype: torch.dtype = torch.float32,
    context: ContextPolicy = full_context,
    max_obs_tokens: int | None = None,
) -> SFTResult:
    """Train until `greedy_accuracy()` (checked every `cfg.eval_every` steps) reaches the target.

    Forward passes run in `compute_dtype` (autocast) over the model's own (fp32 master) weights.
    `context` is the run's context policy (`agent.context`): multi-turn demonstrations are cut
    into the rows RL would train (`demonstration_rows`), so under mem1 each turn is learnt
    from the pruned context it will see, and observations are cut to `max_obs_tokens`
    (`agent.max_obs_tokens`) and wrapped in `task.observation_wrap` as in RL. Prompts are
    rendered as RL renders them, the task's tools included (`rollout.encode_prompts`), and
    turns end as generation ends them (`task.stop`; `demonstration_rows`)."""
    start = time.perf_counter()
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, (0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.max_steps))
    loss_value, acc, step = float("nan"), greedy_accuracy(), 0
    on_eval(0, acc)
    while step < cfg.max_steps and acc < cfg.target_accuracy:
        first = SFT_PROBLEM_OFFSET + step * cfg.batch_size
        problems = [task.sft_problem(first + i) for i in range(cfg.batch_size)]
        prompts = encode_prompts(tokenizer, task, problems, chat_template)
        rows = [row for p, ids in zip(problems, prompts) for row in demonstration_rows(
            tokenizer, ids, task.sft_turns(p), chat_template, context, max_obs_tokens, task.observation_wrap, task.stop,
        )]
        input_ids, attention, loss_mask = sft_batch([[]] * len(rows), [ids for ids, _ in rows], tokenizer.pad_token_id)
        for b, (_, mask) in enumerate(rows):
            loss_mask[b, : len(mask)] = torch.tensor(mask, dtype=loss_mask.dtype)
        model.train()
        with compute_precision(next(model.parameters()).device, compute_dtype):
            logprobs = sequence_logprobs(model, input_ids, attention)
        out = sft_loss(logprobs, loss_mask)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        loss_value = float(out.loss.detach())
        on_step(step, loss_value)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            acc = greedy_accuracy()
            on_eval(step, acc)
    return SFTResult(step, loss_value, acc, time.perf_counter() - start)
