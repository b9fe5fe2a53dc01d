"""The one-process pipeline: trainer step, SFT, checkpoints, resume, and every objective end to end."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from policyflow import coordinator
from policyflow.checkpoint import LoopState, latest_checkpoint, save_checkpoint
from policyflow.evaluate import EvalResult
from policyflow.losses import POLICY_LOSSES, sft_loss
from policyflow.model import ModelLoadError, build_tiny, load_pretrained
from policyflow.rollout import build_batch, encode_prompts, rollout_groups
from policyflow.session import open_session
from policyflow.sft import SFT_PROBLEM_OFFSET, warm_start
from policyflow.tokens import sft_batch
from policyflow.trainer import Trainer, sequence_logprobs
from policyflow.policy import PolicySpec


def _one_batch(cfg):
    session = open_session(PolicySpec.of(cfg))
    problems = [session.task.train_problem(i) for i in range(cfg.train.prompts_per_step)]
    groups, errors = rollout_groups(session.runner, session.task, problems, cfg.train.group_size, torch.Generator().manual_seed(0))
    batch, stats = build_batch(groups, cfg.train, cfg.advantage, session.tokenizer.pad_token_id)
    return session, groups, batch, stats | {"rollout/reward_errors": errors}


def test_grpo_step_changes_parameters_and_stays_finite(small_config) -> None:
    cfg = small_config()
    session, groups, batch, metrics = _one_batch(cfg)
    assert batch is not None and metrics["rollout/groups_zero_variance"] == 0
    assert batch.advantages_B.abs().sum() > 0
    before = [p.detach().clone() for p in session.model.parameters()]
    trainer = Trainer(session.model, cfg.train, cfg.loss, cfg.sampling)
    out = trainer.step(batch)
    after = list(session.model.parameters())
    assert trainer.version == 1
    assert all(torch.isfinite(p).all() for p in after)
    assert sum(float((a.detach() - b).abs().sum()) for a, b in zip(after, before)) > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    # On-policy: the ratio is 1 before the first update of the step (one epoch, one minibatch).
    assert out["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-4)


def test_zero_variance_groups_are_skipped_and_counted(small_config) -> None:
    cfg = small_config()
    session, groups, _, _ = _one_batch(cfg)
    for t in groups[0].trajectories:
        t.reward = 0.5
    batch, stats = build_batch(groups, cfg.train, cfg.advantage, session.tokenizer.pad_token_id)
    assert stats["rollout/groups_zero_variance"] == 1
    assert batch.num_sequences == (len(groups) - 1) * cfg.train.group_size


def test_sft_lowers_the_loss(small_config) -> None:
    cfg = small_config("task.name=arithmetic", "sft.max_steps=30", "sft.lr=3e-3", "sft.warmup_steps=5", "sft.target_accuracy=1.0", "sft.eval_every=100")
    session = open_session(PolicySpec.of(cfg))
    problems = [session.task.train_problem(i) for i in range(16)]
    prompts = encode_prompts(session.tokenizer, session.task, problems, False)
    completions = [session.tokenizer(session.task.sft_completion(p), add_special_tokens=False)["input_ids"] + [1] for p in problems]
    ids, attention, mask = sft_batch(prompts, completions, 0)

    def loss() -> float:
        with torch.no_grad():
            return float(sft_loss(sequence_logprobs(session.model, ids, attention), mask).loss)

    first = loss()
    result = warm_start(session.model, session.tokenizer, session.task, cfg.sft, chat_template=False, greedy_accuracy=lambda: 0.0)
    assert result.steps == 30
    assert loss() < 0.7 * first


def test_sft_draws_its_problems_from_task_sft_problem(small_config, monkeypatch) -> None:
    """The warm-start asks `Task.sft_problem` (batch after batch, from SFT_PROBLEM_OFFSET), not train_problem."""
    cfg = small_config("task.name=arithmetic", "sft.max_steps=2", "sft.batch_size=3", "sft.target_accuracy=1.0", "sft.eval_every=100")
    session = open_session(PolicySpec.of(cfg))
    asked: list[int] = []
    train_problem = session.task.train_problem

    def sft_problem(index: int):
        asked.append(index)
        return train_problem(index)

    monkeypatch.setattr(session.task, "sft_problem", sft_problem)
    monkeypatch.setattr(session.task, "train_problem", lambda index: pytest.fail("SFT asked train_problem"))
    warm_start(session.model, session.tokenizer, session.task, cfg.sft, chat_template=False, greedy_accuracy=lambda: 0.0)
    assert asked == [SFT_PROBLEM_OFFSET + k for k in range(6)]


def test_checkpoint_loads_with_plain_transformers(tmp_path: Path) -> None:
    model, tokenizer = build_tiny(seed=3, hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=1)
    folder = save_checkpoint(tmp_path, model, tokenizer, None, LoopState(step=7), None, keep_last=1)
    assert folder == tmp_path / "checkpoints" / "step-7" and latest_checkpoint(tmp_path) == folder
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    text = "12+345=357"
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tok.decode(tokenizer(text)["input_ids"]) == text
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_pretrained(tmp_path)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_next_step(small_config, tmp_path: Path) -> None:
    straight = small_config("run.name=straight", "train.steps=3", "eval.every=0")
    coordinator.train(straight, log=lambda *_: None)
    stopped = small_config("run.name=stopped", "train.steps=2", "eval.every=0")
    coordinator.train(stopped, log=lambda *_: None)
    resumed = small_config("run.name=stopped", "train.steps=3", "eval.every=0")
    summary = coordinator.train(resumed, resume=stopped.run_dir, log=lambda *_: None)
    assert summary["steps"] == 3
    step3 = [[m for m in _metrics(cfg.run_dir) if m.get("step") == 3 and "loss/total" in m][0] for cfg in (straight, resumed)]
    assert step3[0]["loss/total"] == pytest.approx(step3[1]["loss/total"], rel=1e-5, abs=1e-7)
    assert step3[0]["rollout/reward_mean"] == step3[1]["rollout/reward_mean"]
    final = [AutoModelForCausalLM.from_pretrained(Path(json.loads((c.run_dir / "summary.json").read_text())["final_checkpoint"])) for c in (straight, resumed)]
    for a, b in zip(final[0].parameters(), final[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_writes_every_output(small_config) -> None:
    sft = ["sft.max_steps=40", "sft.lr=1e-2", "sft.warmup_steps=5", "sft.eval_every=40", "sft.target_accuracy=1.0"]
    cfg = small_config("run.samples_every=1", *sft)
    summary = coordinator.train(cfg, log=lambda *_: None)
    run = cfg.run_dir
    # The evaluation after RL is of the final weights: evaluating the saved checkpoint again gives
    # the same accuracies and completion lengths (SFT taught the model to stop, so lengths vary
    # with the weights); the one before RL is logged as step 0.
    assert summary["eval_after"] == coordinator.run_eval(cfg, Path(summary["final_checkpoint"]))
    assert summary["eval_after"] != summary["eval_before"]
    (first,) = [m for m in _metrics(run) if m.get("step") == 0]
    assert EvalResult(**summary["eval_before"]).as_metrics().items() <= first.items()
    assert summary["wall_seconds"] > 0 and Path(summary["final_checkpoint"]).is_dir()
    assert (run / "plot.png").stat().st_size > 0
    steps = [m["step"] for m in _metrics(run) if "rollout/reward_mean" in m]
    assert steps == [1, 2]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2} and all({"prompt", "segments", "reward", "advantage"} <= set(s) for s in samples)


def test_failing_reward_function_is_counted_not_fatal(small_config) -> None:
    cfg = small_config("task.reward=tests.rewards_for_tests:broken")
    _, _, batch, metrics = _one_batch(cfg)
    assert metrics["rollout/reward_errors"] == cfg.train.prompts_per_step * cfg.train.group_size
    assert batch is None  # every reward is 0: nothing to learn from, and nothing crashed


@pytest.mark.parametrize("loss", sorted(POLICY_LOSSES))
def test_every_objective_trains_from_the_post_sft_reference(small_config, loss: str) -> None:
    """Every objective end to end after SFT, with a KL penalty and a truncated sampling policy.

    Step 1 is on-policy: the recomputed log-probs equal the engine's (ratio 1, nothing clipped)
    and the policy is the KL reference (kl 0). Step 2 starts from moved weights (kl > 0)."""
    policy = ["sampling.temperature=0.8", "sampling.top_p=0.7", "train.kl_coef=0.01"]
    cfg = small_config(f"loss.name={loss}", *policy, "eval.every=0", "sft.max_steps=4", "sft.lr=1e-2", "sft.warmup_steps=1")
    summary = coordinator.train(cfg, log=lambda *_: None)
    first, second = [m for m in _metrics(cfg.run_dir) if "loss/total" in m]
    assert summary["steps"] == 2
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-6) and second["loss/kl"] > 1e-7
    assert first["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["loss/clip_frac"] == 0.0
    reference = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "reference")
    final = AutoModelForCausalLM.from_pretrained(summary["final_checkpoint"])
    assert any(not torch.equal(a, b) for a, b in zip(reference.parameters(), final.parameters()))


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "gfpo"])
def test_every_advantage_builds_a_batch(small_config, advantage: str) -> None:
    cfg = small_config(f"advantage.name={advantage}", "advantage.gfpo_k=2")
    _, _, batch, stats = _one_batch(cfg)
    assert torch.isfinite(batch.advantages_B).all() and batch.advantages_B.abs().sum() > 0
    if advantage == "gfpo":
        assert stats["rollout/gfpo_kept_fraction"] == pytest.approx(0.5)
        assert int((batch.advantages_B != 0).sum()) <= cfg.train.prompts_per_step * 2


def test_sft_reports_each_greedy_evaluation_and_stops_at_the_target(small_config) -> None:
    cfg = small_config("task.name=arithmetic", "sft.max_steps=50", "sft.warmup_steps=5", "sft.target_accuracy=0.5", "sft.eval_every=10")
    session = open_session(PolicySpec.of(cfg))
    accuracies = iter([0.1, 0.2, 0.6, 0.9])  # the first is the check before any step (step 0)
    seen: list[tuple[int, float]] = []
    result = warm_start(session.model, session.tokenizer, session.task, cfg.sft, chat_template=False,
                        greedy_accuracy=lambda: next(accuracies), on_eval=lambda step, acc: seen.append((step, acc)))
    assert seen == [(0, 0.1), (10, 0.2), (20, 0.6)]
    assert (result.steps, result.accuracy_greedy) == (20, 0.6)
