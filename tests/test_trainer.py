"""The trainer on real rollouts: what it recomputes agrees with what the engine recorded, the KL
reference is the model RL starts from, bf16 keeps fp32 master weights, and bad steps never reach
the weights."""

import dataclasses

import pytest
import torch

from policyflow.rollout import build_batch, encode_prompts, rollout_groups
from policyflow.session import open_session
from policyflow.trainer import Trainer


def one_batch(cfg, session=None, seed: int = 0):
    """Rollouts of the first B training problems by the session's sampler, as a TrainBatch."""
    session = session or open_session(cfg)
    problems = [session.task.train_problem(i) for i in range(cfg.train.prompts_per_step)]
    prompts = encode_prompts(session.tokenizer, session.task, problems, False)
    groups, _ = rollout_groups(session.sampler, session.task, problems, prompts, cfg.train.group_size, session.params, torch.Generator().manual_seed(seed))
    batch, _ = build_batch(groups, cfg, session.tokenizer.pad_token_id)
    assert batch is not None
    return session, batch


def make_trainer(session, cfg) -> Trainer:
    return Trainer(session.model, cfg.train, cfg.loss, temperature=cfg.sampling.temperature, max_len=cfg.sampling.max_new_tokens)


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --------------------------------------------------------------------------------------------
# A bad step never reaches the weights


def test_nan_gradient_raises_before_the_step_and_leaves_weights_unchanged(small_config) -> None:
    cfg = small_config()
    session, batch = one_batch(cfg)
    trainer = make_trainer(session, cfg)
    before = snapshot(session.model)
    first = next(session.model.parameters())
    first.register_hook(lambda grad: torch.full_like(grad, float("nan")))  # finite loss, NaN gradient
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .* weights were not updated"):
        trainer.step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, session.model.parameters()))
    assert trainer.optimizer.state == {} and trainer.version == 0


def test_nan_loss_raises_before_backward(small_config) -> None:
    cfg = small_config()
    session, batch = one_batch(cfg)
    trainer = make_trainer(session, cfg)
    before = snapshot(session.model)
    advantages_B = batch.advantages_B.clone()
    advantages_B[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.step(dataclasses.replace(batch, advantages_B=advantages_B))
    assert all(torch.equal(a, b) for a, b in zip(before, session.model.parameters()))
