"""The RL trainer: log-probs from a full forward pass, the chosen objective, an AdamW step.

One `step(batch)` is one policy version: μ epochs × minibatches optimizer updates on a batch of
rollouts, then `version += 1`. The loss math lives in `losses.py` as pure functions; this file
only gathers their inputs.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from policyflow.config import LossConfig, SamplingConfig, TrainConfig
from policyflow.lora import is_lora
from policyflow.losses import LOSS_NEEDS, POLICY_LOSSES, kl_penalty
from policyflow.ops import masked_mean, shifted_token_logprobs
from policyflow.types import TrainBatch


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    policy: SamplingConfig | None = None,
) -> torch.Tensor:
    """log π(token t | tokens < t) for every position of right-padded sequences ([B, T], position 0 = 0).

    π is the sampling policy of `policy` (temperature, top_p, top_k; None: the model's own
    log-softmax), computed by the same function the engine samples with
    (`ops.policy_log_distribution`), so for the weights that sampled a token this is exactly
    the behaviour log-prob the engine recorded.
    """
    logits_BTV = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits
    if policy is None:
        return shifted_token_logprobs(logits_BTV, input_ids_BT)
    return shifted_token_logprobs(logits_BTV, input_ids_BT, policy.temperature, policy.top_p, policy.top_k)


def compute_precision(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Forward passes in `dtype` (autocast) over float32 master weights; float32: no autocast."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=betas)


class Trainer:
    """Owns the policy's optimizer (and the frozen reference model when a KL penalty is on).

    The optimizer takes the parameters that require gradients: all of them, or with a LoRA
    model (peft) only the adapter's.
    """

    def __init__(self, model: torch.nn.Module, train: TrainConfig, loss: LossConfig, sampling: SamplingConfig, *,
                 compute_dtype: torch.dtype = torch.float32, version: int = 0):
        if loss.name not in POLICY_LOSSES:
            raise ValueError(f"loss.name={loss.name!r}; allowed: {', '.join(POLICY_LOSSES)}")
        self.model = model
        self.cfg = train
        self.loss_name = loss.name
        self.loss_fn = POLICY_LOSSES[loss.name]
        self.needs = LOSS_NEEDS[loss.name]
        self.hyper = loss.hyper() | ({"max_len": sampling.max_new_tokens} if self.needs.max_len else {})
        self.policy = sampling  # the behaviour policy's temperature, top_p, top_k
        self.compute_dtype = compute_dtype  # forward passes; parameters and AdamW state stay as they are (fp32)
        self.optimizer = make_optimizer(model, train.lr, train.weight_decay, train.betas)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]  # clipped and stepped
        self.ref_model: torch.nn.Module | None = None  # set by `set_reference` when train.kl_coef > 0
        self.ref_is_base = False  # LoRA: the reference is self.model with its adapter disabled
        self.version = version

    def set_reference(self, model: torch.nn.Module | None = None) -> None:
        """Freeze the KL reference: a copy of `model` (default: the policy as it is now).

        Call it with the model RL starts from, after any warm-start; a resumed run passes the
        reference it stored, never the checkpoint's weights. With a LoRA policy and no `model`,
        the reference is the policy's frozen base (peft's `disable_adapter()`): no copy is made.
        """
        self.ref_is_base = model is None and is_lora(self.model)
        self.ref_model = None if self.ref_is_base else copy.deepcopy(model if model is not None else self.model).eval().requires_grad_(False)

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
        if self.needs.proximal:
            self.model.eval()
            extra["prox_logprobs"] = self._logprobs(self.model, batch.input_ids_BT, batch.attention_mask_BT)
            self.model.train()
        if self.cfg.kl_coef > 0:
            with self._reference() as reference:
                extra["ref_logprobs"] = self._logprobs(reference, batch.input_ids_BT, batch.attention_mask_BT)
        return extra

    @contextlib.contextmanager
    def _reference(self):
        """The KL reference model for the duration of the block (a LoRA base: the adapter off, eval mode)."""
        if self.ref_is_base:
            training = self.model.training
            self.model.eval()
            with self.model.disable_adapter():
                yield self.model
            self.model.train(training)
        elif self.ref_model is None:
            raise RuntimeError("train.kl_coef > 0 needs a reference model: call Trainer.set_reference() with the model RL starts from")
        else:
            yield self.ref_model

    def _logprobs(self, model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        """Behaviour-policy log-probs ([B, T], float32) with the forward pass in the compute dtype."""
        with compute_precision(next(model.parameters()).device, self.compute_dtype):
            return sequence_logprobs(model, input_ids_BT, attention_mask_BT, self.policy)

    def _update(self, batch: TrainBatch, rows: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict[str, float]:
        input_ids_BT = batch.input_ids_BT[rows]
        mask_BT = batch.loss_mask_BT[rows]
        logprobs_BT = self._logprobs(self.model, input_ids_BT, batch.attention_mask_BT[rows])
        kwargs = dict(self.hyper)
        if "prox_logprobs" in extra:
            kwargs["prox_logprobs"] = extra["prox_logprobs"]
        ref_BT = extra.get("ref_logprobs")
        if ref_BT is not None and self.needs.kl_inside:
            kwargs |= {"ref_logprobs": ref_BT, "kl_coef": self.cfg.kl_coef, "kl_kind": self.cfg.kl_kind}
        out = self.loss_fn(logprobs_BT, batch.behav_logprobs_BT[rows], batch.advantages_B[rows], mask_BT, **kwargs)
        loss = out.loss
        metrics = {f"loss/{k}": float(v) for k, v in out.metrics.items()}
        if ref_BT is not None and not self.needs.kl_inside:
            kl = masked_mean(kl_penalty(logprobs_BT, ref_BT, self.cfg.kl_kind), mask_BT)
            loss = loss + self.cfg.kl_coef * kl
            metrics["loss/kl"] = float(kl.detach())
        self._check_finite("loss", loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)  # a frozen base's leftover grads never count
        self._check_finite("gradient norm", grad_norm)  # before the step: the weights stay as they were
        self.optimizer.step()
        metrics["loss/total"] = float(loss.detach())
        metrics["loss/grad_norm"] = float(grad_norm)
        return metrics

    def _check_finite(self, what: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"non-finite {what} ({float(value.detach())}) in the {self.loss_name} step from version {self.version}; "
                "this update was not applied (earlier updates of the same step, with train.epochs or train.minibatches > 1, were); the last checkpoint is intact; lower train.lr or check the rewards"
            )
