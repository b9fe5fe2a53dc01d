"""The driver: warm-start, then the RL loop — read it top to bottom.

    for each step:  sample G completions for B prompts  →  score  →  advantages
                    →  one trainer step (a new policy version)  →  log, evaluate, checkpoint
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from policyflow.advantages import ADVANTAGES
from policyflow.rewards import overlong_penalty
from policyflow.checkpoint import LoopState, latest_checkpoint, load_state, save_checkpoint, set_rng_state
from policyflow.config import Config
from policyflow.engine import Sampler, SamplingParams
from policyflow.evaluate import EvalResult, evaluate
from policyflow.logging import JsonlWriter, Progress, plot_run
from policyflow.model import build_tiny, load_pretrained, num_parameters
from policyflow.rollout import encode_prompts, rollout_groups
from policyflow.sft import warm_start
from policyflow.tasks import make_task
from policyflow.tasks.base import Problem, Task
from policyflow.threads import configure_threads
from policyflow.tokens import collate
from policyflow.trainer import Trainer
from policyflow.types import Group, TrainBatch


@dataclass
class Session:
    """Everything one process needs to train or evaluate: built once from the config."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    task: Task
    sampler: Sampler
    eval_problems: list[Problem]
    eval_prompt_ids: list[list[int]]
    device: torch.device

    @property
    def params(self) -> SamplingParams:
        s = self.cfg.sampling
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, stop=tuple(s.stop) + self.task.stop)

    def evaluate(self) -> EvalResult:
        return evaluate(
            self.sampler, self.task, self.eval_problems, self.eval_prompt_ids,
            max_new_tokens=self.cfg.sampling.max_new_tokens, temperature=self.cfg.eval.temperature,
            stop=self.params.stop, seed=self.cfg.run.seed,
        )


def open_session(cfg: Config, model_path: Path | str | None = None) -> Session:
    """Load (or build) the model and task named by the config; `model_path` overrides model.path."""
    configure_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    device = torch.device("cuda" if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = getattr(torch, cfg.model.dtype)
    path = model_path or cfg.model.path
    if path:
        model, tokenizer = load_pretrained(path, dtype=dtype)
    else:
        model, tokenizer = build_tiny(seed=cfg.run.seed, **cfg.model.tiny.model_dump())
        model = model.to(dtype)
    model = model.to(device)
    task = make_task(cfg.task.name, **_task_kwargs(cfg))
    problems = list(task.eval_problems())[: cfg.eval.num_prompts]
    prompt_ids = encode_prompts(tokenizer, task, problems, cfg.model.chat_template)
    sampler = Sampler(model, tokenizer)
    return Session(cfg, model, tokenizer, task, sampler, problems, prompt_ids, device)


def _task_kwargs(cfg: Config) -> dict:
    t = cfg.task
    if t.name == "arithmetic":
        return dict(seed=t.seed, min_digits=t.min_digits, max_digits=t.max_digits, num_eval=t.num_eval)
    if t.name == "countdown":
        return dict(seed=t.seed, num_eval=t.num_eval, num_numbers=t.num_numbers, max_number=t.max_number, max_target=t.max_target)
    return dict(
        path=t.path, prompt_column=t.prompt_column, answer_column=t.answer_column, reward=t.reward,
        eval_path=t.eval_path, eval_fraction=t.eval_fraction, seed=t.seed, on_bad_row=t.on_bad_row,
        reward_timeout_s=t.reward_timeout_s,
    )


def collect_groups(session: Session, loop: LoopState, generator: torch.Generator) -> tuple[list[Group], dict[str, float]]:
    """B groups of G scored samples on fresh problems.

    With `train.dynamic_sampling` (DAPO), groups whose rewards are all equal are replaced by
    sampling more prompts, for at most `train.max_resample_rounds` extra rounds.
    """
    cfg, task = session.cfg, session.task
    B, G = cfg.train.prompts_per_step, cfg.train.group_size
    groups: list[Group] = []
    start, errors, rounds = time.perf_counter(), 0, 0
    while True:
        need = B - len(groups)
        problems = [task.train_problem(loop.next_problem + i) for i in range(need)]
        loop.next_problem += need
        prompt_ids = encode_prompts(session.tokenizer, task, problems, cfg.model.chat_template)
        new, new_errors = rollout_groups(session.sampler, task, problems, prompt_ids, G, session.params, generator)
        errors += new_errors
        if cfg.train.overlong_cache_len is not None:
            shape_overlong(new, cfg.sampling.max_new_tokens, cfg.train.overlong_cache_len)
        if not cfg.train.dynamic_sampling:
            groups += new
            break
        groups += [g for g in new if max(g.rewards) > min(g.rewards)]
        if len(groups) >= B or rounds >= cfg.train.max_resample_rounds:
            groups = groups[:B]
            break
        rounds += 1
    metrics = rollout_metrics(groups, time.perf_counter() - start, errors)
    metrics["rollout/resample_rounds"] = float(rounds)
    return groups, metrics


def shape_overlong(groups: list[Group], max_len: int, cache_len: int) -> None:
    """Add DAPO's soft overlong penalty to each trajectory's reward (kept as reward part `overlong`)."""
    trajectories = [t for g in groups for t in g.trajectories]
    lengths_B = torch.tensor([t.num_gen_tokens for t in trajectories])
    for t, penalty in zip(trajectories, overlong_penalty(lengths_B, max_len, cache_len).tolist()):
        t.reward += penalty
        t.reward_parts["overlong"] = penalty


def build_batch(groups: list[Group], cfg: Config, pad_id: int) -> tuple[TrainBatch | None, dict[str, float]]:
    """Advantages per group, zero-variance groups left out (counted), padded into a TrainBatch."""
    stats = {"rollout/groups_zero_variance": 0.0}
    if cfg.train.skip_zero_variance:
        kept = [g for g in groups if max(g.rewards) > min(g.rewards)]
        stats["rollout/groups_zero_variance"] = float(len(groups) - len(kept))
        groups = kept
    if not groups:
        return None, stats
    trajectories = [t for g in groups for t in g.trajectories]
    rewards_B = torch.tensor([t.reward for t in trajectories], dtype=torch.float64)
    group_ids_B = torch.tensor([i for i, g in enumerate(groups) for _ in g.trajectories])
    lengths_B = torch.tensor([t.num_gen_tokens for t in trajectories], dtype=torch.float64)
    a = cfg.advantage
    hyper = {"k": a.gfpo_k, "metric": a.gfpo_metric} if a.name == "gfpo" else {}
    advantages_B, keep_B = ADVANTAGES[a.name](rewards_B, group_ids_B, lengths_B, **hyper)
    trainable = [not (cfg.train.mask_truncated and t.status == "truncated") for t in trajectories]
    stats["rollout/gfpo_kept_fraction"] = float(keep_B.float().mean())
    return collate(trajectories, advantages_B, group_ids_B, pad_id, trainable_B=trainable), stats


def rollout_metrics(groups: list[Group], seconds: float, reward_errors: int) -> dict[str, float]:
    trajectories = [t for g in groups for t in g.trajectories]
    tokens = sum(t.num_gen_tokens for t in trajectories)
    n = max(1, len(trajectories))
    return {
        "rollout/reward_mean": sum(t.reward for t in trajectories) / n,
        "rollout/correct_mean": sum(t.reward_parts.get("correct", 0.0) for t in trajectories) / n,
        "rollout/response_tokens_mean": tokens / n,
        "rollout/truncated_fraction": sum(t.status == "truncated" for t in trajectories) / n,
        "rollout/reward_errors": float(reward_errors),
        "perf/rollout_tokens_per_s": tokens / max(seconds, 1e-9),
        "perf/rollout_seconds": seconds,
    }


def train(cfg: Config, *, resume: Path | None = None, log=print) -> dict:
    """Warm-start (fresh runs), then RL for `train.steps` steps; returns the summary written to summary.json."""
    run_dir = Path(resume) if resume else cfg.run_dir
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume {str(run_dir)!r}: no checkpoint under {run_dir / 'checkpoints'}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:  # a fresh run starts fresh logs (a resumed one appends)
        for name in ("metrics.jsonl", "samples.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    session = open_session(cfg, model_path=checkpoint)
    model, tokenizer, task = session.model, session.tokenizer, session.task
    generator = torch.Generator().manual_seed(cfg.run.seed)
    metrics_log, samples_log = JsonlWriter(run_dir / "metrics.jsonl"), JsonlWriter(run_dir / "samples.jsonl")
    log(f"model: {num_parameters(model):,} parameters on {session.device}; task: {task.name}; run folder: {run_dir}")

    if checkpoint is None:
        loop = LoopState()
        if cfg.sft.max_steps > 0:
            bar = Progress(cfg.sft.max_steps, 0, cfg.run.progress, desc="sft")

            def on_sft_step(step: int, loss: float) -> None:
                bar.update({"sft/loss": loss})
                if step % 10 == 0:
                    metrics_log.write({"sft_step": step, "sft/loss": loss})

            sft = warm_start(
                model, tokenizer, task, cfg.sft, chat_template=cfg.model.chat_template,
                greedy_accuracy=lambda: _greedy_check(session), on_step=on_sft_step,
            )
            bar.close()
            log(f"SFT warm-start: {sft.steps} steps, {sft.seconds:.0f}s, greedy held-out accuracy {sft.accuracy_greedy:.1%}")
        loop.eval_before = asdict(session.evaluate())
        metrics_log.write({"step": 0, "wall_seconds": 0.0, **EvalResult(**loop.eval_before).as_metrics()})
        log(_accuracy_line("before RL", loop.eval_before))
        trainer = Trainer(model, cfg.train, cfg.loss, temperature=cfg.sampling.temperature, max_len=cfg.sampling.max_new_tokens)
    else:
        state = load_state(checkpoint)
        loop = state["loop"]
        trainer = Trainer(model, cfg.train, cfg.loss, temperature=cfg.sampling.temperature, max_len=cfg.sampling.max_new_tokens, version=loop.version)
        trainer.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        log(f"resumed from {checkpoint} at step {loop.step}")

    progress = Progress(cfg.train.steps, loop.step, cfg.run.progress)
    wall_start = time.perf_counter() - loop.wall_seconds
    budget = cfg.train.time_budget_s or float("inf")
    while loop.step < cfg.train.steps and time.perf_counter() - wall_start < budget:
        # 1. Rollouts: G samples for each of B fresh prompts, tagged with the current version.
        session.sampler.set_weights(None, trainer.version)  # the sampler shares the module: weights are already in place
        groups, metrics = collect_groups(session, loop, generator)
        # 2. Advantages and the batch; 3. one policy-version update.
        batch, batch_stats = build_batch(groups, cfg, tokenizer.pad_token_id)
        metrics |= batch_stats
        if batch is not None:
            metrics |= trainer.step(batch.to(session.device))
        else:
            trainer.version += 1  # nothing to learn from: the version still advances so steps and versions agree
        loop.step, loop.version = loop.step + 1, trainer.version
        loop.consumed_task_ids += [g.task_id for g in groups]
        # 4. Bookkeeping: eval, logs, samples, checkpoints.
        if cfg.eval.every and loop.step % cfg.eval.every == 0 and loop.step < cfg.train.steps:
            metrics |= session.evaluate().as_metrics()
        loop.wall_seconds = time.perf_counter() - wall_start
        if loop.step % cfg.run.log_every == 0 or loop.step == cfg.train.steps:
            metrics_log.write({"step": loop.step, "wall_seconds": loop.wall_seconds, **metrics})
        if loop.step % cfg.run.samples_every == 0:
            _write_samples(samples_log, loop.step, groups)
        if cfg.checkpoint.every and loop.step % cfg.checkpoint.every == 0 and loop.step < cfg.train.steps:
            save_checkpoint(run_dir, model, tokenizer, trainer.optimizer, loop, generator, cfg.checkpoint.keep_last)
        progress.update(metrics)
    progress.close()

    eval_after = session.evaluate()
    loop.wall_seconds = time.perf_counter() - wall_start
    metrics_log.write({"step": loop.step, "wall_seconds": loop.wall_seconds, **eval_after.as_metrics()})
    final = save_checkpoint(run_dir, model, tokenizer, trainer.optimizer, loop, generator, cfg.checkpoint.keep_last)
    plot = plot_run(run_dir / "metrics.jsonl", run_dir / "plot.png")
    summary = {
        "eval_before": loop.eval_before,
        "eval_after": asdict(eval_after),
        "wall_seconds": loop.wall_seconds,
        "final_checkpoint": str(final),
        "steps": loop.step,
        "plot": str(plot) if plot else None,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(_accuracy_line("after RL ", summary["eval_after"]))
    log(f"plot: {plot}\nsummary: {run_dir / 'summary.json'}\ncheckpoint: {final}")
    return summary


def _greedy_check(session: Session) -> float:
    """Greedy accuracy on the first `sft.eval_prompts` held-out problems (the SFT stopping rule)."""
    from policyflow.evaluate import accuracy

    n = session.cfg.sft.eval_prompts
    params = SamplingParams(temperature=0.0, max_new_tokens=session.cfg.sampling.max_new_tokens, stop=session.params.stop)
    return accuracy(session.sampler, session.task, session.eval_problems[:n], session.eval_prompt_ids[:n], params)[0]


def _accuracy_line(label: str, result: dict) -> str:
    return f"held-out accuracy {label}: greedy {result['accuracy_greedy']:.1%}, sampled {result['accuracy_sampled']:.1%}"


def _write_samples(writer: JsonlWriter, step: int, groups: list[Group], per_step: int = 4) -> None:
    for g in groups[:per_step]:
        for t in g.trajectories[:2]:
            writer.write({"step": step, "prompt": g.prompt, "answer": g.answer, "completion": t.completion_text, "reward": t.reward, "finish_reason": t.finish_reason})


def run_sft(cfg: Config, log=print) -> Path:
    """Warm-start only; the model is saved in Hugging Face format to runs/<name>/sft."""
    from policyflow.model import save_pretrained

    session = open_session(cfg)
    result = warm_start(
        session.model, session.tokenizer, session.task, cfg.sft, chat_template=cfg.model.chat_template,
        greedy_accuracy=lambda: _greedy_check(session),
    )
    folder = save_pretrained(session.model, session.tokenizer, cfg.run_dir / "sft")
    log(f"SFT: {result.steps} steps, loss {result.final_loss:.3f}, greedy held-out accuracy {result.accuracy_greedy:.1%}; saved to {folder}")
    return folder


def run_eval(cfg: Config, model_path: Path | None = None) -> dict:
    session = open_session(cfg, model_path=model_path)
    return asdict(session.evaluate())
