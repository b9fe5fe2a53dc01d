"""The trainer on real rollouts: what it recomputes agrees with what the engine recorded, the KL
reference is the model RL starts from, bf16 keeps fp32 master weights, and bad steps never reach
the weights."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from policyflow import coordinator
from policyflow.checkpoint import latest_checkpoint
from policyflow.losses import POLICY_LOSSES
from policyflow.ops import policy_log_distribution, policy_logprobs
from policyflow.rollout import build_batch, rollout_groups
from policyflow.session import open_session
from policyflow.sft import warm_start
from policyflow.trainer import Trainer, sequence_logprobs
from policyflow.weights import SnapshotStore
from policyflow.workers import TrainerWorker
from policyflow.policy import PolicySpec


def one_batch(cfg, session=None, seed: int = 0):
    """Rollouts of the first B training problems by the session's engine, as a TrainBatch."""
    session = session or open_session(PolicySpec.of(cfg))
    problems = [session.task.train_problem(i) for i in range(cfg.train.prompts_per_step)]
    groups, _ = rollout_groups(session.runner, session.task, problems, cfg.train.group_size, torch.Generator().manual_seed(seed))
    batch, _ = build_batch(groups, cfg.train, cfg.advantage, session.tokenizer.pad_token_id)
    assert batch is not None
    return session, batch


def make_trainer(session, cfg) -> Trainer:
    return Trainer(session.model, cfg.train, cfg.loss, cfg.sampling)


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
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .* update was not applied"):
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


# --------------------------------------------------------------------------------------------
# Sampler and trainer share one definition of the policy (temperature, top_p, top_k)

POLICIES = {
    "T0.8-top_p0.7": ["sampling.temperature=0.8", "sampling.top_p=0.7"],
    "T1.2-top_k5-top_p0.9": ["sampling.temperature=1.2", "sampling.top_k=5", "sampling.top_p=0.9"],
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_trainer_logprobs_equal_the_engines_behaviour_logprobs(small_config, policy: str) -> None:
    cfg = small_config(*POLICIES[policy])
    session, batch = one_batch(cfg)
    mask = batch.loss_mask_BT.bool()
    with torch.no_grad():
        recomputed_BT = sequence_logprobs(session.model, batch.input_ids_BT, batch.attention_mask_BT, cfg.sampling)
        untruncated_BT = sequence_logprobs(session.model, batch.input_ids_BT, batch.attention_mask_BT,
                                           cfg.sampling.model_copy(update={"top_p": 1.0, "top_k": 0}))
    assert int(mask.sum()) > 30
    error = (recomputed_BT - batch.behav_logprobs_BT)[mask].abs()
    print(f"fp32 {policy}: max {error.max():.2e}, mean {error.mean():.2e}")
    assert error.max() < 1e-4
    # the truncation matters: the full tempered distribution would not be the behaviour policy
    assert (untruncated_BT - batch.behav_logprobs_BT)[mask].abs().max() > 0.05


@pytest.mark.parametrize("loss", ["grpo", "gspo", "decoupled_ppo"])
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_first_on_policy_step_has_ratio_one_and_nothing_clipped(small_config, policy: str, loss: str) -> None:
    cfg = small_config(*POLICIES[policy], f"loss.name={loss}")
    session, batch = one_batch(cfg)
    out = make_trainer(session, cfg).step(batch)
    assert out["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert out["loss/ratio_min"] == pytest.approx(1.0, abs=1e-4) and out["loss/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert out["loss/clip_frac"] == 0.0


def test_a_token_outside_the_current_nucleus_gets_a_finite_floor() -> None:
    """After the weights move, a sampled token may leave the nucleus: its log-prob is renormalised
    over the nucleus plus itself (finite, differentiable) instead of −inf."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)).requires_grad_(True)
    inside = policy_logprobs(logits, torch.tensor([1]), 1.0, 0.7)
    outside = policy_logprobs(logits, torch.tensor([3]), 1.0, 0.7)
    assert inside.item() == pytest.approx(math.log(0.3 / 0.8))
    assert outside.item() == pytest.approx(math.log(0.05 / 0.85))
    (grad,) = torch.autograd.grad(outside.sum(), logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, torch.tensor([[-0.5 / 0.85, -0.3 / 0.85, 0.0, 1 - 0.05 / 0.85]], dtype=torch.float64))
    # the distribution the engine samples from has no room for it
    assert policy_log_distribution(logits, 1.0, 0.7)[0, 3].item() == float("-inf")


# --------------------------------------------------------------------------------------------
# The KL reference is the model RL starts from, and stays that one across a resume


def _rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines() if "loss/total" in line]


def _post_sft_weights(cfg) -> dict[str, torch.Tensor]:
    session = open_session(PolicySpec.of(cfg))
    warm_start(session.model, session.tokenizer, session.task, cfg.sft, chat_template=False, greedy_accuracy=session.greedy_accuracy)
    return {k: v.clone() for k, v in session.model.state_dict().items()}


def test_trainer_refuses_kl_without_a_reference(small_config) -> None:
    cfg = small_config("train.kl_coef=0.1")
    session, batch = one_batch(cfg)
    with pytest.raises(RuntimeError, match="set_reference"):
        make_trainer(session, cfg).step(batch)


def test_kl_reference_is_the_model_after_sft_and_survives_resume(small_config) -> None:
    kl = ["train.kl_coef=0.1", "eval.every=0", "sft.max_steps=4", "sft.lr=1e-2", "sft.warmup_steps=1"]
    straight = small_config("run.name=straight", "train.steps=3", *kl)
    coordinator.train(straight, log=lambda *_: None)
    stopped = small_config("run.name=stopped", "train.steps=2", *kl)
    coordinator.train(stopped, log=lambda *_: None)
    resumed = small_config("run.name=stopped", "train.steps=3", *kl)
    coordinator.train(resumed, resume=stopped.run_dir, log=lambda *_: None)
    first, *_, third = _rows(straight)
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-6)  # on-policy, and the reference is the post-SFT model
    assert third["loss/kl"] > 1e-6
    assert _rows(resumed)[-1]["loss/kl"] == pytest.approx(third["loss/kl"], rel=1e-5, abs=1e-9)

    post_sft = _post_sft_weights(stopped)
    checkpoint = latest_checkpoint(stopped.run_dir)
    worker = TrainerWorker(PolicySpec.of(resumed), SnapshotStore(2), checkpoint=str(checkpoint))
    worker.restore(str(checkpoint))
    reference = worker.trainer.ref_model.state_dict()
    policy = worker.session.model.state_dict()
    assert reference.keys() == post_sft.keys()
    for name, value in post_sft.items():
        torch.testing.assert_close(reference[name], value, rtol=0, atol=1e-6)
    assert any(not torch.equal(reference[name], policy[name]) for name in policy)  # not the checkpoint


def test_resume_without_the_stored_reference_refuses(small_config) -> None:
    cfg = small_config("train.kl_coef=0.1", "eval.every=0", "train.steps=1")
    coordinator.train(cfg, log=lambda *_: None)
    shutil.rmtree(cfg.run_dir / "reference")
    checkpoint = str(latest_checkpoint(cfg.run_dir))
    with pytest.raises(FileNotFoundError, match="KL reference"):
        TrainerWorker(PolicySpec.of(cfg), SnapshotStore(2), checkpoint=checkpoint).restore(checkpoint)


# --------------------------------------------------------------------------------------------
# Precision: bf16 models keep fp32 master weights and fp32 AdamW state, compute in bf16


def test_bf16_model_keeps_fp32_master_weights_and_a_tiny_lr_step_changes_them(small_config) -> None:
    cfg = small_config("model.dtype=bfloat16", "train.lr=1e-6")
    worker = TrainerWorker(PolicySpec.of(cfg), SnapshotStore(2))
    model = worker.session.model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    engine_session = open_session(PolicySpec.of(cfg))  # what a rollout worker holds: the model in bf16
    assert {p.dtype for p in engine_session.model.parameters()} == {torch.bfloat16}
    _, batch = one_batch(cfg, engine_session)
    before = snapshot(model)
    big = [b for b in before if b.abs().min() > 1e-2]  # in bf16 (spacing ≥ 6e-5 here) a 1e-6 step rounds away
    assert big and all(torch.equal((b + 1e-6).bfloat16(), b.bfloat16()) for b in big)
    out = worker.trainer.step(batch)
    changed = sum(int((a != b).sum()) for a, b in zip(model.parameters(), before))
    assert changed > 0.5 * sum(b.numel() for b in before)
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(model.parameters(), before)) < 1e-5  # lr-sized steps
    states = [s for s in worker.trainer.optimizer.state.values()]
    assert states and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in states)
    # the forward ran in bf16 (autocast): the trainer's log-probs match the bf16 engine's to bf16 accuracy
    assert out["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-2)
    worker.publish()
    _, published = worker.store.latest()
    assert {v.dtype for v in published.values() if v.is_floating_point()} == {torch.bfloat16}


def test_bf16_trainer_logprobs_agree_with_the_bf16_engine(small_config) -> None:
    cfg = small_config("model.dtype=bfloat16", "sampling.temperature=0.8", "sampling.top_p=0.7")
    engine_session = open_session(PolicySpec.of(cfg))
    _, batch = one_batch(cfg, engine_session)
    master = open_session(PolicySpec.of(cfg), master_weights=True).model
    trainer = Trainer(master, cfg.train, cfg.loss, cfg.sampling, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        recomputed_BT = trainer._logprobs(master, batch.input_ids_BT, batch.attention_mask_BT)
    mask = batch.loss_mask_BT.bool()
    error = (recomputed_BT - batch.behav_logprobs_BT)[mask].abs()
    print(f"bf16 engine vs fp32-master + bf16 autocast trainer: max {error.max():.2e}, mean {error.mean():.2e}")
    assert error.max() < 1e-2  # measured 2.3e-3 (mean 4.7e-4); float32 agrees to < 1e-4


@pytest.mark.parametrize("loss", sorted(POLICY_LOSSES))
def test_every_objective_takes_several_updates_per_step(small_config, loss: str) -> None:
    """μ = 2 epochs × 2 minibatches: four optimizer updates, the later ones off-policy."""
    cfg = small_config(f"loss.name={loss}", "train.epochs=2", "train.minibatches=2", "train.kl_coef=0.01")
    session, batch = one_batch(cfg)
    trainer = make_trainer(session, cfg)
    trainer.set_reference()
    before = snapshot(session.model)
    out = trainer.step(batch)
    assert trainer.version == 1 and len(trainer.optimizer.state) > 0
    assert all(math.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, session.model.parameters()))
    assert out["loss/kl"] > 1e-9  # the later updates moved away from the reference
    assert out["loss/ratio_max"] > 1.0 or out["loss/ratio_min"] < 1.0  # and from the sampling policy
