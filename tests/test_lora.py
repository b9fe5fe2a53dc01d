"""LoRA (model.lora.rank > 0): only the adapter trains, the reference is the base with the
adapter off, engines sample exactly the trained policy in every mode and runtime (a stale base
model would show), and checkpoints are peft's own format, exportable merged and resumable."""

import asyncio
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from policyflow import cli, coordinator
from policyflow.config import ConfigError
from policyflow.lora import attach_lora, lora_weights
from policyflow.model import build_tiny
from policyflow.trainer import sequence_logprobs
from policyflow.weights import FileSnapshotStore, SnapshotStore, snapshot_path
from policyflow.workers import GroupSpec, RolloutWorker, TrainerWorker
from policyflow.policy import PolicySpec

QUIET = dict(log=lambda *_: None)
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "train.lr=1e-2")


def _steps(cfg) -> list[dict]:
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if "loss/total" in m]


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 30, 42, 8, 61, 3, 29]])


def test_config_switch_and_one_line_errors(small_config) -> None:
    assert small_config().model.lora.rank == 0  # off by default
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\['all-linear', 'q_proj'\]"):
        small_config("model.lora.rank=4", "model.lora.target_modules=[all-linear, q_proj]")
    cfg = small_config("model.lora.rank=4", "model.lora.target_modules=[no_such_layer]")
    model, _ = build_tiny(hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['no_such_layer'\] does not fit this model"):
        attach_lora(model, cfg.model.lora, "base")
    with pytest.raises(ValueError, match="only linear layers are supported"):
        attach_lora(model, small_config("model.lora.rank=4", "model.lora.target_modules=[embed_tokens]").model.lora, "base")


def test_merged_weights_give_the_adapted_model_and_leave_the_base_untouched(small_config) -> None:
    cfg = small_config("model.lora.rank=4", "model.lora.alpha=8", "model.lora.target_modules=[q_proj, v_proj, down_proj]")
    model, _ = build_tiny(seed=1, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    plain, _ = build_tiny(seed=2, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = attach_lora(model, cfg.model.lora, "base")
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at 0; a trained adapter is not
    merged = lora_weights(wrapped, torch.float32).merged()  # what the stores publish
    assert set(merged) == set(base_state)  # the plain model's names, no adapter tensors
    q = "model.layers.0.self_attn.q_proj"
    layer = wrapped.get_base_model().get_submodule(q)
    expected = base_state[f"{q}.weight"] + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # α/r = 8/4
    torch.testing.assert_close(merged[f"{q}.weight"], expected)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base_state["model.layers.0.self_attn.k_proj.weight"])
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(_ids()).logits, wrapped(input_ids=_ids()).logits, rtol=1e-5, atol=1e-5)
    for key, value in wrapped.get_base_model().state_dict().items():  # publishing never merged into the trained tensors
        if ".lora_" not in key:
            assert torch.equal(value, base_state[key.replace(".base_layer.", ".")])


def test_file_store_moves_only_the_adapter_and_merges_the_same_weights(small_config, tmp_path: Path) -> None:
    """Process runtime: the base is written once, each version holds only A and B, and a reader
    gets bit-for-bit the merged weights the inline store holds."""
    cfg = small_config("model.lora.rank=2")
    model, _ = build_tiny(seed=1, hidden_size=64, num_layers=2, intermediate_size=128, num_heads=2, num_kv_heads=1)
    wrapped = attach_lora(model, cfg.model.lora, "base")
    files, memory = FileSnapshotStore(tmp_path / "snap", keep=2), SnapshotStore(keep=2)
    for version in range(3):
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_" in name:
                    p.add_(torch.randn_like(p), alpha=0.01)  # a training step
        weights = lora_weights(wrapped, torch.bfloat16)
        files.publish(version, weights)
        memory.publish(version, weights)
        (v_loaded, loaded), (v_held, held) = files.latest(), memory.latest()
        assert v_loaded == v_held == version and loaded.keys() == held.keys() and all(torch.equal(loaded[k], held[k]) for k in held)
        assert held["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    (base,) = (tmp_path / "snap").glob("base-*.safetensors")
    adapter_bytes = snapshot_path(tmp_path / "snap", 2).stat().st_size
    trained = sum(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert adapter_bytes < 4 * trained + 8192 and adapter_bytes * 10 < base.stat().st_size  # A and B in fp32, names
    resumed = FileSnapshotStore(tmp_path / "snap", keep=2)  # a resumed trainer writes its base afresh
    resumed.publish(3, lora_weights(wrapped, torch.bfloat16))
    (new_base,) = (tmp_path / "snap").glob("base-*.safetensors")
    assert new_base != base and torch.equal(resumed.latest()[1]["model.embed_tokens.weight"], memory.latest()[1]["model.embed_tokens.weight"])


def test_engine_samples_the_adapted_policy_not_the_base(small_config) -> None:
    """After a step the engine's behaviour log-probs are the trainer's adapted policy's (to 1e-4)
    and differ clearly from the base model's: an engine left on the base would be caught."""
    cfg = small_config(*LORA, "train.kl_coef=0.05", "sampling.temperature=0.8", "sampling.top_p=0.9")
    store = SnapshotStore(keep=3)
    trainer = TrainerWorker(PolicySpec.of(cfg), store)
    trainer.warm_start()  # SFT trains the full model; its gradients must not linger on the frozen base
    trainer.begin_rl()
    model = trainer.session.model
    assert all(p.grad is None for p in model.parameters())
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if ".lora_" not in k}
    assert trainer.trainer.ref_model is None and trainer.trainer.ref_is_base  # no second model
    trained = {id(p) for g in trainer.trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    trainer.publish()
    worker = RolloutWorker(PolicySpec.of(cfg), store, seed=0, engine_slots=cfg.pipeline.engine_slots)
    B = cfg.train.prompts_per_step

    async def sample(first: int) -> list:
        await worker.submit([GroupSpec(f"train-{i}", i, worker.task.train_problem(i)) for i in range(first, first + B)])
        groups = []
        while len(groups) < B:
            groups += (await worker.poll()).groups
        return groups

    async def run():
        metrics = trainer.train_step(await sample(0))
        assert await worker.update_weights("drain") == 1
        return metrics, await sample(B)

    first, groups = asyncio.run(run())
    worker.close()
    assert first["loss/kl"] == pytest.approx(0.0, abs=1e-7) and first["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    gap = 0.0
    for t in (t for g in groups for t in g.trajectories):
        prompt, gen = t.segments
        assert set(gen.versions) == {1}
        ids = torch.tensor([prompt.token_ids + gen.token_ids])
        P = len(prompt.token_ids)
        with torch.no_grad():
            adapted = sequence_logprobs(model, ids, torch.ones_like(ids), cfg.sampling)[0, P:]
            with model.disable_adapter():
                base = sequence_logprobs(model, ids, torch.ones_like(ids), cfg.sampling)[0, P:]
        torch.testing.assert_close(adapted, torch.tensor(gen.logprobs), rtol=0, atol=1e-4)
        gap = max(gap, float((base - torch.tensor(gen.logprobs)).abs().max()))
    assert gap > 1e-2  # the base model's log-probs are far from what the engine sampled with
    for key, value in model.get_base_model().state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, base_before[key])  # the base never moves


@pytest.mark.parametrize("runtime", ["inline", "process"])
@pytest.mark.parametrize("mode", ["sync", "one_step_off", "async"])
def test_every_mode_and_runtime_trains_the_adapter_on_policy(small_config, mode: str, runtime: str) -> None:
    """sync: the on-policy ratio is 1 (to 1e-5) and nothing is clipped at every step, so the
    engine sampled exactly the trainer's adapted weights; stale modes (decoupled PPO): fresh
    batches have behaviour weight 1 and the staleness bound holds."""
    cfg = small_config(*LORA, f"pipeline.mode={mode}", f"pipeline.runtime={runtime}", "train.kl_coef=0.01", "eval.every=0", "train.steps=3", "sft.max_steps=0")
    summary = coordinator.train(cfg, **QUIET)
    rows = _steps(cfg)
    assert summary["steps"] == 3 and len(rows) == 3
    assert rows[0]["loss/kl"] == pytest.approx(0.0, abs=1e-7) and rows[-1]["loss/kl"] > 1e-8  # reference = the base
    for m in rows:
        assert m["loss/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and m["loss/clip_frac"] == 0.0
        assert m["async/staleness_max"] <= cfg.pipeline.eta_hard
        if "loss/behav_weight_mean" in m and m["async/staleness_max"] == 0:
            assert m["loss/behav_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    if mode == "sync":
        assert all(m["async/staleness_max"] == 0 for m in rows)
    adapter = load_file(Path(summary["final_checkpoint"]) / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapter.items())  # the adapter learned something


def test_checkpoint_is_peft_format_and_exports_merged(small_config, tmp_path: Path, capsys) -> None:
    cfg = small_config(*LORA, "eval.every=0")
    summary = coordinator.train(cfg, **QUIET)
    checkpoint = Path(summary["final_checkpoint"])
    assert not (checkpoint / "config.json").exists()  # the adapter alone, no second copy of the base
    base_ref = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_ref == "../../base"  # relative to the checkpoint: the run folder can be moved
    base_dir = (checkpoint / base_ref).resolve()
    assert base_dir == (cfg.run_dir / "base").resolve()
    # Plain peft and transformers: no policyflow code.
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), checkpoint).eval()
    assert cli.main(["export", "--merge", str(checkpoint), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        want = peft_model(input_ids=_ids()).logits
        torch.testing.assert_close(merged(_ids()).logits, want, rtol=1e-5, atol=1e-5)
        assert (base(_ids()).logits - want).abs().max() > 1e-3
    # `policyflow eval --model <checkpoint>` evaluates the merged model, the one the trainer evaluated.
    assert coordinator.run_eval(cfg, checkpoint) == summary["eval_after"]
    capsys.readouterr()
    assert cli.main(["export", "--merge", str(cfg.run_dir / "base"), str(tmp_path / "x")]) == 1  # not an adapter
    assert capsys.readouterr().err.count("\n") == 1  # one line


def test_resume_restores_adapter_and_optimizer_exactly(small_config) -> None:
    straight = small_config(*LORA, "run.name=straight", "train.steps=3", "eval.every=0", "train.kl_coef=0.01")
    coordinator.train(straight, **QUIET)
    stopped = small_config(*LORA, "run.name=stopped", "train.steps=2", "eval.every=0", "train.kl_coef=0.01")
    coordinator.train(stopped, **QUIET)
    resumed = small_config(*LORA, "run.name=stopped", "train.steps=3", "eval.every=0", "train.kl_coef=0.01")
    summary = coordinator.train(resumed, resume=stopped.run_dir, **QUIET)
    a, b = _steps(straight)[-1], _steps(resumed)[-1]
    assert a["step"] == b["step"] == 3
    for key in ("loss/total", "loss/kl", "loss/grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8)
    finals = [load_file(straight.run_dir / "checkpoints" / "step-3" / "adapter_model.safetensors"),
              load_file(Path(summary["final_checkpoint"]) / "adapter_model.safetensors")]
    assert finals[0].keys() == finals[1].keys()
    for key in finals[0]:
        torch.testing.assert_close(finals[0][key], finals[1][key], rtol=1e-5, atol=1e-7)


def test_a_local_model_without_warm_start_is_its_own_base(small_config, tmp_path: Path) -> None:
    """No copy of an unchanged model.path: the adapter names it as its base, and resume loads it from there."""
    model, tokenizer = build_tiny(seed=5, hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2, num_kv_heads=1)
    model.save_pretrained(tmp_path / "local")
    tokenizer.save_pretrained(tmp_path / "local")
    overrides = (*LORA, f"model.path={tmp_path / 'local'}", "sft.max_steps=0", "eval.every=0")
    first = small_config(*overrides, "train.steps=1")
    coordinator.train(first, **QUIET)
    summary = coordinator.train(small_config(*overrides, "train.steps=2"), resume=first.run_dir, **QUIET)
    assert summary["steps"] == 2 and not (first.run_dir / "base").exists()
    config = json.loads((Path(summary["final_checkpoint"]) / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (tmp_path / "local").resolve()
