"""The RL trainer: log-probs from a full forward pass, the chosen objective, an AdamW step.

One `step(batch)` is one policy version: μ epochs × minibatches optimizer updates on a batch of
rollouts, then `version += 1`. The loss math lives in `losses.py` as pure functions; this file
only gathers their inputs.
"""

from __future__ import annotations

import copy
import time

import torch

from policyflow.config import LossConfig, TrainConfig
from policyflow.losses import POLICY_LOSSES, TOKEN_LEVEL_LOSSES, kl_penalty
from policyflow.ops import masked_mean, shifted_token_logprobs
from policyflow.types import TrainBatch


def sequence_logprobs(model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token t | tokens < t) for every position of right-padded sequences ([B, T], position 0 = 0).

    Logits are divided by the sampling temperature, so these match the sampler's behaviour
    log-probs for the same weights (top-p renormalisation aside).
    """
    logits_BTV = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits
    if temperature not in (0.0, 1.0):
        logits_BTV = logits_BTV / temperature
    return shifted_token_logprobs(logits_BTV, input_ids_BT)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=betas)


class Trainer:
    """Owns the policy's optimizer (and the frozen reference model when a KL penalty is on)."""

    def __init__(self, model: torch.nn.Module, train: TrainConfig, loss: LossConfig, *, temperature: float, max_len: int, version: int = 0):
        if loss.name not in POLICY_LOSSES:
            raise ValueError(f"loss.name={loss.name!r}; allowed: {', '.join(POLICY_LOSSES)}")
        self.model = model
        self.cfg = train
        self.loss_name = loss.name
        self.loss_fn = POLICY_LOSSES[loss.name]
        self.hyper = loss.hyper() | ({"max_len": max_len} if loss.name == "dr_grpo" else {})
        self.temperature = temperature if temperature > 0 else 1.0
        self.optimizer = make_optimizer(model, train.lr, train.weight_decay, train.betas)
        self.ref_model = None
        if train.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.version = version

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """One policy version: μ epochs over `minibatches` slices of the batch. Returns float metrics."""
        start = time.perf_counter()
        self.model.train()
        extra = self._fixed_inputs(batch)
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(self.cfg.epochs):
            for rows in torch.arange(batch.num_sequences).chunk(self.cfg.minibatches):
                metrics = self._update(batch, rows, {k: v[rows] for k, v in extra.items()})
                for key, value in metrics.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        self.version += 1
        elapsed = time.perf_counter() - start
        out = {key: value / updates for key, value in totals.items()}
        tokens = float(batch.attention_mask_BT.sum()) * self.cfg.epochs
        out["perf/train_tokens_per_s"] = tokens / max(elapsed, 1e-9)
        out["perf/train_seconds"] = elapsed
        return out

    @torch.no_grad()
    def _fixed_inputs(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Tensors computed once per batch before any update: proximal and reference log-probs."""
        extra: dict[str, torch.Tensor] = {}
        if self.loss_name == "decoupled_ppo":
            self.model.eval()
            extra["prox_logprobs"] = sequence_logprobs(self.model, batch.input_ids_BT, batch.attention_mask_BT, self.temperature)
            self.model.train()
        if self.ref_model is not None:
            extra["ref_logprobs"] = sequence_logprobs(self.ref_model, batch.input_ids_BT, batch.attention_mask_BT, self.temperature)
        return extra

    def _update(self, batch: TrainBatch, rows: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, float]:
        input_ids_BT = batch.input_ids_BT[rows]
        mask_BT = batch.loss_mask_BT[rows]
        logprobs_BT = sequence_logprobs(self.model, input_ids_BT, batch.attention_mask_BT[rows], self.temperature)
        kwargs = dict(self.hyper)
        if "prox_logprobs" in extra:
            kwargs["prox_logprobs"] = extra["prox_logprobs"]
        ref_BT = extra.get("ref_logprobs")
        if ref_BT is not None and self.loss_name in TOKEN_LEVEL_LOSSES:
            kwargs |= {"ref_logprobs": ref_BT, "kl_coef": self.cfg.kl_coef, "kl_kind": self.cfg.kl_kind}
        out = self.loss_fn(logprobs_BT, batch.behav_logprobs_BT[rows], batch.advantages_B[rows], mask_BT, **kwargs)
        loss = out.loss
        metrics = {f"loss/{k}": float(v) for k, v in out.metrics.items()}
        if ref_BT is not None and self.loss_name not in TOKEN_LEVEL_LOSSES:
            kl = masked_mean(kl_penalty(logprobs_BT, ref_BT, self.cfg.kl_kind), mask_BT)
            loss = loss + self.cfg.kl_coef * kl
            metrics["loss/kl"] = float(kl.detach())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {self.loss_name} loss at version {self.version}; lower train.lr or check rewards")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        metrics["loss/total"] = float(loss.detach())
        metrics["loss/grad_norm"] = float(grad_norm)
        return metrics
